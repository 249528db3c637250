"""Where computation runs: one check that a device exists (before any download or training) and the
mixed-precision context of the adaptive paths.

Every config that names a device validates it through `DeviceName`, so `--device cuda` on a machine without CUDA
fails in the config, not after loading models.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, model_validator
from torch import Tensor, nn

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
# Device types accepted without an availability probe (the test suite's logical accelerator adds "meta").
EXTRA_DEVICE_TYPES: frozenset[str] = frozenset()


def device_problem(name: str) -> str | None:
    """Why `name` cannot be used here (one line), or None when it can."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        return f"'{name}' is not a device; use cpu, cuda, cuda:N or mps"
    if device.type in EXTRA_DEVICE_TYPES or device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"'{name}' requested but CUDA is not available on this machine (torch {torch.__version__})"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"'{name}' requested but this machine has {count} CUDA device(s)"
        return None
    if device.type == "mps":
        return None if torch.backends.mps.is_available() else f"'{name}' requested but MPS is not available"
    if device.type == "meta":
        return "'meta' holds no data; use cpu, cuda, cuda:N or mps"
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return None
    return f"'{name}' requested but no {device.type} device is available"


def check_device(name: str) -> str:
    """Pydantic validator: the device name unchanged, or a ValueError with one clear line."""
    problem = device_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


DeviceName = Annotated[str, AfterValidator(check_device)]


def check_precision(precision: str, device: str) -> str | None:
    """Why `precision` cannot run on `device`, or None."""
    device_type = torch.device(device).type
    if precision == "fp16" and device_type == "cpu":
        return "precision 'fp16' needs a GPU (CPU autocast has no fp16 GradScaler path); use 'bf16' or 'fp32' on the CPU"
    if precision != "fp32" and device_type not in AUTOCAST_DEVICE_TYPES:
        return f"precision '{precision}' is not supported on device '{device}'; use 'fp32'"
    return None


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the merged forward and the expert pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Turn autocast off (e.g. while building θ = θ_pre + Σ λ τ, which must stay fp32 under mixed precision)."""
    if device.type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def grad_scaler(device: str | torch.device, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's exponent range)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type if device_type in AUTOCAST_DEVICE_TYPES else "cpu",
                                enabled=precision == "fp16")


def floating_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating tensor (inputs are cast to it), float32 if it has none."""
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def module_on(module: nn.Module, device: str | torch.device | None = None,
              replace: Mapping[str, Tensor] | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A structural copy of `module` whose tensors are the originals moved to `device` (shared where already there),
    or `replace[name]` (moved too) for the names it holds, e.g. merged weights.

    Unlike `module.to(device)` it never moves or re-flags the caller's module, so an encoder shared by several
    methods (or owned by the user) stays where it was; only tensors not yet on `device` are copied, and replaced
    tensors are never copied from the original. `dtype` casts the floating tensors (e.g. bf16 heads trained in fp32).
    """
    replace = replace or {}

    def moved(name: str, tensor: Tensor) -> Tensor:
        source = replace.get(name, tensor).detach()
        if dtype is not None and source.is_floating_point():
            source = source.to(dtype)
        return source if device is None else source.to(device)

    memo: dict[int, Any] = {}
    for name, tensor in module.named_parameters():
        memo[id(tensor)] = nn.Parameter(moved(name, tensor), requires_grad=tensor.requires_grad)
    for name, tensor in module.named_buffers():
        memo[id(tensor)] = moved(name, tensor)
    return copy.deepcopy(module, memo)


class RunsOn(BaseModel):
    """The `device` and `precision` fields of a run's config, checked together when the config is made."""

    device: DeviceName = "cpu"
    precision: Precision = "fp32"

    @model_validator(mode="after")
    def precision_fits_device(self) -> "RunsOn":
        problem = check_precision(self.precision, self.device)
        if problem is not None:
            raise ValueError(problem)
        return self
