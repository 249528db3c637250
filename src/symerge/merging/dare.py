"""DARE (Yu et al., "Language Models are Super Mario", ICML 2024): Drop And REscale, then merge.

Each task vector entry is dropped with probability p = `drop_rate` (paper default 0.9) and survivors are rescaled
by 1/(1−p), so E[τ̃] = τ. The sparsified vectors are then merged by `base`: "task_arithmetic" (λ = `scaling_coef`)
or "ties" (with `density`, `trim_scope`, `disjoint_merge` as in `ties`).

Random stream (reproducible, and what the tests regenerate): one `torch.Generator().manual_seed(seed)`; for each
merged tensor in merge order (state-dict order, or the order of `keys`), one int32 draw per entry of its [K, *shape]
stack in C order (tasks in pool order), i.e. `torch.empty([K, *shape], dtype=torch.int32).random_(generator=g)`,
uniform on [0, 2^31). An entry survives iff its draw is >= ceil(p · 2^31) (probability 1 − p up to 2^-31), and
becomes fl(τ / (1 − p)); dropped entries become 0. (Integer draws are about twice as fast as `torch.rand` on CPU;
releases before the streaming engine drew `torch.rand` and kept entries with draw >= p, so seeds give other masks.)
drop_rate = 0 draws nothing and returns `base` exactly. Methods that visit τ twice (global TIES thresholds, then
the merge) replay the same stream, so the masks are drawn once per pass but are always the same.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.merging.ops import keep_mask, random_drop
from symerge.merging.registry import register_stream
from symerge.merging.stream import KeyTau, TauSource, block_ranges, round_to_storage
from symerge.merging.task_arithmetic import task_arithmetic_stream
from symerge.merging.ties import check_ties_options, ties_stream
from symerge.taskvectors import TaskVectors


def check_drop_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate < 1.0:
        raise ValidationError(f"dare: drop_rate must be in [0, 1), got {drop_rate}")


def drop_and_rescale(tv: TaskVectors, drop_rate: float, seed: int) -> TaskVectors:
    """Return new task vectors with DARE applied independently per task and entry (the stream above)."""
    check_drop_rate(drop_rate)
    generator = torch.Generator().manual_seed(seed)
    return tv.map(lambda _key, vec: random_drop(vec, drop_rate, generator))


class _DroppedKey(KeyTau):
    def __init__(self, source: "DroppedTau", inner: KeyTau, generator: torch.Generator):
        self.source = source
        self.inner = inner
        self.numel = inner.numel
        self.device = inner.device
        shape = (source.num_tasks, inner.numel)
        # the tensor's draws, in stream order, as soon as the tensor is visited
        self.draws = source.workspace.get("dare_draws", shape, torch.int32, self.device).random_(generator=generator)

    def _drop(self, tau: Tensor, start: int, stop: int) -> Tensor:
        keep = keep_mask(self.draws[:, start:stop], self.source.drop_rate,
                         out=self.source.workspace.get("dare_keep", tuple(tau.shape), torch.float32, self.device))
        tau.mul_(keep).div_(1.0 - self.source.drop_rate)
        return round_to_storage(tau, self.source.storage_dtype)  # as if τ̃ were stored like τ

    def block(self, start: int, stop: int) -> Tensor:
        return self._drop(self.inner.block(start, stop), start, stop)

    def sample(self, index: Tensor) -> Tensor:
        values = self.inner.sample(index)
        keep = keep_mask(self.draws[:, index.to(self.device)], self.source.drop_rate)
        return round_to_storage(values.mul_(keep).div_(1.0 - self.source.drop_rate), self.source.storage_dtype)

    def full(self) -> Tensor:
        tau = self.inner.full()
        for start, stop in block_ranges(self.numel, self.source.num_tasks):
            self._drop(tau[:, start:stop], start, stop)
        return tau


class DroppedTau(TauSource):
    """τ̃ = DARE(τ) of another τ source; every pass (`iterate`) replays the random stream from `seed`."""

    def __init__(self, base: TauSource, drop_rate: float, seed: int):
        self.base = base
        self.drop_rate = drop_rate
        self.seed = seed
        self.tasks = base.tasks
        self.keys = base.keys
        self.shapes = base.shapes
        self.storage_dtype = base.storage_dtype
        self.workspace = base.workspace

    def iterate(self) -> Iterator[tuple[str, KeyTau]]:
        generator = torch.Generator().manual_seed(self.seed)
        for key, tau in self.base.iterate():
            yield key, _DroppedKey(self, tau, generator)

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        """A sample of τ̃'s distribution (own masks from `generator`; it only guides bracketing)."""
        values = self.base.sample(count, generator)
        keep = torch.rand(values.shape, generator=generator) >= self.drop_rate
        return values * keep / (1.0 - self.drop_rate)


def dare_stream(
    source: TauSource,
    sink,
    *,
    drop_rate: float = 0.9,
    seed: int = 0,
    base: str = "task_arithmetic",
    scaling_coef: float = 0.3,
    density: float = 0.2,
    trim_scope: str = "global",
    disjoint_merge: str = "mean",
) -> None:
    """Separable DARE: drop and rescale τ block by block, merged by `base` on the fly."""
    if base not in ("task_arithmetic", "ties"):
        raise ValidationError(f"dare: base must be 'task_arithmetic' or 'ties', got '{base}'")
    check_drop_rate(drop_rate)
    if base == "ties":
        check_ties_options(density, trim_scope, disjoint_merge)
    dropped = DroppedTau(source, drop_rate, seed) if drop_rate > 0.0 else source
    if base == "ties":
        ties_stream(dropped, sink, density=density, scaling_coef=scaling_coef, trim_scope=trim_scope,
                    disjoint_merge=disjoint_merge)
    else:
        task_arithmetic_stream(dropped, sink, scaling_coef=scaling_coef)


dare = register_stream("dare", dare_stream, "DARE sparsification followed by task arithmetic or TIES (`base`).")
