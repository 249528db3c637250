"""Weight averaging (Wortsman et al., "Model soups", ICML 2022): θ = (1/K) Σ_k θ_k = θ_pre + mean_k τ_k."""

from __future__ import annotations

import torch

from symerge.merging.registry import register_stream
from symerge.merging.stream import TauSource, run_blockwise


def weight_averaging_stream(source: TauSource, sink) -> None:
    """Separable form: mean_k τ_k, block by block."""
    run_blockwise(source, sink, lambda tau, out: torch.mean(tau, dim=0, out=out))


weight_averaging = register_stream("weight_averaging", weight_averaging_stream, "Mean of the experts; no options.")
