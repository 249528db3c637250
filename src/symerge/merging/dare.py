"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): Drop And REscale, then merge.

Each task vector entry is dropped with probability p = `drop_rate` (paper default 0.9) and survivors are rescaled
by 1/(1−p), so E[τ̃] = τ. The sparsified vectors are then merged by `base`: "task_arithmetic" (λ = `scaling_coef`)
or "ties" (with `density`, `trim_scope`, `disjoint_merge` as in `ties`). Randomness comes from a torch Generator
seeded with `seed`; tensors are visited in state-dict order and tasks in order, so results are reproducible.
"""

from __future__ import annotations

import torch

from symerge.errors import ValidationError
from symerge.merging.ops import random_drop
from symerge.merging.registry import Delta, register
from symerge.merging.ties import ties_delta
from symerge.taskvectors import TaskVectors


def drop_and_rescale(tv: TaskVectors, drop_rate: float, seed: int) -> TaskVectors:
    """Return new task vectors with DARE applied independently per task and entry."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValidationError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")
    generator = torch.Generator().manual_seed(seed)
    return tv.map(lambda _key, vec: random_drop(vec, drop_rate, generator))


@register("dare")
def dare(
    tv: TaskVectors,
    *,
    drop_rate: float = 0.9,
    seed: int = 0,
    base: str = "task_arithmetic",
    scaling_coef: float = 0.3,
    density: float = 0.2,
    trim_scope: str = "global",
    disjoint_merge: str = "mean",
) -> Delta:
    """DARE sparsification followed by task arithmetic or TIES (`base`)."""
    if base not in ("task_arithmetic", "ties"):
        raise ValidationError(f"dare: base must be 'task_arithmetic' or 'ties', got '{base}'")
    dropped = drop_and_rescale(tv, drop_rate, seed)
    if base == "ties":
        return ties_delta(dropped, density, scaling_coef, trim_scope, disjoint_merge)
    return {key: vec.sum(dim=0) * scaling_coef for key, vec in dropped.items_float()}
