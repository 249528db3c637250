"""Tensors to and from safetensors files, and weights without an architecture (`TensorStore`).

A low layer (torch, safetensors, `atomic`, `errors`): the model families, `export` and the pipeline all read and
write tensor files through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from symerge.atomic import share_modes
from symerge.errors import SymergeError, ValidationError


def save_tensors(state: Mapping[str, Tensor], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)
    share_modes(Path(path))  # safetensors writes 0600; give the file the modes of a plain write


def load_tensors(path: Path, what: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ValidationError(f"{what}: '{path}' is missing")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type for corrupt files
        raise ValidationError(f"{what}: '{path}' is not a valid safetensors file (corrupt or truncated): {err}") from None


def check_safetensors_file(path: Path, owner: str) -> None:
    """Open the header (cheap): garbage or a truncated file is reported by name instead of failing mid-load."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for every corruption
        raise ValidationError(f"{owner}: '{path}' is not a valid safetensors file (corrupt or truncated): {err}") from None
    if not keys:
        raise ValidationError(f"{owner}: '{path}' holds no tensors")


def safetensors_files(path: Path, owner: str) -> list[Path]:
    """A .safetensors file, or every .safetensors file of a directory (sharded checkpoints), headers checked."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValidationError(f"{owner}: '{path}' holds no .safetensors file")
    elif path.suffix != ".safetensors":
        raise ValidationError(f"{owner}: '{path}' is not a .safetensors file (pickled checkpoints are never loaded: "
                              "convert them with `symerge convert`)")
    else:
        files = [path]
    for file in files:
        check_safetensors_file(file, owner)
    return files


def read_safetensors(path: Path, owner: str) -> dict[str, Tensor]:
    """A .safetensors file, or every .safetensors file of a directory (sharded checkpoints)."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in safetensors_files(path, owner):
        try:
            part = load_file(str(file))
        except Exception as err:  # noqa: BLE001
            raise ValidationError(f"{owner}: '{file}' is not a valid safetensors file (corrupt or truncated): {err}") from None
        clash = sorted(set(part) & set(state))
        if clash:
            raise ValidationError(f"{owner}: tensor '{clash[0]}' appears in two files of '{path}'")
        state.update(part)
    return state


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors cast to `dtype` (model.dtype; None: as stored); integer buffers untouched."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def head_state(head: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in head.state_dict().items()}


class TensorStore(nn.Module):
    """Tensors under their dotted names, without an architecture (state_dict family): weights only, no forward."""

    def __init__(self, state: Mapping[str, Tensor]):
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                child = module._modules.get(part)
                if child is None:
                    if hasattr(module, part):
                        raise ValidationError(f"tensor name '{key}' clashes with another tensor's name")
                    child = nn.Module()
                    module.add_module(part, child)
                module = child
            if leaf in module._modules:
                raise ValidationError(f"tensor name '{key}' clashes with another tensor's name")
            if value.is_floating_point():
                module.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
            else:
                module.register_buffer(leaf, value.detach().clone())

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        raise SymergeError("this model has no architecture (state_dict family): load its weights into your own model")
