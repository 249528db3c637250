"""Task vectors τ_k = θ_k − θ_pre, stacked per tensor as [K, *shape] so a merge is one reduction per tensor.

Two ways to get at τ:

- `TaskVectors` materialises every stack (what adaptive merging and the spectral methods need);
- a *τ source* (`StateDictTau`, `TaskVectorTau`) hands out τ one tensor, and within a tensor one column block
  [K, c], at a time, written into reused scratch buffers (`Workspace`). Per-tensor-separable merge methods run on
  a source, so `merging.merge` never holds more than one tensor's stack (see `merging.registry`).

Both compute τ identically: in float32 (float64 for float64 tensors), rounded once to the storage dtype, handed
to the merge in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.validation import StateDict, validate_state_dicts

STORAGE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

# Entries of one [K, c] block processed at once: 2^18 float32 = 1 MiB, so the handful of block-sized scratch
# buffers of a merge kernel stay in the L2 cache. Small enough to be cache-friendly, large enough that the
# per-op Python overhead (a few µs) is negligible.
BLOCK_ELEMENTS = 1 << 18


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its short name ('float32', 'bfloat16')."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in STORAGE_DTYPES:
        raise ValidationError(f"unknown storage dtype '{dtype}'; choose one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def mergeable_keys(pretrained: StateDict, keys: Iterable[str] | None = None) -> list[str]:
    """Floating-point tensors are merged; integer / bool buffers are always copied from the pretrained model."""
    candidates = list(keys) if keys is not None else list(pretrained.keys())
    return [k for k in candidates if pretrained[k].is_floating_point()]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a tensor's τ: float32, or float64 for float64 tensors (never round a model down)."""
    return torch.promote_types(dtype, torch.float32)


