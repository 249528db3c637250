"""Read PyTorch pickles (whole-module checkpoints included) without executing pickled code.

`torch.load(weights_only=False)` runs whatever callables a pickle names; `weights_only=True` refuses the module
objects that task_vectors-style checkpoints consist of (`torch.save(image_encoder)`). This module reads them with a
restricted unpickler instead:

* tensors and storages are rebuilt by our own functions (the storage bytes come from the file's records, never
  from pickled code);
* classes of the checkpoint's module tree (`src.modeling.ImageEncoder`, `open_clip.model.CLIP`,
  `open_clip.transformer.*`, `torch.nn.modules.*`, `torchvision.transforms.*`, ...) are mapped to INERT stand-ins
  (`InertObject` subclasses) that only record their constructor arguments and pickled state: no import of
  open_clip, torchvision or the original repository, and no code of theirs runs;
* a handful of harmless builtins (`collections.OrderedDict`, `set`, `torch.Size`, dtypes) are admitted as is;
* every other global (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) is refused with a `ValidationError`
  naming the file and the global, before anything is called.

Formats: the zip format of `torch.save` (`<archive>/data.pkl` + `<archive>/data/<key>` records), the legacy
non-zip `torch.save` format (`_use_new_zipfile_serialization=False`), and plain `pickle.dump` of modules / tensors
(storages pickled through `torch.storage._load_from_bytes`, whose bytes are read with the same legacy reader).

    graph = safe_load("finetuned.pt")          # inert object graph (InertObject / dict / tensors)
    state = extract_state_dict(graph, "finetuned.pt")   # flat {name: tensor}, like nn.Module.state_dict()
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from symerge.errors import ValidationError

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
MAX_DEPTH = 200

# Modules whose classes (and functions) are replaced by inert stand-ins. Matched on dotted-name boundaries.
STUB_MODULES: tuple[str, ...] = (
    "open_clip",  # open_clip.model.CLIP, open_clip.transformer.*, open_clip.transform._convert_to_rgb, ...
    "clip",  # OpenAI's `clip` package (clip.model.CLIP, ...), used by wise-ft style checkpoints
    "src",  # task_vectors / AdaMerging / SyMerge repos: src.modeling.ImageEncoder, src.modeling.ClassificationHead, src.heads.*
    "modeling",  # the same repos run with src/ on sys.path
    "heads",
    "torch.nn.modules",  # Linear, Conv2d, LayerNorm, MultiheadAttention, Sequential, ModuleList, GELU, ...
    "torchvision.transforms",  # the preprocessing pipelines stored inside task_vectors ImageEncoders
)

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}

DTYPE_NAMES = (
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "complex128",
)


class InertObject:
    """Stand-in for a class that is never imported: it records constructor arguments, pickled state and items.

    `class_path` is the original dotted name (e.g. 'open_clip.model.CLIP'); `attributes()` is the pickled
    `__dict__` (what `nn.Module` pickles: `_parameters`, `_buffers`, `_modules`, plain attributes).
    """

    class_path = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "InertObject":
        obj = object.__new__(cls)
        obj._inert_args = args
        obj._inert_kwargs = kwargs
        obj._inert_state = None
        obj._inert_items = []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE / OBJ call the class: record only
        pass

    def __setstate__(self, state: Any) -> None:
        self._inert_state = state

    def append(self, item: Any) -> None:
        self._inert_items.append(item)

    def extend(self, items: Any) -> None:
        self._inert_items.extend(list(items))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._inert_items.append((key, value))

    @property
    def args(self) -> tuple[Any, ...]:
        return self._inert_args

    def attributes(self) -> dict[str, Any]:
        """The pickled instance dictionary (merged with slot state when the state is a (dict, slots) pair)."""
        state = self._inert_state
        if isinstance(state, dict):
            return state
        if isinstance(state, tuple) and len(state) == 2:
            merged: dict[str, Any] = {}
            for part in state:
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return {}

    def __repr__(self) -> str:
        return f"<inert {self.class_path}>"


@lru_cache(maxsize=None)
def stub_class(module: str, name: str) -> type[InertObject]:
    """One inert class per original (module, name), so identical globals map to the identical class."""
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"class_path": f"{module}.{name}", "__module__": __name__})


class _Marker:
    """A named, non-callable placeholder (storage types, tensor classes)."""

    def __init__(self, name: str, dtype: torch.dtype | None = None):
        self.name = name
        self.dtype = dtype

    def __repr__(self) -> str:
        return f"<{self.name}>"


TENSOR_TYPES = {("torch", "Tensor"), ("torch._tensor", "Tensor"), ("torch.nn.parameter", "Parameter")}


class StorageRecord:
    """A storage read from the file's records: raw bytes plus the element type the pickle declared."""

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype):
        self.untyped = untyped
        self.dtype = dtype

    def numel(self) -> int:
        return self.untyped.nbytes() // _element_size(self.dtype)


