"""Weight averaging (Wortsman et al., "Model soups", ICML 2022): θ = (1/K) Σ_k θ_k = θ_pre + mean_k τ_k."""

from __future__ import annotations

import torch

from symerge.merging.ops import run_blockwise, stream_delta
from symerge.merging.registry import Delta, register
from symerge.taskvectors import TaskVectors, TauSource


def weight_averaging_stream(source: TauSource, sink) -> None:
    """Separable form: mean_k τ_k, block by block."""
    run_blockwise(source, sink, lambda tau, out: torch.mean(tau, dim=0, out=out))


@register("weight_averaging", stream=weight_averaging_stream)
def weight_averaging(tv: TaskVectors) -> Delta:
    """Mean of the experts; no options."""
    return stream_delta(weight_averaging_stream, tv)
