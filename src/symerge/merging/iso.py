"""Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025).

Iso-C ("isotropic merging in the common subspace"), per 2-D parameter with task matrices τ_1..τ_K (m×n):
    M = Σ_t τ_t = U Σ Vᵀ,   σ̄ = (1/r) Σ_i σ_i,   M_iso = σ̄ U Vᵀ,   θ = θ_pre + α M_iso,
i.e. task arithmetic with its singular spectrum flattened to its mean (every direction of the merged update
gets the same weight, so no task's directions are drowned by the dominant ones).

Iso-CTS ("… common and task-specific subspaces"), per 2-D parameter (r = min(m, n)):
    1. common subspace: the top k_c singular triplets of M = Σ_t τ_t;
    2. task-specific subspaces: for each task, τ̃_t = τ_t − U_c U_cᵀ τ_t (its part outside the common column
       space) and its top s = (r − k_c) / K singular triplets;
    3. concatenate U_cat = [U_c, Ũ_1 … Ũ_K], V_cat likewise, σ_cat (r components in total), orthogonalise
       U_cat and V_cat (orthogonal polar factors, as in TSV-M), set every σ to σ̄ = mean(σ_cat):
       M_iso = σ̄ U⊥ V⊥ᵀ,  θ = θ_pre + α M_iso.
   k_c follows the official code: k_c = ⌊r · f⌋ with f = `common_space_fraction`, then rounded so that the
   task-specific part r − k_c is a multiple of K (r − k_c = round((r − ⌊r f⌋) / K) · K).

Both methods average tensors that are not 2-D (biases, norms, convolutions): M = (1/K) Σ_t τ_t (official code),
also scaled by α.

Options → symbols:
- `scaling_coef` = α. The paper picks α on held-out validation data; default 1.0 — the value of FusionBench's
  configurations for both methods (an isotropic spectrum at the mean singular value of the sum already has
  roughly the norm of one task's update). Tune it on validation data when available.
- `common_space_fraction` (Iso-CTS) = f, default 0.8 (paper and official code).

Numerical rank (see `svd_ops`): components below the float32 rank tolerance are dropped, and σ̄ is the mean
over the numerically non-zero components. For full-rank matrices (real task vectors) this is exactly the
paper's σ̄; for a rank-deficient sum (e.g. a single rank-1 task vector) it keeps the update in its own
subspace instead of spreading σ̄ over arbitrary completion vectors, so Iso-C of one rank-1 τ returns α τ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.merging.registry import Delta, register
from symerge.merging.svd_ops import (
    is_matrix,
    orthogonalized_product,
    other_side,
    rank_tolerance,
    symmetric_spectrum,
    top_svd,
)
from symerge.taskvectors import TaskVectors


def iso_c_matrix(summed: Tensor) -> Tensor:
    """σ̄ U Vᵀ for one float32 matrix M (numerically non-zero components only)."""
    sigma, vecs, left = symmetric_spectrum(summed)
    keep = sigma > rank_tolerance(sigma[0], tuple(summed.shape))
    if not bool(keep.any()):
        return torch.zeros_like(summed)
    sigma, vecs = sigma[keep], vecs[:, keep]
    other = other_side(summed, vecs, sigma, left)  # orthonormal columns, float64
    sigma_bar = float(sigma.mean())
    if left:  # U = vecs, V = other
        return (vecs.float() * sigma_bar) @ other.float().mT
    return (other.float() * sigma_bar) @ vecs.float().mT


def cts_split(rank: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, s): common-subspace size and per-task subspace size, as in the official Iso-CTS code."""
    common = int(rank * fraction)
    task_total = round((rank - common) / num_tasks) * num_tasks
    while task_total > rank:
        task_total -= num_tasks
    common = rank - task_total
    return common, task_total // num_tasks


def iso_cts_matrix(vec: Tensor, fraction: float) -> Tensor:
    """Iso-CTS update for one stack of task matrices vec [K, m, n] (float32)."""
    num_tasks, m, n = vec.shape
    rank = min(m, n)
    common, per_task = cts_split(rank, num_tasks, fraction)
    summed = vec.sum(dim=0)
    sigma, vecs, left = symmetric_spectrum(summed)
    keep = sigma[:common] > rank_tolerance(sigma[0], (m, n))
    kept = int(keep.sum())  # a prefix: σ is sorted
    sig_c = sigma[:kept]
    if left:
        u_c = vecs[:, :kept]
        v_c = other_side(summed, u_c, sig_c, left)
    else:
        v_c = vecs[:, :kept]
        u_c = other_side(summed, v_c, sig_c, left)
    u_parts, s_parts, vh_parts = [u_c.float()], [sig_c.float()], [v_c.float().mT]
    if per_task > 0:
        # tolerance for task-specific components: relative to each task matrix's own scale (‖τ_t‖_F ≥ σ_max)
        reference = torch.linalg.vector_norm(vec.reshape(num_tasks, -1), dim=1)
        if left:
            # vecs is a complete orthonormal basis of R^m, so I − U_c U_cᵀ = U_rest U_restᵀ: project there.
            rest = vecs[:, kept:].float()  # [m, m − kept]
            y = rest.mT @ vec  # [K, m − kept, n]
            uy, s_ts, vh_ts = top_svd(y, per_task, reference)
            u_ts = rest @ uy  # [K, m, s]
        else:
            u_c32 = u_c.float()
            residual = vec - u_c32 @ (u_c32.mT @ vec)
            u_ts, s_ts, vh_ts = top_svd(residual, per_task, reference)
        width = u_ts.shape[-1]
        u_parts.append(u_ts.permute(1, 0, 2).reshape(m, num_tasks * width))
        s_parts.append(s_ts.reshape(-1))
        vh_parts.append(vh_ts.reshape(num_tasks * width, n))
    u_cat = torch.cat(u_parts, dim=1)
    s_cat = torch.cat(s_parts)
    vh_cat = torch.cat(vh_parts, dim=0)
    nonzero = s_cat > 0
    if not bool(nonzero.any()):
        return torch.zeros_like(summed)
    sigma_bar = s_cat[nonzero].double().mean()
    return orthogonalized_product(u_cat, nonzero.double() * sigma_bar, vh_cat)


@register("iso_c")
def iso_c(tv: TaskVectors, *, scaling_coef: float = 1.0) -> Delta:
    """Iso-C; `scaling_coef` = α (default 1.0)."""
    out: Delta = {}
    for key, vec in tv.items_float():
        if is_matrix(vec):
            out[key] = iso_c_matrix(vec.sum(dim=0)) * scaling_coef
        else:
            out[key] = vec.mean(dim=0) * scaling_coef
    return out


@register("iso_cts")
def iso_cts(tv: TaskVectors, *, scaling_coef: float = 1.0, common_space_fraction: float = 0.8) -> Delta:
    """Iso-CTS; `scaling_coef` = α (default 1.0), `common_space_fraction` = f (default 0.8)."""
    if not 0.0 <= common_space_fraction <= 1.0:
        raise ValidationError(f"iso_cts: common_space_fraction must be in [0, 1], got {common_space_fraction}")
    out: Delta = {}
    for key, vec in tv.items_float():
        if is_matrix(vec):
            out[key] = iso_cts_matrix(vec, common_space_fraction) * scaling_coef
        else:
            out[key] = vec.mean(dim=0) * scaling_coef
    return out
