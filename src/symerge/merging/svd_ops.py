"""Batched spectral helpers for the subspace merge methods (TSV-M, Iso-C, Iso-CTS).

All functions are pure and work on float32 inputs. Where accuracy needs it (inverse square roots of Gram
matrices, products with 1/σ) they switch to float64 internally; results come back as float32.

Why Gram matrices instead of `torch.linalg.svd` on every task matrix: on CPU a float32 SVD of a 768×3072
matrix takes ~0.6 s on one thread, while its Gram matrix (768×768, one GEMM) plus a symmetric eigensolver takes
~0.06 s. The top singular subspace is read off the Gram eigenvectors and then refined by a Rayleigh–Ritz step
(an exact SVD of the k×n projection), so singular values and vectors are computed from the matrix itself, not
from its square.

Numerical rank: singular components with σ ≤ max(m, n) · eps_float32 · σ_ref (the tolerance `numpy.linalg.
matrix_rank` and `torch.linalg.matrix_rank` use for a float32 matrix, σ_ref its largest singular value unless
stated) are rounding noise of the float32 inputs. They are returned with σ = 0 and zero vectors: an SVD would
return arbitrary orthonormal completions there, which the isotropic methods would otherwise up-weight to the
mean singular value and TSV-M would mix into the orthogonalisation. For full-rank task matrices (the usual case)
nothing is dropped and the results equal the papers' formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


def rank_tolerance(reference: Tensor | float, shape: tuple[int, ...]) -> Tensor | float:
    """σ threshold below which a component of a float32 matrix of `shape` is numerically zero."""
    return reference * max(shape) * EPS32


def top_svd(x: Tensor, k: int, reference: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of every matrix of a float32 stack x: [B, m, n].

    Returns U [B, m, k], S [B, k] (descending), Vh [B, k, n] with x_b ≈ Σ_i S[b,i] U[b,:,i] Vh[b,i,:] on the
    top-k subspace. Components below the float32 rank tolerance (relative to `reference[b]`, default the
    largest singular value of x_b) come back as exact zeros (σ, u and v).

    Method: eigenvectors of the Gram matrix on the smaller side give the top-k subspace, then a Rayleigh–Ritz
    step (SVD of the k×n or m×k projection) gives the triplets.
    """
    batch, m, n = x.shape
    k = min(k, m, n)
    if k <= 0:
        return x.new_zeros(batch, m, 0), x.new_zeros(batch, 0), x.new_zeros(batch, 0, n)
    if m <= n:
        _, vecs = torch.linalg.eigh(x @ x.mT)  # ascending eigenvalues
        basis = vecs[..., -k:].flip(-1)  # [B, m, k]
        p, s, vh = torch.linalg.svd(basis.mT @ x, full_matrices=False)  # [B,k,k], [B,k], [B,k,n]
        u = basis @ p
    else:
        _, vecs = torch.linalg.eigh(x.mT @ x)
        basis = vecs[..., -k:].flip(-1)  # [B, n, k]
        u, s, ph = torch.linalg.svd(x @ basis, full_matrices=False)  # [B,m,k], [B,k], [B,k,k]
        vh = ph @ basis.mT
    ref = s[:, :1] if reference is None else reference.reshape(batch, 1).to(s.dtype)
    keep = s > rank_tolerance(ref, (m, n))
    s = s * keep
    u = u * keep.unsqueeze(1)
    vh = vh * keep.unsqueeze(2)
    return u, s, vh


def symmetric_spectrum(matrix: Tensor) -> tuple[Tensor, Tensor, bool]:
    """Full spectrum of one float32 matrix M [m, n] through the float64 Gram matrix of its smaller side.

    Returns (σ descending float64 [p], eigenvectors float64 [p, p], left) where p = min(m, n): if `left`, the
    eigenvectors are M's left singular vectors (p = m ≤ n, a complete basis of R^m); otherwise its right ones.
    """
    m, n = matrix.shape
    m64 = matrix.double()
    left = m <= n
    gram = m64 @ m64.mT if left else m64.mT @ m64
    evals, evecs = torch.linalg.eigh(gram)
    sigma = evals.flip(-1).clamp(min=0).sqrt()
    return sigma, evecs.flip(-1), left


def other_side(matrix: Tensor, vecs: Tensor, sigma: Tensor, left: bool) -> Tensor:
    """The singular vectors on the other side: V = Mᵀ U / σ (left) or U = M V / σ (right), in float64.

    `sigma` must be strictly positive (pass only the numerically non-zero components).
    """
    m64 = matrix.double()
    return (m64.mT @ vecs) / sigma if left else (m64 @ vecs) / sigma


def inverse_sqrt_psd(gram: Tensor, rtol: float) -> Tensor:
    """(AᵀA)^{-1/2} on the numerical range of A (pseudo-inverse), from the float64 Gram matrix AᵀA.

    Directions where A's singular value √λ ≤ rtol · √λ_max get weight 0.
    """
    evals, evecs = torch.linalg.eigh(gram)
    sv = evals.clamp(min=0).sqrt()
    keep = sv > sv.max().clamp(min=torch.finfo(sv.dtype).tiny) * rtol
    inv = torch.where(keep, 1.0 / torch.where(keep, sv, torch.ones_like(sv)), torch.zeros_like(sv))
    return (evecs * inv) @ evecs.mT


def orthogonalized_product(u_cat: Tensor, weights: Tensor, vh_cat: Tensor) -> Tensor:
    """polar(U_cat) · diag(weights) · polar(Vh_cat): the TSV-M / Iso-CTS reconstruction.

    U_cat [m, c] and Vh_cat [c, n] hold concatenated (not mutually orthogonal) singular vectors. Their
    orthogonal polar factors U⊥ = P Qᵀ (from U_cat = P S Qᵀ) and V⊥ᵀ likewise are computed as
    U⊥ = U_cat (U_catᵀ U_cat)^{-1/2} and V⊥ᵀ = (Vh_cat Vh_catᵀ)^{-1/2} Vh_cat in float64, which is the same
    matrix. Zero columns / rows (dropped components) stay zero.
    """
    m, c = u_cat.shape
    n = vh_cat.shape[1]
    if c == 0:
        return u_cat.new_zeros(m, n)
    rtol = max(m, n, c) * EPS32
    u64 = u_cat.double()
    vh64 = vh_cat.double()
    u_orth = u64 @ inverse_sqrt_psd(u64.mT @ u64, rtol)  # [m, c]
    vh_orth = inverse_sqrt_psd(vh64 @ vh64.mT, rtol) @ vh64  # [c, n]
    return ((u_orth * weights.double()).float()) @ vh_orth.float()


def is_matrix(vec: Tensor) -> bool:
    """Stacked task vectors [K, m, n] of a 2-D parameter (the only tensors the spectral methods decompose)."""
    return vec.dim() == 3 and min(vec.shape[1:]) > 0
