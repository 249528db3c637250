"""Weight averaging (Wortsman et al., "Model soups", ICML 2022): θ = (1/K) Σ_k θ_k = θ_pre + mean_k τ_k."""

from __future__ import annotations

from symerge.merging.registry import Delta, register
from symerge.taskvectors import TaskVectors


@register("weight_averaging")
def weight_averaging(tv: TaskVectors) -> Delta:
    """Mean of the experts; no options."""
    return {key: vec.mean(dim=0) for key, vec in tv.items_float()}