def block_ranges(numel: int, num_tasks: int) -> list[tuple[int, int]]:
    """Column ranges [start, stop) covering `numel` columns with blocks of ≈ BLOCK_ELEMENTS entries of [K, c]."""
    width = max(1, BLOCK_ELEMENTS // max(1, num_tasks))
    return [(start, min(start + width, numel)) for start in range(0, numel, width)]


class Workspace:
    """Named scratch buffers reused across tensors, so a merge allocates (and page-faults) its temporaries once.

    `get(name, shape, dtype)` returns a contiguous view of the first prod(shape) entries of the buffer `name`,
    growing it when a larger tensor comes along. Two live results need two names.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
            device: torch.device | str = "cpu") -> Tensor:
        numel = math.prod(shape)
        key = (name, dtype, torch.device(device))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            # block-sized requests get a whole block at once so growing tensors do not reallocate every time
            size = max(numel, BLOCK_ELEMENTS) if numel <= BLOCK_ELEMENTS else numel
            buffer = torch.empty(size, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


# --------------------------------------------------------------------------------------------------------------
# τ sources: one tensor at a time
# --------------------------------------------------------------------------------------------------------------

class KeyTau:
    """τ of one tensor. `block(start, stop)` and `full()` return float32 [K, columns] SCRATCH tensors: valid until
    the next call, and the caller may overwrite them. `sample(index)` returns τ at flat positions `index` as a new
    float32 [K, m] tensor. Blocks may be requested any number of times, in any order, with identical results."""

    numel: int
    device: torch.device

    def block(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def full(self) -> Tensor:
        raise NotImplementedError

    def sample(self, index: Tensor) -> Tensor:
        raise NotImplementedError


class TauSource:
    """τ of K tasks over the merged tensors, visited one tensor at a time (see the module docstring).

    `iterate()` is one pass over `keys` in order (a method may make several passes); `sample(count, generator)`
    returns τ at ≈ `count` random positions per task, float32 [K, m] (used only to guess selection brackets).
    """

    tasks: list[str]
    keys: list[str]
    shapes: dict[str, torch.Size]
    storage_dtype: torch.dtype
    workspace: Workspace

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def numel(self, key: str) -> int:
        return math.prod(self.shapes[key])

    def total_numel(self) -> int:
        """Entries per task vector (all merged tensors together)."""
        return sum(self.numel(k) for k in self.keys)

    def iterate(self) -> Iterator[tuple[str, KeyTau]]:
        raise NotImplementedError

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def sample_positions(self, count: int, generator: torch.Generator) -> dict[str, Tensor]:
        """About `count` random flat positions in total, spread over the tensors in proportion to their size."""
        total = self.total_numel()
        positions: dict[str, Tensor] = {}
        if total == 0:
            return positions
        for key in self.keys:
            numel = self.numel(key)
            share = round(count * numel / total)
            if numel and share:
                positions[key] = random_positions(numel, share, generator)
        return positions


SAMPLE_RUN = 16  # sampled positions come in runs of 16 consecutive entries (one cache line of float32)


def random_positions(numel: int, count: int, generator: torch.Generator, run: int = SAMPLE_RUN) -> Tensor:
    """≈ `count` flat positions in [0, numel): random runs of `run` consecutive entries (cache-friendly)."""
    if run <= 1 or numel <= run or count < run:
        return torch.randint(numel, (max(1, count),), generator=generator)
    starts = torch.randint(numel - run + 1, (count // run,), generator=generator)
    return (starts.unsqueeze(1) + torch.arange(run)).reshape(-1)


def round_to_storage(values: Tensor, storage: torch.dtype) -> Tensor:
    """Round float32 `values` in place through the storage dtype (a no-op for float32 / float64 storage)."""
    if storage in (torch.float32, torch.float64):
        return values
    return values.copy_(values.to(storage))


class _StateDictKey(KeyTau):
    def __init__(self, source: "StateDictTau", key: str):
        self.source = source
        base = source.pretrained[key].detach()
        self.compute = compute_dtype(base.dtype)
        self.base = base.to(self.compute).reshape(-1)
        self.experts = [source.experts[t][key].detach().reshape(-1) for t in source.tasks]
        self.numel = self.base.numel()
        self.device = self.base.device
        # float32 storage: τ is written straight into the block (computed in the compute dtype, rounded once)
        self.direct = source.storage_dtype == torch.float32

    def _fill(self, out: Tensor, start: int, stop: int) -> Tensor:
        base = self.base[start:stop]
        if self.direct:
            for k, expert in enumerate(self.experts):
                torch.sub(expert[start:stop], base, out=out[k])
            return out
        # other storage: rounded once from the compute dtype to the storage dtype, then handed out as float32
        rounded = self.source.workspace.get("tau_storage", (stop - start,), self.source.storage_dtype, self.device)
        for k, expert in enumerate(self.experts):
            out[k].copy_(torch.sub(expert[start:stop], base, out=rounded))
        return out

    def block(self, start: int, stop: int) -> Tensor:
        out = self.source.workspace.get("tau_block", (len(self.experts), stop - start), torch.float32, self.device)
        return self._fill(out, start, stop)

    def sample(self, index: Tensor) -> Tensor:
        index = index.to(self.device)
        ref = self.base[index]
        rows = torch.stack([expert[index] - ref for expert in self.experts])
        return rows.to(self.source.storage_dtype).float()

    def full(self) -> Tensor:
        out = self.source.workspace.get("tau_full", (len(self.experts), self.numel), torch.float32, self.device)
        return self._fill(out, 0, self.numel)


class StateDictTau(TauSource):
    """τ computed on the fly from state dicts (assumed validated: same keys, shapes, dtypes; finite)."""

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict], keys: Iterable[str] | None = None,
                 storage_dtype: torch.dtype | str = torch.float32, workspace: Workspace | None = None):
        self.pretrained = pretrained
        self.experts = experts
        self.tasks = list(experts.keys())
        self.keys = mergeable_keys(pretrained, keys)
        self.shapes = {k: pretrained[k].shape for k in self.keys}
        self.storage_dtype = resolve_dtype(storage_dtype)
        self.workspace = workspace or Workspace()

    def iterate(self) -> Iterator[tuple[str, KeyTau]]:
        for key in self.keys:
            yield key, _StateDictKey(self, key)

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        parts = []
        for key, index in self.sample_positions(count, generator).items():
            base = self.pretrained[key].detach()
            compute = compute_dtype(base.dtype)
            ref = base.reshape(-1)[index].to(compute)
            rows = torch.stack([self.experts[t][key].detach().reshape(-1)[index].to(compute) - ref
                                for t in self.tasks])
            parts.append(rows.to(self.storage_dtype).float())
        if not parts:
            return torch.zeros(self.num_tasks, 0)
        return torch.cat(parts, dim=1)


class _StoredKey(KeyTau):
    def __init__(self, source: "TaskVectorTau", key: str):
        self.source = source
        vec = source.tv.vectors[key]
        self.flat = vec.reshape(vec.shape[0], -1)
        self.numel = self.flat.shape[1]
        self.device = vec.device

    def block(self, start: int, stop: int) -> Tensor:
        out = self.source.workspace.get("tau_block", (self.flat.shape[0], stop - start), torch.float32, self.device)
        return out.copy_(self.flat[:, start:stop])

    def full(self) -> Tensor:
        out = self.source.workspace.get("tau_full", tuple(self.flat.shape), torch.float32, self.device)
        return out.copy_(self.flat)

    def sample(self, index: Tensor) -> Tensor:
        return self.flat[:, index.to(self.device)].float()


class TaskVectorTau(TauSource):
    """τ read from materialised `TaskVectors` (copied block by block into scratch: the stacks are never modified)."""

    def __init__(self, tv: "TaskVectors", workspace: Workspace | None = None):
        self.tv = tv
        self.tasks = list(tv.tasks)
        self.keys = list(tv.vectors.keys())
        self.shapes = {k: v.shape[1:] for k, v in tv.vectors.items()}
        self.storage_dtype = tv.storage_dtype
        self.workspace = workspace or Workspace()

    def iterate(self) -> Iterator[tuple[str, KeyTau]]:
        for key in self.keys:
            yield key, _StoredKey(self, key)

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        parts = [self.tv.vectors[key].reshape(self.num_tasks, -1)[:, index].float()
                 for key, index in self.sample_positions(count, generator).items()]
        if not parts:
            return torch.zeros(self.num_tasks, 0)
        return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------------------------------------------
# Materialised task vectors
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TaskVectors:
    """Stacked task vectors of K experts over the merged (floating) tensors of one model.

    `pretrained` keeps every tensor of the base model (original dtypes); `vectors[key]` holds [K, *shape] in
    `storage_dtype`. Arithmetic runs in float32 (float64 for float64 tensors); results are cast back to each tensor's
    own dtype.
    """

    tasks: list[str]
    pretrained: dict[str, Tensor]
    vectors: dict[str, Tensor]

    @classmethod
    def from_state_dicts(
        cls,
        pretrained: StateDict,
        experts: Mapping[str, StateDict],
        keys: Iterable[str] | None = None,
        dtype: torch.dtype | str = torch.float32,
        validate: bool = True,
    ) -> "TaskVectors":
        """Build τ for `keys` (default: every floating tensor of `pretrained`)."""
        storage = resolve_dtype(dtype)
        key_list = list(keys) if keys is not None else None
        if validate:
            validate_state_dicts(pretrained, experts, key_list)
        base = {k: v.detach() for k, v in pretrained.items()}
        tasks = list(experts.keys())
        vectors: dict[str, Tensor] = {}
        for key in mergeable_keys(base, key_list):
            compute = compute_dtype(base[key].dtype)
            ref = base[key].to(compute)
            # written row by row into one preallocated stack: no per-task temporaries, no torch.stack copy
            stack = torch.empty((len(tasks), *ref.shape), dtype=storage, device=ref.device)
            for k, task in enumerate(tasks):
                # computed in the compute dtype (the inputs promote to it), rounded once to the storage dtype
                torch.sub(experts[task][key].detach(), ref, out=stack[k])
            vectors[key] = stack
        return cls(tasks=tasks, pretrained=base, vectors=vectors)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def keys(self) -> list[str]:
        return list(self.vectors.keys())

    @property
    def storage_dtype(self) -> torch.dtype:
        return next(iter(self.vectors.values())).dtype if self.vectors else torch.float32

    def numel(self) -> int:
        """Parameters per task vector."""
        return sum(v[0].numel() for v in self.vectors.values())

    def items_float(self) -> Iterator[tuple[str, Tensor]]:
        """(key, [K, *shape] float32) pairs, converting lazily one tensor at a time."""
        for key, vec in self.vectors.items():
            yield key, vec.float()

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        """τ of one task as a plain dict (float32)."""
        index = self.tasks.index(task) if isinstance(task, str) else task
        return {k: v[index].float() for k, v in self.vectors.items()}

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> "TaskVectors":
        """New TaskVectors with `fn(key, stacked_float32)` applied per tensor (same pretrained, same storage)."""
        storage = self.storage_dtype
        vectors = {k: fn(k, v).to(storage) for k, v in self.items_float()}
        return TaskVectors(tasks=list(self.tasks), pretrained=self.pretrained, vectors=vectors)

    def subset(self, tasks: Iterable[str]) -> "TaskVectors":
        """Task vectors of a subset of tasks, in the given order."""
        names = list(tasks)
        index = [self.tasks.index(t) for t in names]
        return TaskVectors(tasks=names, pretrained=self.pretrained, vectors={k: v[index] for k, v in self.vectors.items()})

    def apply(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ = θ_pre + Δ for the keys in `delta`; every other tensor is a copy of the pretrained one."""
        merged: dict[str, Tensor] = {}
        for key, base in self.pretrained.items():
            if key in delta:
                compute = compute_dtype(base.dtype)  # never round a float64 model to float32
                merged[key] = (base.to(compute) + delta[key].to(compute)).to(base.dtype)
            else:
                merged[key] = base.clone()
        return merged

    def expert_state(self, task: str | int) -> dict[str, Tensor]:
        """Reconstruct an expert's state dict θ_pre + τ_k (up to storage precision)."""
        return self.apply(self.task_vector(task))
