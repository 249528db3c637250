"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

θ = θ_pre + λ Σ_k τ_k, with λ = `scaling_coef` (paper's validation-chosen value; 0.3 is the common default
for 8 CLIP tasks, as in the SyMerge and AdaMerging papers).
"""

from __future__ import annotations

import torch

from symerge.merging.registry import register_stream
from symerge.merging.stream import TauSource, run_blockwise


def task_arithmetic_stream(source: TauSource, sink, *, scaling_coef: float = 0.3) -> None:
    """Separable form: λ Σ_k τ_k, block by block."""
    run_blockwise(source, sink, lambda tau, out: torch.sum(tau, dim=0, out=out).mul_(scaling_coef))


task_arithmetic = register_stream("task_arithmetic", task_arithmetic_stream,
                                  "Sum of task vectors scaled by `scaling_coef` (λ).")
