"""The streaming engine: τ sources (read), sinks (write), and exact magnitude thresholds over a source.

A method written as `stream(source, sink, **options)` reads τ from a `TauSource` one tensor — and inside a tensor
one [K, c] column block — at a time, writes each block's update Δ into `sink.target(...)` and calls
`sink.commit(...)`. Sources: `StateDictTau` computes τ on the fly from state dicts (what `merging.merge` uses, so it
never holds more than one tensor's stack); `TaskVectorTau` reads materialised `TaskVectors`. Sinks: `MergedSink`
turns Δ straight into θ_pre + Δ (what `merging.merge` returns); `DeltaSink` keeps Δ (what a registered method
returns on `TaskVectors`). Both paths run the same kernels, so they agree exactly. Block-sized temporaries live in a
reused `Workspace`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from symerge.merging import select_ops
from symerge.merging.ops import keep_count
from symerge.merging.select_ops import kth_largest_abs
from symerge.taskvectors import TaskVectors, compute_dtype, mergeable_keys, resolve_dtype
from symerge.validation import StateDict, layout

# Entries of one [K, c] block processed at once: 2^18 float32 = 1 MiB, so the handful of block-sized scratch
# buffers of a merge kernel stay in the L2 cache. Small enough to be cache-friendly, large enough that the
# per-op Python overhead (a few µs) is negligible.
BLOCK_ELEMENTS = 1 << 18
DIRECT_SELECT = 1 << 17  # per-task magnitudes up to this many entries: one `kthvalue`; above: bracket + band
TENSOR_SAMPLE = 1 << 15  # sample per task bracketing a per-tensor threshold
TENSOR_SIGMAS = 4.0  # its bracket: ± 4 σ (a miss costs only a radix pass over one tensor)
SAMPLE_SEED = 0x5EED  # seeds the (result-independent) sampling that only guesses selection brackets


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
        # a lazy expert (`tensorio.LazyStateDict`) hands out a flat view whose blocks are read from disk on demand,
        # so only the pretrained tensor and one [K, c] block are in memory, never K copies of this tensor
        self.experts = [flat_tensor(source.experts[t], key) for t in source.tasks]
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


def flat_tensor(state: StateDict, key: str) -> Any:
    """`state[key]` flattened; for a lazy state dict (with `flat(key)`), a view whose slices are read on demand."""
    flat = getattr(state, "flat", None)
    return flat(key) if callable(flat) else state[key].detach().reshape(-1)


class StateDictTau(TauSource):
    """τ computed on the fly from state dicts (assumed validated: same keys, shapes, dtypes; finite). The state
    dicts may be lazy (`tensorio.LazyStateDict`): each tensor is then read when its turn comes."""

    def __init__(self, pretrained: StateDict, experts: Mapping[str, StateDict], keys: Iterable[str] | None = None,
                 storage_dtype: torch.dtype | str = torch.float32, workspace: Workspace | None = None):
        self.pretrained = pretrained
        self.experts = experts
        self.tasks = list(experts.keys())
        self.keys = mergeable_keys(pretrained, keys)
        self.shapes = {k: torch.Size(layout(pretrained, k)[0]) for k in self.keys}
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
            rows = torch.stack([flat_tensor(self.experts[t], key)[index].to(compute) - ref for t in self.tasks])
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
# Sinks: where a streamed method's per-block Δ goes
# --------------------------------------------------------------------------------------------------------------

class DeltaSink:
    """Keeps Δ (float32) per tensor: the registered method's return value on `TaskVectors`."""

    def __init__(self) -> None:
        self.deltas: dict[str, Tensor] = {}
        self._flat: Tensor | None = None

    def open(self, key: str, shape: torch.Size, device: torch.device) -> None:
        self._flat = torch.empty(math.prod(shape), dtype=torch.float32, device=device)
        self.deltas[key] = self._flat.view(shape)

    def target(self, start: int, stop: int) -> Tensor:
        return self._flat[start:stop]

    def commit(self, start: int, stop: int) -> None:
        pass

    def close(self) -> None:
        self._flat = None

    def patch(self, key: str, index: Tensor, values: Tensor) -> None:
        self.deltas[key].view(-1)[index] = values

    def result(self) -> dict[str, Tensor]:
        return self.deltas


class MergedSink:
    """Writes θ_pre + Δ straight into the merged state dict, block by block (Δ itself lives in one scratch block).

    Rounding as `TaskVectors.apply`: (θ_pre in float32 / float64 + Δ) cast once to the tensor's dtype.
    """

    def __init__(self, pretrained: Mapping[str, Tensor], workspace: Workspace):
        self.pretrained = pretrained
        self.workspace = workspace
        self.merged: dict[str, Tensor] = {}

    def open(self, key: str, shape: torch.Size, device: torch.device) -> None:
        base = self.pretrained[key].detach()
        self._base = base.to(compute_dtype(base.dtype)).reshape(-1)
        self._out = torch.empty(base.numel(), dtype=base.dtype, device=base.device)
        self.merged[key] = self._out.view(base.shape)

    def target(self, start: int, stop: int) -> Tensor:
        self._delta = self.workspace.get("sink_delta", (stop - start,), torch.float32, self._out.device)
        return self._delta

    def commit(self, start: int, stop: int) -> None:
        torch.add(self._base[start:stop], self._delta, out=self._out[start:stop])

    def close(self) -> None:
        self._base = self._out = self._delta = None

    def patch(self, key: str, index: Tensor, values: Tensor) -> None:
        base = self.pretrained[key].detach()
        compute = compute_dtype(base.dtype)
        flat = self.merged[key].view(-1)
        flat[index] = (base.reshape(-1)[index].to(compute) + values.to(compute)).to(base.dtype)

    def result(self) -> dict[str, Tensor]:
        """Every tensor of the pretrained model, in its order: merged ones, and copies of the rest."""
        return {key: self.merged[key] if key in self.merged else base.detach().clone()
                for key, base in self.pretrained.items()}


