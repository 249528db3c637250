"""A second "device" on a CPU-only machine, so device bugs fail tests without a GPU.

Tensors moved to the logical accelerator are wrapped in `OnAccelerator`: they report `device == meta` (the one
non-CPU device every torch build accepts without hardware), keep their real values in a CPU tensor, and compute on
the CPU. Every aten op checks its tensor arguments the way CUDA does: mixing accelerator and CPU tensors raises
"Expected all tensors to be on the same device", except where CUDA allows it (0-dim CPU scalars, CPU index
tensors for advanced indexing, cross-device copies). A `.to(ACCELERATOR)` / `device=ACCELERATOR` factory call
wraps; `.cpu()` unwraps. So a path that is correct here is correct on `cuda`, and values stay exact.

    with logical_accelerator() as device:
        adapt(..., config=TrainerConfig(device=device))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

ACCELERATOR = torch.device("meta")
aten = torch.ops.aten

# Ops that CUDA lets take CPU tensors beside device tensors.
CROSS_DEVICE_OPS = {aten._to_copy.default, aten.copy_.default, aten.copy.default}
CPU_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class DeviceMixError(RuntimeError):
    """Raised where CUDA would raise "Expected all tensors to be on the same device"."""


class OnAccelerator(torch.Tensor):
    """A CPU tensor that claims to live on the logical accelerator."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "OnAccelerator":
        wrapper = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=ACCELERATOR, requires_grad=elem.requires_grad,
        )
        wrapper.elem = elem
        return wrapper

    def __repr__(self) -> str:
        return f"OnAccelerator({self.elem!r})"

    @property
    def is_meta(self) -> bool:  # type: ignore[override]
        """Holds real data: torch code that skips "meta" tensors (load_state_dict, init) must treat it as data."""
        return False

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return dispatch(func, args, kwargs or {})


def where(value: Any) -> str | None:
    """'accelerator', 'cpu', or None (not a tensor, or a 0-dim CPU scalar that CUDA accepts anywhere)."""
    if isinstance(value, OnAccelerator):
        return "accelerator"
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return "cpu"
    return None


def places(tree: Any) -> set[str]:
    found: set[str] = set()

    def visit(value: Any) -> Any:
        place = where(value)
        if place is not None:
            found.add(place)
        return value

    tree_map(visit, tree)
    return found


def check_mix(func: Any, args: tuple, kwargs: dict) -> None:
    if func in CROSS_DEVICE_OPS:
        return
    if func in CPU_INDEX_OPS:
        indexed = places(args[0])
        indices = places(args[1])
        if indexed == {"cpu"} and "accelerator" in indices:
            raise DeviceMixError(f"{func}: indices on the accelerator for a CPU tensor")
        rest = places((args[2:], kwargs))
        if indexed | rest and len(indexed | rest) > 1:
            raise DeviceMixError(f"{func}: Expected all tensors to be on the same device, found {sorted(indexed | rest)}")
        return
    found = places((args, kwargs))
    if len(found) > 1:
        shapes = [tuple(a.shape) for a in tree_flat(args) if isinstance(a, torch.Tensor)]
        raise DeviceMixError(f"{func}: Expected all tensors to be on the same device, found cpu and the "
                             f"accelerator (tensor shapes {shapes})")


def tree_flat(tree: Any) -> list[Any]:
    out: list[Any] = []
    tree_map(lambda v: out.append(v), tree)
    return out


def target_is_accelerator(kwargs: dict) -> bool | None:
    """True / False for an explicit `device=` kwarg, None when the op has none."""
    device = kwargs.get("device")
    if device is None:
        return None
    return torch.device(device).type == ACCELERATOR.type


def dispatch(func: Any, args: tuple, kwargs: dict) -> Any:
    check_mix(func, args, kwargs)
    explicit = target_is_accelerator(kwargs)
    on_accelerator = explicit if explicit is not None else "accelerator" in places((args, kwargs))
    if func in (aten.copy_.default,) or func._schema.name.endswith("_"):
        on_accelerator = isinstance(args[0], OnAccelerator)
    plain_args, plain_kwargs = tree_map(lambda v: v.elem if isinstance(v, OnAccelerator) else v, (args, kwargs))
    if explicit is not None:
        plain_kwargs["device"] = torch.device("cpu")
    out = func(*plain_args, **plain_kwargs)
    first = func._schema.arguments[0] if func._schema.arguments else None
    if first is not None and first.alias_info is not None and first.alias_info.is_write:
        return args[0]  # in-place: the wrapper's CPU tensor was mutated, keep the wrapper's identity
    if not on_accelerator:
        return out
    return tree_map(lambda v: OnAccelerator(v) if isinstance(v, torch.Tensor) and not isinstance(v, OnAccelerator) else v,
                    out)


class LogicalAcceleratorMode(TorchDispatchMode):
    """Routes plain-tensor ops too, so `.to(ACCELERATOR)` and `torch.zeros(..., device=ACCELERATOR)` wrap."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return dispatch(func, args, kwargs or {})


@contextlib.contextmanager
def logical_accelerator() -> Iterator[str]:
    """Run the body with the logical accelerator available as a device name symerge accepts."""
    import symerge.devices as devices

    previous = devices.EXTRA_DEVICE_TYPES
    devices.EXTRA_DEVICE_TYPES = previous | {ACCELERATOR.type}
    try:
        with LogicalAcceleratorMode():
            yield str(ACCELERATOR)
    finally:
        devices.EXTRA_DEVICE_TYPES = previous
