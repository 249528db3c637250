"""TSV-M: Task Singular Vectors Merging (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference
in Model Merging", CVPR 2025).

For every 2-D parameter (layer l) with task matrices τ_1..τ_K of shape m×n (r = min(m, n)):

1. Low-rank approximation: τ_i = U_i Σ_i V_iᵀ, keep the top k = ⌊r / K⌋ singular components of each task
   (the paper's "1/T of the rank"; the official code writes int(r · (1/T))).
2. Concatenate across tasks: U_cat = [U_1,k … U_K,k] (m × Kk), Σ_cat = diag(Σ_1,k … Σ_K,k),
   V_cat = [V_1,k … V_K,k] (n × Kk).
3. Decorrelate (whiten) the task singular vectors: U⊥ = P Qᵀ from U_cat = P S Qᵀ (the orthogonal polar factor,
   i.e. the closest matrix with orthonormal columns), V⊥ likewise from V_cat.
4. M_l = U⊥ Σ_cat V⊥ᵀ and θ_l = θ_pre,l + α M_l.

Tensors that are not 2-D (biases, LayerNorm, 4-D convolutions) and 2-D tensors with r < K (no component can be
kept per task) are averaged: M_l = (1/K) Σ_i τ_i, as in the official code; α scales them too.

Options → symbols: `scaling_coef` = α, default 1.0 (the paper's setting: TSV-M uses α = 1 and needs no
validation; FusionBench's default too).

Implementation notes: step 1 runs batched over the K tasks (Gram eigenvectors + Rayleigh–Ritz, see
`svd_ops.top_svd`); components below the float32 numerical-rank tolerance are dropped rather than completed by
arbitrary orthonormal vectors, so task vectors of rank < k with mutually orthogonal row and column spaces merge
exactly to their sum (the paper's zero-interference case). Step 3 computes the polar factors through float64
inverse square roots of the Kk×Kk Gram matrices.
"""

from __future__ import annotations

from symerge.merging.registry import Delta, register
from symerge.merging.svd_ops import is_matrix, orthogonalized_product, top_svd
from symerge.taskvectors import TaskVectors


@register("tsv")
def tsv(tv: TaskVectors, *, scaling_coef: float = 1.0) -> Delta:
    """TSV-M; `scaling_coef` = α (default 1.0)."""
    num_tasks = tv.num_tasks
    out: Delta = {}
    for key, vec in tv.items_float():
        if not is_matrix(vec) or min(vec.shape[1:]) // num_tasks == 0:
            out[key] = vec.mean(dim=0) * scaling_coef
            continue
        _, m, n = vec.shape
        k = min(m, n) // num_tasks
        u, s, vh = top_svd(vec, k)  # [K, m, k], [K, k], [K, k, n]
        u_cat = u.permute(1, 0, 2).reshape(m, num_tasks * k)
        merged = orthogonalized_product(u_cat, s.reshape(-1), vh.reshape(num_tasks * k, n))
        out[key] = merged * scaling_coef
    return out
