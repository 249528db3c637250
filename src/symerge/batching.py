"""Batches of task inputs: a tensor [N, ...] or a dict of tensors [N, ...] (e.g. tokenized text).

A leaf module (torch only): `result`, `evaluation` and `adaptive` all batch through it, so it must import nothing
of symerge's own (importing `symerge.adaptive` from here made result <-> adaptive a cycle).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

Inputs = Union[Tensor, Mapping[str, Tensor]]


def num_samples(inputs: Inputs) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    sizes = {int(v.shape[0]) for v in inputs.values()}
    if len(sizes) != 1:
        raise ValueError(f"input tensors disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop padding columns beyond the longest sequence of the batch (saves time on short texts)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    length = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    length = max(length, 1)
    return {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}


def take(inputs: Inputs, index: Tensor | slice, device: torch.device | str | None = None) -> Inputs:
    """Select samples (and move them to `device`)."""
    if isinstance(inputs, Tensor):
        out = inputs[index]
        return out.to(device) if device is not None else out
    batch = {k: v[index] for k, v in inputs.items()}
    batch = trim_padding(batch)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def call_module(module: nn.Module, inputs: Inputs, params: Mapping[str, Tensor] | None = None) -> Any:
    """Run `module` on a tensor or keyword inputs, optionally with substituted parameters (functional)."""
    args: tuple[Any, ...] = (inputs,) if isinstance(inputs, Tensor) else ()
    kwargs: dict[str, Any] = {} if isinstance(inputs, Tensor) else dict(inputs)
    if params is None:
        return module(*args, **kwargs)
    return functional_call(module, dict(params), args, kwargs, strict=False)


def batch_indices(num: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, num)) for i in range(0, num, batch_size)]


def length_order(inputs: Inputs) -> Tensor | None:
    """Sample order by sequence length (for token inputs), so each batch pads only to similar lengths."""
    if isinstance(inputs, Tensor) or "attention_mask" not in inputs:
        return None
    return torch.argsort(inputs["attention_mask"].sum(dim=1), stable=True)


@torch.no_grad()
def encode_all(
    module: nn.Module, inputs: Inputs, params: Mapping[str, Tensor] | None = None, batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Run `module` (optionally with substituted weights) over all inputs in batches; float32 on CPU.

    Token inputs are processed in length order (padding trimmed per batch) and returned in the original order.
    """
    order = length_order(inputs)
    source = inputs if order is None else take(inputs, order)
    outs = [call_module(module, take(source, index, device), params).float().cpu()
            for index in batch_indices(num_samples(source), batch_size)]
    result = torch.cat(outs)
    if order is None:
        return result
    restored = torch.empty_like(result)
    restored[order] = result
    return restored
