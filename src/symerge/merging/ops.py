"""Small pure tensor operations shared by merge methods (trim, sign election, disjoint merge, random drop)."""

from __future__ import annotations

from collections.abc import Mapping

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


def trim_per_tensor(stacked: Tensor, density: float) -> Tensor:
    """Zero all but the top-`density` magnitudes of each task's slice of one tensor ([K, *shape])."""
    flat = stacked.reshape(stacked.shape[0], -1)
    out = torch.empty_like(flat)
    for k in range(flat.shape[0]):
        threshold = magnitude_threshold(flat[k].abs(), density)
        out[k] = flat[k] if threshold is None else torch.where(flat[k].abs() >= threshold, flat[k], 0.0)
    return out.reshape(stacked.shape)


def global_thresholds(vectors: Mapping[str, Tensor], density: float) -> list[Tensor | None]:
    """Per task, the magnitude threshold over its WHOLE flattened task vector (all tensors together)."""
    if not vectors:
        return []
    num_tasks = next(iter(vectors.values())).shape[0]
    thresholds: list[Tensor | None] = []
    for k in range(num_tasks):
        abs_all = torch.cat([v[k].reshape(-1).abs().float() for v in vectors.values()])
        thresholds.append(magnitude_threshold(abs_all, density))
        del abs_all
    return thresholds


def trim_with_thresholds(stacked: Tensor, thresholds: list[Tensor | None]) -> Tensor:
    """Apply per-task magnitude thresholds to one tensor's stack."""
    out = stacked.clone()
    for k, threshold in enumerate(thresholds):
        if threshold is not None:
            out[k] = torch.where(stacked[k].abs() >= threshold, stacked[k], 0.0)
    return out


def elect_sign(stacked: Tensor, fallback: Tensor | float = 1.0) -> Tensor:
    """TIES sign election by summed mass: sign(Σ_k τ_k); exact zeros take `fallback` (the majority sign)."""
    sign = torch.sign(stacked.sum(dim=0))
    return torch.where(sign == 0, torch.as_tensor(fallback, dtype=sign.dtype), sign)


def disjoint_merge(stacked: Tensor, sign: Tensor, reduce: str = "mean") -> Tensor:
    """Combine only the entries whose sign agrees with the elected sign; `mean` over agreeing tasks or `sum`."""
    agree = torch.where(sign.unsqueeze(0) > 0, stacked > 0, stacked < 0)
    selected = stacked * agree
    total = selected.sum(dim=0)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / agree.sum(dim=0).clamp(min=1)
    raise ValueError(f"disjoint merge reduce must be 'mean' or 'sum', got '{reduce}'")


def random_drop(stacked: Tensor, drop_rate: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p)."""
    if drop_rate <= 0.0:
        return stacked.clone()
    if drop_rate >= 1.0:
        return torch.zeros_like(stacked)
    keep = torch.rand(stacked.shape, generator=generator) >= drop_rate
    kept = stacked * keep
    return kept / (1.0 - drop_rate) if rescale else kept
