"""MagMax (Marczak et al., "MagMax: Leveraging Model Merging for Seamless Continual Learning", ECCV 2024).

Per parameter entry p, keep the task-vector value of largest magnitude across the K tasks:
    τ_MagMax[p] = τ_{i*}[p]  with  i* = argmax_i |τ_i[p]|,      θ = θ_pre + λ τ_MagMax.
Ties in |τ_i[p]| go to the first task in pool order (the official code's `argmax`).

Options → symbols: `scaling_coef` = λ, default 0.5 — the value of the official 8-dataset merging script
(`merge_8datasets.py`), which FusionBench also uses. λ = 1 gives the raw element-wise selection (MagMax of a
single task vector is then that task vector).
"""

from __future__ import annotations

import torch

from symerge.merging.registry import Delta, register
from symerge.taskvectors import TaskVectors


@register("magmax")
def magmax(tv: TaskVectors, *, scaling_coef: float = 0.5) -> Delta:
    """Element-wise maximum-magnitude selection across tasks, scaled by `scaling_coef` (λ)."""
    out: Delta = {}
    for key, vec in tv.items_float():
        # running selection over tasks: K element-wise passes (much faster than argmax over dim 0 on CPU);
        # a strict > keeps the first task on ties, like argmax
        best = vec[0].clone()
        best_abs = best.abs()
        for task_vec in vec[1:]:
            candidate = task_vec.abs()
            take = candidate > best_abs
            best = torch.where(take, task_vec, best)
            best_abs = torch.where(take, candidate, best_abs)
        out[key] = best * scaling_coef
    return out
