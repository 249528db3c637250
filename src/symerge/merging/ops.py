"""Tensor operations shared by merge methods (trim, sign election, disjoint merge, random drop), and the machinery
that runs per-tensor-separable methods as a stream (sinks, block kernels, exact magnitude thresholds).

Streaming: a method written as `stream(source, sink, **options)` reads τ from a `TauSource` one tensor — and inside
a tensor one [K, c] column block — at a time, writes each block's update Δ into `sink.target(...)` and calls
`sink.commit(...)`. `MergedSink` turns Δ straight into θ_pre + Δ (what `merging.merge` returns); `DeltaSink` keeps
Δ (what a registered method returns on `TaskVectors`). Both paths run the same kernels, so they agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from symerge.merging import select_ops
from symerge.merging.select_ops import kth_largest_abs
from symerge.taskvectors import (
    KeyTau, TaskVectors, TaskVectorTau, TauSource, Workspace, block_ranges, compute_dtype, random_positions,
)

DIRECT_SELECT = 1 << 17  # per-task magnitudes up to this many entries: one `kthvalue`; above: bracket + band
TENSOR_SAMPLE = 1 << 15  # sample per task bracketing a per-tensor threshold
TENSOR_SIGMAS = 4.0  # its bracket: ± 4 σ (a miss costs only a radix pass over one tensor)
SAMPLE_SEED = 0x5EED  # seeds the (result-independent) sampling that only guesses selection brackets


def keep_count(numel: int, density: float) -> int:
    """Entries kept when keeping a `density` fraction (TIES: int(d · density))."""
    return int(numel * density)


def magnitude_threshold(abs_values: Tensor, density: float) -> Tensor | None:
    """Threshold t so that |x| >= t keeps the top `density` share of `abs_values` (1-D): t is the k-th largest.

    Exactly k = int(n · density) entries are kept (as in the TIES paper, PEFT and mergekit), except that ties at
    the threshold are all kept (TIES' `>= kthvalue` rule). The official TIES code takes `kthvalue(n − k)`, the
    (k+1)-th largest, and so keeps one entry more. Returns None when everything is kept.
    """
    numel = abs_values.numel()
    kept = keep_count(numel, density)
    if kept >= numel:
        return None
    if kept <= 0:
        return torch.tensor(float("inf"))
    return abs_values.kthvalue(numel - kept + 1).values


def trim_per_tensor(stacked: Tensor, density: float) -> Tensor:
    """Zero all but the top-`density` magnitudes of each task's slice of one tensor ([K, *shape])."""
    flat = stacked.reshape(stacked.shape[0], -1)
    thresholds = row_thresholds(flat, density)
    out = flat.clone()
    if thresholds is not None:
        out.mul_(flat.abs() >= thresholds)
    return out.reshape(stacked.shape)


def global_thresholds(vectors: Mapping[str, Tensor], density: float) -> list[Tensor | None]:
    """Per task, the magnitude threshold over its WHOLE flattened task vector (all tensors together)."""
    if not vectors:
        return []
    num_tasks = next(iter(vectors.values())).shape[0]
    tv = TaskVectors(tasks=[str(k) for k in range(num_tasks)], pretrained={}, vectors=dict(vectors))
    column = stream_thresholds(TaskVectorTau(tv), density)
    if column is None:
        return [None] * num_tasks
    return [column[k, 0].clone() for k in range(num_tasks)]


def trim_with_thresholds(stacked: Tensor, thresholds: list[Tensor | None]) -> Tensor:
    """Apply per-task magnitude thresholds to one tensor's stack."""
    out = stacked.clone()
    for k, threshold in enumerate(thresholds):
        if threshold is not None:
            out[k].mul_(stacked[k].abs() >= threshold)
    return out


def elect_sign(stacked: Tensor, fallback: Tensor | float = 1.0) -> Tensor:
    """TIES sign election by summed mass: sign(Σ_k τ_k); exact zeros take `fallback` (the majority sign)."""
    sign = torch.sign(stacked.sum(dim=0))
    return torch.where(sign == 0, torch.as_tensor(fallback, dtype=sign.dtype), sign)


def disjoint_merge(stacked: Tensor, sign: Tensor, reduce: str = "mean") -> Tensor:
    """Combine only the entries whose sign agrees with the elected sign (±1); `mean` over agreeing tasks or `sum`.

    With γ = ±1, the agreeing entries are those with τ_k·γ > 0, so Σ_agreeing τ_k = γ · Σ_k max(τ_k·γ, 0): one
    float temporary of [K, ...] instead of boolean masks and masked copies.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"disjoint merge reduce must be 'mean' or 'sum', got '{reduce}'")
    agree = (stacked * sign.unsqueeze(0)).clamp_min_(0)
    total = agree.sum(dim=0)
    if reduce == "mean":
        total.div_(agree.sign_().sum(dim=0).clamp_min_(1))
    return total.mul_(sign)


# --------------------------------------------------------------------------------------------------------------
# DARE's random stream
# --------------------------------------------------------------------------------------------------------------

DRAW_LEVELS = 1 << 31  # an int32 `random_()` draw is uniform on [0, 2^31)


def drop_level(drop_rate: float) -> int:
    """An entry survives iff its int32 draw is >= ceil(p · 2^31), i.e. with probability 1 − p (to 2^-31)."""
    return min(math.ceil(drop_rate * DRAW_LEVELS), DRAW_LEVELS)


def keep_mask(draws: Tensor, drop_rate: float, out: Tensor | None = None) -> Tensor:
    """1.0 where the int32 `draws` keep their entry, 0.0 where they drop it (float32)."""
    level = drop_level(drop_rate)
    if out is None:
        out = torch.empty(draws.shape, device=draws.device)
    if level >= DRAW_LEVELS:
        return out.zero_()
    return torch.ge(draws, level, out=out)


def random_drop(stacked: Tensor, drop_rate: float, generator: torch.Generator, rescale: bool = True) -> Tensor:
    """DARE: drop each entry with probability p, rescale survivors by 1/(1−p).

    Draws one int32 `random_()` per entry of `stacked` (C order) from `generator`; see `dare` for the stream.
    """
    if drop_rate <= 0.0:
        return stacked.clone()
    if drop_rate >= 1.0:
        return torch.zeros_like(stacked)
    draws = torch.empty(stacked.shape, dtype=torch.int32, device=stacked.device).random_(generator=generator)
    kept = stacked * keep_mask(draws, drop_rate)
    return kept / (1.0 - drop_rate) if rescale else kept


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


# --------------------------------------------------------------------------------------------------------------
# TIES on one block
# --------------------------------------------------------------------------------------------------------------

def ties_block(tau: Tensor, thresholds: Tensor | None, out: Tensor, reduce: str, scale: float,
               workspace: Workspace) -> tuple[int, tuple[Tensor, Tensor] | None]:
    """TIES on a [K, c] block of τ (overwritten with its trimmed values); writes λ·Δ into `out` [c].

    Zero-vote columns (Σ_k τ̂_k = 0) provisionally take γ = +1. Returns the block's votes Σ sign(Σ_k τ̂_k) and, if
    some zero-vote column has entries of both signs (so γ matters), (their column indices, their τ̂ columns) for
    `ties_negative_fallback` once the majority sign over the whole trim scope is known.
    """
    rows, width = tau.shape
    device = tau.device
    if thresholds is not None:
        magnitude = torch.abs(tau, out=workspace.get("ties_abs", (rows, width), torch.float32, device))
        tau.mul_(torch.ge(magnitude, thresholds.to(device), out=magnitude))  # trim: |τ| >= t (1.0 / 0.0 mask)
    total = torch.sum(tau, dim=0, out=workspace.get("ties_total", (width,), torch.float32, device))
    sign = torch.sign(total, out=workspace.get("ties_sign", (width,), torch.float32, device))
    votes = int(sign.sum())  # exact: a sum of ±1 / 0 in float32 below 2^24 terms
    zero = torch.eq(total, 0, out=workspace.get("ties_zero", (width,), torch.float32, device))
    sign.add_(zero)
    agree = torch.mul(tau, sign, out=workspace.get("ties_agree", (rows, width), torch.float32, device))
    agree.clamp_min_(0)  # |τ̂_k| where τ̂_k agrees with γ, else 0
    torch.sum(agree, dim=0, out=out)
    if reduce == "mean":
        count = torch.sum(agree.sign_(), dim=0, out=workspace.get("ties_count", (width,), torch.float32, device))
        out.div_(count.clamp_min_(1))
    ambiguous = None
    if float(zero.mul_(out).max()) > 0:  # zero vote but agreeing mass: entries of both signs cancelled exactly
        index = torch.nonzero(zero).squeeze(1)
        ambiguous = (index, tau.index_select(1, index))
    out.mul_(sign).mul_(scale)
    return votes, ambiguous


def ties_negative_fallback(columns: Tensor, reduce: str, scale: float) -> Tensor:
    """λ·Δ of zero-vote columns (trimmed τ̂, [K, m]) with γ = −1: the same operations as `ties_block`."""
    sign = torch.full((columns.shape[1],), -1.0, device=columns.device)
    agree = torch.mul(columns, sign).clamp_min_(0)
    out = agree.sum(dim=0)
    if reduce == "mean":
        out.div_(agree.sign_().sum(dim=0).clamp_min_(1))
    return out.mul_(sign).mul_(scale)
