"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

θ = θ_pre + λ Σ_k τ_k, with λ = `scaling_coef` (paper's validation-chosen value; 0.3 is the common default
for 8 CLIP tasks, as in the SyMerge and AdaMerging papers).
"""

from __future__ import annotations

from symerge.merging.registry import Delta, register
from symerge.taskvectors import TaskVectors


@register("task_arithmetic")
def task_arithmetic(tv: TaskVectors, *, scaling_coef: float = 0.3) -> Delta:
    """Sum of task vectors scaled by `scaling_coef` (λ)."""
    return {key: vec.sum(dim=0) * scaling_coef for key, vec in tv.items_float()}
