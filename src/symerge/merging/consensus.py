"""TALL masks and Consensus merging (Wang et al., "Localizing Task Information for Improved Model Merging and
Compression", ICML 2024).

τ_MTL is the multi-task vector of the base method: task arithmetic's sum Σ_t τ_t (`base="task_arithmetic"`)
or TIES-merging's vector (`base="ties"`: top-`ties_density` trim over the whole task vector, sign election,
disjoint *sum*, as in the official code).

TALL mask of task t (which entries of τ_MTL carry task t's information):
    m_t = 1{ |τ_t| > λ_t · |τ_MTL − τ_t| }
(the paper writes ≥; the official code uses >, which differs only on exact ties, e.g. entries where τ_t = 0
and τ_MTL = τ_t are not attributed to task t).

Consensus mask and merge: keep the entries used by at least k tasks (removes "selfish" weights used by one task
and "catastrophic" ones used by none),
    m_cons = 1{ Σ_t m_t ≥ k },   θ = θ_pre + α · (m_cons ⊙ τ_MTL).

Options → symbols:
- `k` = k, default 2 (paper: removes catastrophic and selfish weights).
- `tall_lambda` = λ_t: one float for every task, a sequence in task order, or a dict task -> λ. The paper picks
  λ_t per task from {0.2, …, 0.6} on validation data; without validation data the default is 0.6 (the top of
  that grid, FusionBench's default): a larger λ_t makes each mask sparser.
- `scaling_coef` = α, default 0.3 — chosen on validation data in the official code (grid 0.1, 0.2, …, 1.0);
  0.3 is the task arithmetic default for 8 ViT tasks used across this package.
- `base`, `ties_density` as above (official TIES settings: 0.2).
`tall_masks(tv, ...)` exposes the per-task masks themselves (for TALL-mask per-task evaluation or analysis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.merging.registry import Delta, register
from symerge.merging.ties import ties_delta
from symerge.taskvectors import TaskVectors

TallLambda = float | Sequence[float] | Mapping[str, float]


def multi_task_vector(tv: TaskVectors, base: str = "task_arithmetic", ties_density: float = 0.2) -> Delta:
    """τ_MTL of the base method (scaling 1)."""
    if base == "task_arithmetic":
        return {key: vec.sum(dim=0) for key, vec in tv.items_float()}
    if base == "ties":
        return ties_delta(tv, ties_density, 1.0, "global", "sum")
    raise ValidationError(f"consensus: base must be 'task_arithmetic' or 'ties', got '{base}'")


def lambda_per_task(tv: TaskVectors, tall_lambda: TallLambda) -> Tensor:
    """λ_t as a float32 tensor [K] (one value for all tasks, a sequence in task order, or a task -> λ dict)."""
    if isinstance(tall_lambda, Mapping):
        missing = [t for t in tv.tasks if t not in tall_lambda]
        if missing:
            raise ValidationError(f"consensus: tall_lambda has no value for task '{missing[0]}'")
        values = [float(tall_lambda[t]) for t in tv.tasks]
    elif isinstance(tall_lambda, (int, float)):
        values = [float(tall_lambda)] * tv.num_tasks
    else:
        values = [float(v) for v in tall_lambda]
        if len(values) != tv.num_tasks:
            raise ValidationError(f"consensus: tall_lambda has {len(values)} values for {tv.num_tasks} tasks")
    if any(v < 0 for v in values):
        raise ValidationError(f"consensus: tall_lambda must be >= 0, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def tall_masks_from(tv: TaskVectors, mtl: Delta, lambdas: Tensor) -> dict[str, Tensor]:
    masks: dict[str, Tensor] = {}
    for key, vec in tv.items_float():
        lam = lambdas.reshape((-1,) + (1,) * (vec.dim() - 1))
        masks[key] = vec.abs() > lam * (mtl[key].unsqueeze(0) - vec).abs()
    return masks


def tall_masks(
    tv: TaskVectors,
    *,
    tall_lambda: TallLambda = 0.6,
    base: str = "task_arithmetic",
    ties_density: float = 0.2,
) -> dict[str, Tensor]:
    """Per-task TALL masks m_t, as a dict key -> bool tensor [K, *shape] (tasks in `tv.tasks` order)."""
    return tall_masks_from(tv, multi_task_vector(tv, base, ties_density), lambda_per_task(tv, tall_lambda))


@register("consensus")
def consensus(
    tv: TaskVectors,
    *,
    k: int = 2,
    tall_lambda: TallLambda = 0.6,
    scaling_coef: float = 0.3,
    base: str = "task_arithmetic",
    ties_density: float = 0.2,
) -> Delta:
    """Consensus merging: α · (1{Σ_t m_t ≥ k} ⊙ τ_MTL)."""
    if int(k) != k or k < 0:
        raise ValidationError(f"consensus: k must be a non-negative integer, got {k}")
    mtl = multi_task_vector(tv, base, ties_density)
    masks = tall_masks_from(tv, mtl, lambda_per_task(tv, tall_lambda))
    return {key: mtl[key] * (masks[key].sum(dim=0) >= k) * scaling_coef for key in mtl}