class _Refused(pickle.UnpicklingError):
    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class _BadData(pickle.UnpicklingError):
    """Structurally invalid tensor / storage records."""


# --- tensor rebuilding: our own code, type-checked, bounds-checked -------------------------------------------------


def _ints(values: Any, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list, torch.Size)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise _BadData(f"tensor {what} must be a tuple of ints, got {values!r}")
    return tuple(int(v) for v in values)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> Tensor:
    if not isinstance(storage, StorageRecord):
        raise _BadData(f"tensor storage is a {type(storage).__name__}, not a storage record of the file")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise _BadData(f"bad storage offset {storage_offset!r}")
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides) or any(s < 0 for s in shape) or any(s < 0 for s in strides):
        raise _BadData(f"bad tensor geometry size={shape} stride={strides}")
    if all(s > 0 for s in shape):
        extent = storage_offset + sum((s - 1) * st for s, st in zip(shape, strides)) + 1
        if extent > storage.numel():
            raise _BadData(f"tensor of size {shape} at offset {storage_offset} exceeds its storage of {storage.numel()} elements")
        if math.prod(shape) > max(storage.numel(), 1):
            raise _BadData(f"tensor of size {shape} is larger than its storage ({storage.numel()} elements): "
                           "broadcast views are not supported")
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage.untyped, storage_offset, shape, strides)


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any,
                       dtype: Any, metadata: Any = None) -> Tensor:
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    if isinstance(dtype, torch.dtype) and dtype != tensor.dtype:
        raise _BadData(f"tensor dtype {dtype} does not match its storage's {tensor.dtype}")
    return tensor


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None) -> Tensor:
    if not isinstance(data, Tensor):
        raise _BadData(f"parameter data is a {type(data).__name__}, not a tensor")
    return data