Sink = DeltaSink | MergedSink
StreamFn = Callable[..., None]


def run_blockwise(source: TauSource, sink: Sink, kernel: Callable[[Tensor, Tensor], Any]) -> None:
    """For methods whose Δ is a function of each entry's K values: `kernel(tau_block [K, c], out [c])`."""
    for key, tau in source.iterate():
        sink.open(key, source.shapes[key], tau.device)
        for start, stop in block_ranges(tau.numel, source.num_tasks):
            kernel(tau.block(start, stop), sink.target(start, stop))
            sink.commit(start, stop)
        sink.close()


def stream_delta(stream: StreamFn, tv: TaskVectors, **options: Any) -> dict[str, Tensor]:
    """Run a streamed method on materialised task vectors; returns Δ per tensor (float32)."""
    sink = DeltaSink()
    stream(TaskVectorTau(tv), sink, **options)
    return sink.result()


# --------------------------------------------------------------------------------------------------------------
# Exact magnitude thresholds
# --------------------------------------------------------------------------------------------------------------

def _infinite(rows: int) -> Tensor:
    return torch.full((rows, 1), float("inf"))


def row_thresholds(rows: Tensor, density: float, workspace: Workspace | None = None) -> Tensor | None:
    """Per row of float32 [K, n], the magnitude threshold of `magnitude_threshold` as a column [K, 1] (None: keep
    all). Short rows: one `kthvalue`; long rows: a sampled bracket + one counting pass (`kth_largest_abs`)."""
    count, numel = rows.shape
    kept = keep_count(numel, density)
    if kept >= numel:
        return None
    if kept <= 0:
        return _infinite(count)
    if numel <= DIRECT_SELECT or rows.dtype != torch.float32:
        return rows.abs().kthvalue(numel - kept + 1, dim=1).values.unsqueeze(1)
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    index = random_positions(numel, min(TENSOR_SAMPLE, numel), generator).to(rows.device)
    sample = rows.index_select(1, index).abs_().cpu()
    ranges = block_ranges(numel, count)
    return kth_largest_abs(lambda: (rows[:, a:b] for a, b in ranges), sample, kept, numel, workspace).unsqueeze(1)


def tensor_thresholds(tau: KeyTau, num_tasks: int, density: float, workspace: Workspace) -> Tensor | None:
    """`row_thresholds` of one tensor of a τ source, from its blocks (the [K, n] stack is never materialised)."""
    numel = tau.numel
    kept = keep_count(numel, density)
    if kept >= numel:
        return None
    if kept <= 0:
        return _infinite(num_tasks)
    ranges = block_ranges(numel, num_tasks)
    if numel <= DIRECT_SELECT:
        magnitudes = workspace.get("direct_abs", (num_tasks, numel), torch.float32, tau.device)
        for start, stop in ranges:
            torch.abs(tau.block(start, stop), out=magnitudes[:, start:stop])
        return magnitudes.kthvalue(numel - kept + 1, dim=1).values.unsqueeze(1).cpu()
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    sample = tau.sample(random_positions(numel, min(TENSOR_SAMPLE, numel), generator, run=1)).abs_().cpu()
    blocks = lambda: (tau.block(start, stop) for start, stop in ranges)  # noqa: E731
    return kth_largest_abs(blocks, sample, kept, numel, workspace, sigmas=TENSOR_SIGMAS).unsqueeze(1)


def stream_thresholds(source: TauSource, density: float) -> Tensor | None:
    """Per task, the magnitude threshold over its whole task vector (all of `source`'s tensors), as [K, 1]."""
    count = source.num_tasks
    total = source.total_numel()
    kept = keep_count(total, density)
    if kept >= total:
        return None
    if kept <= 0:
        return _infinite(count)

    def blocks():
        for _key, tau in source.iterate():
            for start, stop in block_ranges(tau.numel, count):
                yield tau.block(start, stop)

    if total <= DIRECT_SELECT:
        magnitudes = torch.cat([block.abs().cpu() for block in blocks()], dim=1)
        return magnitudes.kthvalue(total - kept + 1, dim=1).values.unsqueeze(1)
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    sample = source.sample(min(select_ops.STREAM_SAMPLE, total), generator).abs_().cpu()
    return kth_largest_abs(blocks, sample, kept, total, source.workspace).unsqueeze(1)
