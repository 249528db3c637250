"""Batching helpers, kept importable from here; they live in `symerge.batching` (no import cycle with `result`)."""

from symerge.batching import (
    Inputs,
    batch_indices,
    call_module,
    encode_all,
    length_order,
    num_samples,
    take,
    trim_padding,
)

__all__ = ["Inputs", "batch_indices", "call_module", "encode_all", "length_order", "num_samples", "take", "trim_padding"]