REBUILDERS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Tensor:
    """Tensor subclasses / tensors with Python state: rebuild the plain tensor, ignore the subclass and state."""
    if func not in REBUILDERS.values() or not isinstance(args, tuple):
        raise _BadData(f"_rebuild_from_type_v2 with an unexpected function {func!r}")
    if not (isinstance(new_type, _Marker) and new_type.dtype is None):
        raise _BadData(f"_rebuild_from_type_v2 with an unexpected type {new_type!r}")
    return func(*args)


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """`_codecs.encode`, as protocol-2 pickles use it for bytes objects (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _BadData(f"_codecs.encode is only admitted for latin-1 bytes, got encoding {encoding!r}")
    return text.encode("latin-1")


def _torch_size(values: Any = ()) -> torch.Size:
    return torch.Size(_ints(values, "Size"))


def _torch_device(kind: Any, index: Any = None) -> torch.device:
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise _BadData(f"bad torch.device({kind!r}, {index!r})")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _safe_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = dict(REBUILDERS)
    table[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2
    table[("collections", "OrderedDict")] = OrderedDict
    table[("builtins", "set")] = set
    table[("builtins", "frozenset")] = frozenset
    table[("_codecs", "encode")] = _latin1_encode
    table[("torch", "Size")] = _torch_size
    table[("torch", "device")] = _torch_device
    for module, name in TENSOR_TYPES:
        table[(module, name)] = _Marker(f"{module}.{name}")
    for name, dtype in STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            table[(module, name)] = _Marker(f"{module}.{name}", dtype)
    table[("torch.storage", "TypedStorage")] = _Marker("torch.storage.TypedStorage", torch.uint8)
    for name in DTYPE_NAMES:
        table[("torch", name)] = getattr(torch, name)
    return table


SAFE_GLOBALS = _safe_globals()


def is_stub_module(module: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in STUB_MODULES)


def allowed_global(module: str, name: str) -> Any:
    """What the restricted unpickler returns for a global, or raises `_Refused`."""
    # Python 2 names, as protocol < 3 pickles (torch.save's protocol 2) write them: the same mapping pickle applies
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    key = (module, name)
    if key in SAFE_GLOBALS:
        return SAFE_GLOBALS[key]
    if key == ("torch.storage", "_load_from_bytes"):
        return _load_storage_from_bytes
    if is_stub_module(module) and name.replace(".", "").replace("_", "a").isalnum():
        return stub_class(module, name)
    raise _Refused(f"{module}.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come only from `allowed_global`; storages from a given `persistent_load`."""

    def __init__(self, file: BinaryIO, persistent: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self._persistent = persistent

    def find_class(self, module: str, name: str) -> Any:
        return allowed_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise _BadData(f"unexpected persistent id {pid!r} in a plain pickle")
        return self._persistent(pid)


# --- storage records ------------------------------------------------------------------------------------------------


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _storage_pid(pid: Any) -> tuple[torch.dtype, str, int, Any]:
    """Validate ('storage', storage_type, key, location, numel[, view_metadata]); return (dtype, key, numel, view)."""
    if not isinstance(pid, tuple) or len(pid) not in (5, 6):
        raise _BadData(f"unexpected persistent id {pid!r}")
    typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if typename != "storage":
        raise _BadData(f"unexpected persistent id type {typename!r}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _Marker) or storage_type.dtype is None:
        raise _BadData(f"unknown storage type {storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
        raise _BadData(f"bad storage size {numel!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(key, str) or not key.replace("_", "a").isalnum():
        raise _BadData(f"bad storage key {key!r}")
    view = pid[5] if len(pid) == 6 else None
    return storage_type.dtype, key, numel, view


def _read_into(stream: BinaryIO, nbytes: int, what: str) -> torch.UntypedStorage:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buffer.numpy())
        got = 0
        while got < nbytes:
            n = stream.readinto(view[got:])
            if not n:
                raise _BadData(f"{what}: truncated ({got} of {nbytes} bytes)")
            got += n
    return buffer.untyped_storage()


def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = sorted((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), key=len)
        if not pickles:
            raise _BadData("zip file without a data.pkl record: not a torch.save checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little",):
            raise _BadData("big-endian checkpoints are not supported")
        storages: dict[str, StorageRecord] = {}

        def persistent(pid: Any) -> StorageRecord:
            dtype, key, numel, _ = _storage_pid(pid)
            if key in storages:
                return storages[key] if storages[key].dtype == dtype else StorageRecord(storages[key].untyped, dtype)
            record = f"{prefix}data/{key}"
            if record not in names:
                raise _BadData(f"storage record '{record}' is missing")
            nbytes = numel * _element_size(dtype)
            size = archive.getinfo(record).file_size
            if size < nbytes:
                raise _BadData(f"storage record '{record}' has {size} bytes, {nbytes} expected")
            with archive.open(record) as stream:
                storages[key] = StorageRecord(_read_into(stream, nbytes, record), dtype)
            return storages[key]

        with archive.open(pickles[0]) as stream:
            return RestrictedUnpickler(io.BytesIO(stream.read()), persistent).load()


def _load_legacy(stream: BinaryIO) -> Any:
    """Legacy `torch.save` (non-zip): magic, protocol, sys info, main pickle, storage keys, raw storages."""
    magic = RestrictedUnpickler(stream).load()
    if magic != LEGACY_MAGIC_NUMBER:
        raise _BadData("not a legacy torch.save stream (bad magic number)")
    return _load_legacy_after_magic(stream)


def _load_legacy_after_magic(stream: BinaryIO) -> Any:
    protocol = RestrictedUnpickler(stream).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
        raise _BadData(f"unsupported legacy protocol version {protocol!r}")
    sys_info = RestrictedUnpickler(stream).load()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise _BadData("big-endian checkpoints are not supported")
    roots: dict[str, tuple[torch.dtype, int, torch.UntypedStorage]] = {}
    start = stream.tell()
    limit = stream.seek(0, io.SEEK_END) - start  # storage bytes cannot exceed what is left of the file
    stream.seek(start)
    views: dict[str, StorageRecord] = {}

    def persistent(pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] in ("module", b"module"):
            # ('module', class, source file, source): the class (already an inert stand-in); the source is ignored
            if not (isinstance(pid[1], type) and issubclass(pid[1], InertObject)):
                raise _BadData(f"bad module record {pid[1]!r}")
            return pid[1]
        dtype, key, numel, view = _storage_pid(pid)
        if key not in roots:
            nbytes = numel * _element_size(dtype)
            if nbytes > limit:
                raise _BadData(f"storage '{key}' declares {nbytes} bytes, more than the file holds")
            roots[key] = (dtype, numel, torch.empty(nbytes, dtype=torch.uint8).untyped_storage())
        root_dtype, _, untyped = roots[key]
        if view is None:
            return StorageRecord(untyped, dtype)
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, (int, str)) for v in view)):
            raise _BadData(f"bad storage view {view!r}")
        view_key, offset, size = view
        if view_key not in views:
            elsize = _element_size(dtype)
            if not isinstance(offset, int) or not isinstance(size, int) or (offset + size) * elsize > untyped.nbytes():
                raise _BadData(f"storage view {view!r} out of bounds")
            views[view_key] = StorageRecord(untyped[offset * elsize:(offset + size) * elsize], dtype)
        return views[view_key]

    result = RestrictedUnpickler(stream, persistent).load()
    keys = RestrictedUnpickler(stream).load()
    if not isinstance(keys, list):
        raise _BadData("bad storage key list")
    for key in keys:
        if key not in roots:
            raise _BadData(f"storage '{key}' listed but never referenced")
        dtype, numel, untyped = roots[key]
        header = stream.read(8)
        if len(header) != 8:
            raise _BadData(f"storage '{key}': truncated")
        (count,) = struct.unpack("<q", header)
        if count != numel:
            raise _BadData(f"storage '{key}' has {count} elements, {numel} expected")
        data = _read_into(stream, untyped.nbytes(), f"storage '{key}'")
        untyped.copy_(data)
    return result


