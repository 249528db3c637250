"""EMR-merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024).

Elect, Mask & Rescale. With task vectors τ_1..τ_K:
1. Elect a unified task vector: γ_uni = sgn(Σ_t τ_t) (entries whose sum is not > 0 get −1, as in the
   official code), and per entry ε_uni = max_t { |τ_t| : τ_t · γ_uni > 0 } (0 where no task agrees);
   τ_uni = γ_uni ⊙ ε_uni.
2. Task-specific masks: M_t = (τ_t ⊙ τ_uni > 0).
3. Task-specific rescalers: λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|.
At inference task t uses θ_t = θ_pre + λ_t · M_t ⊙ τ_uni, so the result is per task (`PerTaskDelta`:
`per_task[t]` is that update, `shared` is τ_uni, `extras["masks"][key]` the boolean masks stacked [K, *shape] in
task order, `extras["rescalers"][t]` the λ_t). `merge()` returns one state dict per task; suites evaluate each
task with its own state dict, and reports must say so (EMR stores K masks + K scalars besides the shared model).

Option `rescaler_norm` chooses how the sums in step 3 run over the task vector:
- "tensor_mean" (default) — the official code (and FusionBench): Σ over tensors of the per-tensor mean of
  |·|, i.e. λ_t = Σ_l mean|τ_t,l| / Σ_l mean|M_t,l ⊙ τ_uni,l|; this produced the paper's numbers;
- "global" — the paper's equation: sums over every entry of the whole task vector.
EMR has no hyper-parameter tuned on validation data. A rescaler whose denominator is 0 (the task agrees with
τ_uni nowhere) is set to 0: that task's update is zero either way.
"""

from __future__ import annotations

import torch

from symerge.errors import ValidationError
from symerge.merging.registry import PerTaskDelta, register
from symerge.taskvectors import TaskVectors


@register("emr", per_task=True)
def emr(tv: TaskVectors, *, rescaler_norm: str = "tensor_mean") -> PerTaskDelta:
    """EMR-merging; returns one update per task plus the shared τ_uni, masks and rescalers."""
    if rescaler_norm not in ("tensor_mean", "global"):
        raise ValidationError(f"emr: rescaler_norm must be 'tensor_mean' or 'global', got '{rescaler_norm}'")
    num_tasks = tv.num_tasks
    unified: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    numer = torch.zeros(num_tasks, dtype=torch.float64)
    denom = torch.zeros(num_tasks, dtype=torch.float64)
    for key, vec in tv.items_float():
        flag = torch.where(vec.sum(dim=0) > 0, 1.0, -1.0)
        agree = vec * flag > 0  # [K, *shape]
        uni = (vec.abs() * agree).amax(dim=0) * flag
        unified[key] = uni
        masks[key] = agree
        flat_abs = vec.abs().reshape(num_tasks, -1).double()
        flat_sel = (uni.abs() * agree).reshape(num_tasks, -1).double()
        if rescaler_norm == "tensor_mean":
            if flat_abs.shape[1] > 0:
                numer += flat_abs.mean(dim=1)
                denom += flat_sel.mean(dim=1)
        else:
            numer += flat_abs.sum(dim=1)
            denom += flat_sel.sum(dim=1)
    rescale = torch.where(denom > 0, numer / torch.where(denom > 0, denom, 1.0), 0.0)
    per_task = {
        task: {key: uni * masks[key][t] * float(rescale[t]) for key, uni in unified.items()}
        for t, task in enumerate(tv.tasks)
    }
    return PerTaskDelta(
        per_task=per_task,
        shared=unified,
        extras={"masks": masks, "rescalers": {task: float(rescale[t]) for t, task in enumerate(tv.tasks)}},
    )
