"""Small pure tensor operations of the merge methods: the readable spec of what the fused streaming kernels compute
(`tests/test_ties_zero_votes.py` checks `ties.ties_block` against `magnitude_threshold`, `elect_sign` and
`disjoint_merge`), plus DARE's random drop.

The fused kernels run block by block over a τ source (`merging.stream`, `merging.ties`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def keep_count(numel: int, density: float) -> int:
    """Entries kept when keeping a `density` fraction (TIES: int(d · density))."""
    return int(numel * density)


def magnitude_threshold(abs_values: Tensor, density: float) -> Tensor | None:
    """Threshold t so that |x| >= t keeps the top `density` share of `abs_values` (1-D): t is the k-th largest.

    Exactly k = int(n · density) entries are kept (as in the TIES paper, PEFT and mergekit), except that ties at
    the threshold are all kept (TIES' `>= kthvalue` rule). The official TIES code takes `kthvalue(n − k)`, the
    (k+1)-th largest, and so keeps one entry more. Returns None when everything is kept.
    """
    numel = abs_values.numel()
    kept = keep_count(numel, density)
    if kept >= numel:
        return None
    if kept <= 0:
        return torch.tensor(float("inf"))
    return abs_values.kthvalue(numel - kept + 1).values


def elect_sign(stacked: Tensor, fallback: Tensor | float = 1.0) -> Tensor:
    """TIES sign election by summed mass: sign(Σ_k τ_k); exact zeros take `fallback` (the majority sign)."""
    sign = torch.sign(stacked.sum(dim=0))
    return torch.where(sign == 0, torch.as_tensor(fallback, dtype=sign.dtype), sign)


def disjoint_merge(stacked: Tensor, sign: Tensor, reduce: str = "mean") -> Tensor:
    """Combine only the entries whose sign agrees with the elected sign (±1); `mean` over agreeing tasks or `sum`.

    With γ = ±1, the agreeing entries are those with τ_k·γ > 0, so Σ_agreeing τ_k = γ · Σ_k max(τ_k·γ, 0): one
    float temporary of [K, ...] instead of boolean masks and masked copies.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"disjoint merge reduce must be 'mean' or 'sum', got '{reduce}'")
    agree = (stacked * sign.unsqueeze(0)).clamp_min_(0)
    total = agree.sum(dim=0)
    if reduce == "mean":
        total.div_(agree.sign_().sum(dim=0).clamp_min_(1))
    return total.mul_(sign)


# --------------------------------------------------------------------------------------------------------------
# DARE's random stream
# --------------------------------------------------------------------------------------------------------------

DRAW_LEVELS = 1 << 31  # an int32 `random_()` draw is uniform on [0, 2^31)


def drop_level(drop_rate: float) -> int:
    """An entry survives iff its int32 draw is >= ceil(p · 2^31), i.e. with probability 1 − p (to 2^-31)."""
    return min(math.ceil(drop_rate * DRAW_LEVELS), DRAW_LEVELS)


def keep_mask(draws: Tensor, drop_rate: float, out: Tensor | None = None) -> Tensor:
    """1.0 where the int32 `draws` keep their entry, 0.0 where they drop it (float32)."""
    level = drop_level(drop_rate)
    if out is None:
        out = torch.empty(draws.shape, device=draws.device)
    if level >= DRAW_LEVELS:
        return out.zero_()
    return torch.ge(draws, level, out=out)


def random_drop(stacked: Tensor, drop_rate: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p).

    Draws one int32 `random_()` per entry of `stacked` (C order) from `generator`; see `dare` for the stream.
    """
    if drop_rate <= 0.0:
        return stacked.clone()
    if drop_rate >= 1.0:
        return torch.zeros_like(stacked)
    draws = torch.empty(stacked.shape, dtype=torch.int32, device=stacked.device).random_(generator=generator)
    kept = stacked * keep_mask(draws, drop_rate)
    return kept / (1.0 - drop_rate) if rescale else kept