def _load_storage_from_bytes(data: Any) -> StorageRecord:
    """`torch.storage._load_from_bytes` (storages inside a plain `pickle.dump`): read with our legacy reader."""
    if not isinstance(data, (bytes, bytearray)):
        raise _BadData("_load_from_bytes expects bytes")
    storage = _load_legacy(io.BytesIO(bytes(data)))
    if not isinstance(storage, StorageRecord):
        raise _BadData(f"_load_from_bytes produced a {type(storage).__name__}, not a storage")
    return storage


def _load_pickle_stream(stream: BinaryIO) -> Any:
    """A legacy torch.save stream or a plain pickle: the first object tells which."""
    first = RestrictedUnpickler(stream).load()
    if isinstance(first, int) and not isinstance(first, bool) and first == LEGACY_MAGIC_NUMBER:
        return _load_legacy_after_magic(stream)
    return first


def safe_load(path: str | Path) -> Any:
    """Unpickle a PyTorch checkpoint into an inert object graph (no pickled code runs; see the module docstring).

    Raises `ValidationError` naming the file: for a refused global (and which), or an unreadable / corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"{path}: no such file")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as stream:
            if stream.read(4) == b"PK\x03\x04":
                raise ValidationError(f"{path}: truncated or corrupt zip-format checkpoint (no central directory)")
            stream.seek(0)
            return _load_pickle_stream(stream)
    except _Refused as err:
        raise ValidationError(
            f"{path}: refused to unpickle global '{err.global_name}': it is not on symerge's allow-list for "
            "checkpoints (tensor rebuilders, OrderedDict, and inert stand-ins for open_clip / task_vectors / "
            "torch.nn module classes). The file may try to execute code; nothing from it was run."
        ) from None
    except ValidationError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError, TypeError,
            AttributeError, IndexError, KeyError, RuntimeError, OverflowError, MemoryError, RecursionError) as err:
        raise ValidationError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


# --- from the inert graph to tensors ----------------------------------------------------------------------------------


def is_module(obj: Any) -> bool:
    """An inert stand-in of an nn.Module (it pickled `_parameters` / `_modules`)."""
    return isinstance(obj, InertObject) and ("_modules" in obj.attributes() or "_parameters" in obj.attributes())


def _module_state(obj: InertObject, prefix: str, out: dict[str, Tensor], owner: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValidationError(f"{owner}: module tree deeper than {MAX_DEPTH} levels at '{prefix}'")
    attrs = obj.attributes()
    for name, value in (attrs.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + str(name)] = _as_tensor(value, owner, prefix + str(name))
    skip = attrs.get("_non_persistent_buffers_set") or set()
    for name, value in (attrs.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + str(name)] = _as_tensor(value, owner, prefix + str(name))
    for name, child in (attrs.get("_modules") or {}).items():
        if child is None:
            continue
        if not is_module(child):
            raise ValidationError(f"{owner}: submodule '{prefix}{name}' is a {_kind(child)}, not a module")
        _module_state(child, f"{prefix}{name}.", out, owner, depth + 1)


def _as_tensor(value: Any, owner: str, key: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValidationError(f"{owner}: entry '{key}' is a {_kind(value)}, not a tensor")
    return value.detach()


def _kind(value: Any) -> str:
    return value.class_path if isinstance(value, InertObject) else type(value).__name__


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def extract_state_dict(obj: Any, owner: str = "checkpoint") -> dict[str, Tensor]:
    """Flat `{name: tensor}` from an inert graph: a pickled module (walked like `nn.Module.state_dict()`), a dict
    of tensors, or a dict holding one under 'state_dict' / 'model_state_dict' / 'model'."""
    if is_module(obj):
        out: dict[str, Tensor] = {}
        _module_state(obj, "", out, owner, 0)
        return out
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            return {str(k): v.detach() for k, v in obj.items()}
        for key in STATE_DICT_KEYS:
            if key in obj and (is_module(obj[key]) or isinstance(obj[key], Mapping)):
                return extract_state_dict(obj[key], owner)
    raise ValidationError(f"{owner}: holds a {_kind(obj)}, neither a module nor a dict of tensors")


def load_state_dict(path: str | Path) -> dict[str, Tensor]:
    """`extract_state_dict(safe_load(path))`."""
    return extract_state_dict(safe_load(path), str(path))


def module_classes(obj: Any, prefix: str = "") -> dict[str, str]:
    """Original class of every module in the graph, by dotted path ('' for the root): 'model.visual' -> '...'."""
    out: dict[str, str] = {}
    if not is_module(obj):
        return out
    out[prefix.rstrip(".")] = obj.class_path
    for name, child in (obj.attributes().get("_modules") or {}).items():
        if is_module(child):
            out.update(module_classes(child, f"{prefix}{name}."))
    return out


def module_at(obj: Any, dotted: str) -> Any:
    """The submodule at a dotted path ('' = the root), or None."""
    node = obj
    for part in [p for p in dotted.split(".") if p]:
        if not is_module(node):
            return None
        node = (node.attributes().get("_modules") or {}).get(part)
    return node
