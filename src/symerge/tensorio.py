"""Tensors to and from safetensors files, and weights without an architecture (`TensorStore`).

A low layer (torch, safetensors, `atomic`, `errors`): the model families, `export` and the pipeline all read and
write tensor files through it.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


# --- lazy reading: one tensor (or one slice of it) at a time, straight from the file -------------------------------
# Plain reads, not safetensors' mmap: pages touched through a mapping stay in the process's resident memory until the
# file is closed, so reading K experts key by key through open handles would end up holding all K models.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file: byte range of its data, stored dtype and shape."""

    file: Path
    start: int  # absolute byte offset of the tensor's data
    stop: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self, first: int = 0, last: int | None = None) -> Tensor:
        """Flat entries [first, last) as a new tensor of the stored dtype (one read; nothing stays mapped)."""
        last = self.numel if last is None else last
        size = self.dtype.itemsize
        data = torch.empty((last - first) * size, dtype=torch.uint8)
        if data.numel():
            with open(self.file, "rb") as handle:
                handle.seek(self.start + first * size)
                if handle.readinto(data.numpy()) != data.numel():
                    raise ValidationError(f"'{self.file}' is not a valid safetensors file (corrupt or truncated)")
        return data.view(self.dtype)


def stored_tensors(file: Path, owner: str) -> dict[str, StoredTensor] | None:
    """Where each tensor of a safetensors file lies (from its header), or None when some tensor cannot be read
    lazily here (a dtype outside `SAFETENSORS_DTYPES`, a big-endian machine): read such files whole instead."""
    if sys.byteorder != "little":
        return None
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        size = file.stat().st_size
    except Exception as err:  # noqa: BLE001 - any unreadable header is the same error to the user
        raise ValidationError(f"{owner}: '{file}' is not a valid safetensors file (corrupt or truncated): {err}") from None
    out: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        begin, end = entry["data_offsets"]
        tensor = StoredTensor(file, 8 + length + begin, 8 + length + end, dtype, tuple(entry["shape"]))
        if tensor.numel * dtype.itemsize != end - begin or tensor.stop > size:
            raise ValidationError(f"{owner}: '{file}' is not a valid safetensors file (corrupt or truncated): tensor "
                                  f"'{name}' does not fit its byte range")
        out[name] = tensor
    return out


class LazyStateDict(Mapping[str, Tensor]):
    """A state dict whose tensors stay in their safetensors files until asked for, one at a time.

    `state[key]` reads that tensor (cast to `dtype` if floating, as `cast_floats` does); `layout(key)` gives its
    (shape, dtype) without reading; `flat(key)` a `LazyFlat` whose slices are read on their own (the streaming
    engine reads τ block by block). `select(keys)` is a lazy view of some keys. The files must not change while
    the pool lives (the pool validates them once, then the merge reads them again).
    """

    def __init__(self, tensors: Mapping[str, StoredTensor], dtype: torch.dtype | None = None):
        self.tensors = dict(tensors)
        self.dtype = dtype

    @classmethod
    def from_files(cls, files: Sequence[Path], owner: str, dtype: torch.dtype | None = None,
                   rename: Callable[[str], str | None] | None = None, path: Path | None = None) -> "LazyStateDict | None":
        """Every tensor of `files` (shards of one checkpoint at `path`), under `rename(name)` (None: left out);
        None when a file cannot be read lazily (see `stored_tensors`)."""
        tensors: dict[str, StoredTensor] = {}
        for file in files:
            part = stored_tensors(file, owner)
            if part is None:
                return None
            named = {rename(k) if rename else k: v for k, v in part.items()}
            named.pop(None, None)
            clash = sorted(set(named) & set(tensors))
            if clash:
                raise ValidationError(f"{owner}: tensor '{clash[0]}' appears in two files of '{path or file}'")
            tensors.update(named)  # type: ignore[arg-type]
        return cls(tensors, dtype)

    def _cast(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor

    def __getitem__(self, key: str) -> Tensor:
        stored = self.tensors[key]
        return self._cast(stored.read()).view(stored.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def layout(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        stored = self.tensors[key]
        cast = self.dtype is not None and stored.dtype.is_floating_point
        return stored.shape, self.dtype if cast else stored.dtype

    def flat(self, key: str) -> "LazyFlat":
        return LazyFlat(self, self.tensors[key])

    def select(self, keys: Iterable[str]) -> "LazyStateDict":
        return LazyStateDict({k: self.tensors[k] for k in keys}, self.dtype)


class LazyFlat:
    """One tensor of a `LazyStateDict`, flattened: `flat[a:b]` reads entries [a, b) only; any other index reads
    the whole tensor and indexes it."""

    def __init__(self, state: LazyStateDict, stored: StoredTensor):
        self.state, self.stored = state, stored

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice) and index.step in (None, 1):
            first, last, _ = index.indices(self.stored.numel)
            return self.state._cast(self.stored.read(first, max(first, last)))
        return self.state._cast(self.stored.read())[index]


def read_lazily(path: Path, owner: str, dtype: torch.dtype | None = None) -> Mapping[str, Tensor]:
    """`read_safetensors(path)` cast to `dtype`, lazily when the files allow it (else read whole)."""
    lazy = LazyStateDict.from_files(safetensors_files(path, owner), owner, dtype, path=path)
    return lazy if lazy is not None else cast_floats(read_safetensors(path, owner), dtype)


def cast_floats(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors cast to `dtype` (model.dtype; None: as stored); integer buffers untouched."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def load_strict(module: nn.Module, state: Mapping[str, Tensor], owner: str) -> None:
    """Load `state` into `module`: exactly the module's tensor names and shapes (else a `ValidationError` naming the
    first offending tensor), values cast to the module's dtypes."""
    module.load_state_dict(fitting_state(module.state_dict(), state, owner))


def fitting_state(own: Mapping[str, Tensor], state: Mapping[str, Tensor], owner: str) -> dict[str, Tensor]:
    """`state` checked to have exactly the names and shapes of `own` (a module's state dict), in `own`'s order and
    cast to its dtypes (see `load_strict`)."""
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    for keys, why in ((missing, "missing"), (extra, "unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValidationError(f"{owner}: weights do not fit the architecture: {why} tensor '{keys[0]}'{more}")
    values = {k: state[k] for k in own}
    for key, value in own.items():
        if tuple(values[key].shape) != tuple(value.shape):
            raise ValidationError(f"{owner}: tensor '{key}' has shape {tuple(values[key].shape)}, expected "
                                  f"{tuple(value.shape)}")
    return {k: v.to(own[k].dtype) for k, v in values.items()}


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
