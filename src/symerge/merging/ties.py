"""TIES-merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023).

Steps: (1) trim — keep the top-k% magnitudes of each task vector τ_k (`density` = k/100, paper default 0.2),
(2) elect sign — γ = sign(Σ_k τ̂_k) (summed mass), (3) disjoint merge — mean over tasks whose trimmed entry
agrees with γ, (4) θ = θ_pre + λ τ_m with λ = `scaling_coef`.

Where the peers disagree:
- `trim_scope="global"` (default, the TIES paper and its official code: top-k over the WHOLE flattened task
  vector); `"per_tensor"` trims each tensor separately (mergekit and PEFT).
- `disjoint_merge="mean"` (default, TIES paper / official code / mergekit / PEFT); `"sum"` reproduces
  FusionBench's default (sum of agreeing entries).
Entries where the summed mass is exactly zero take the majority sign: the sign of Σ γ, i.e. whether more entries
elected + than − (the official code's `resolve_zero_signs(..., "majority")`; +1 on a tie, like mergekit and
PEFT), counted over the same scope as trimming. Trimming keeps exactly int(n · density) entries per task (ties at
the threshold kept); the official code keeps one more.
"""

from __future__ import annotations

import torch

from symerge.errors import ValidationError
from symerge.merging.ops import disjoint_merge, elect_sign, global_thresholds, trim_per_tensor, trim_with_thresholds
from symerge.merging.registry import Delta, register
from symerge.taskvectors import TaskVectors


def check_ties_options(density: float, trim_scope: str, disjoint: str) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValidationError(f"ties: density must be in [0, 1], got {density}")
    if trim_scope not in ("global", "per_tensor"):
        raise ValidationError(f"ties: trim_scope must be 'global' or 'per_tensor', got '{trim_scope}'")
    if disjoint not in ("mean", "sum"):
        raise ValidationError(f"ties: disjoint_merge must be 'mean' or 'sum', got '{disjoint}'")


def ties_delta(tv: TaskVectors, density: float, scaling_coef: float, trim_scope: str, disjoint: str) -> Delta:
    """The TIES update Δ = λ · disjoint_merge(trim(τ)) for every merged tensor."""
    check_ties_options(density, trim_scope, disjoint)
    thresholds = global_thresholds(tv.vectors, density) if trim_scope == "global" else None
    trimmed: dict[str, torch.Tensor] = {}
    for key, vec in tv.items_float():
        trimmed[key] = trim_with_thresholds(vec, thresholds) if thresholds is not None else trim_per_tensor(vec, density)
    # Zero votes take the majority sign: the sign of Σ γ over the trim scope (positive minus negative elections).
    votes = {key: int(torch.sign(t.sum(dim=0)).sum()) for key, t in trimmed.items()}
    if trim_scope == "global":
        total_votes = sum(votes.values())
        fallbacks = {key: 1.0 if total_votes >= 0 else -1.0 for key in trimmed}
    else:
        fallbacks = {key: 1.0 if v >= 0 else -1.0 for key, v in votes.items()}
    return {
        key: disjoint_merge(t, elect_sign(t, fallbacks[key]), disjoint) * scaling_coef for key, t in trimmed.items()
    }


@register("ties")
def ties(
    tv: TaskVectors,
    *,
    density: float = 0.2,
    scaling_coef: float = 0.3,
    trim_scope: str = "global",
    disjoint_merge: str = "mean",
) -> Delta:
    """TIES-merging; see the module docstring for the options (k = density, λ = scaling_coef)."""
    return ties_delta(tv, density, scaling_coef, trim_scope, disjoint_merge)
