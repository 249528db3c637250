"""Stateless, seeded sampling: the batch of step s for task k depends only on (seed, k, s).

This makes resuming from a checkpoint reproduce an uninterrupted run exactly, without saving sampler state.
Each task's samples are visited in epochs of a fresh seeded permutation, so every sample is used once per epoch.
With token lengths given, each permutation is grouped by length (chunks of `GROUP` batches are sorted by length,
then the batches are shuffled), so a batch pads only to similar lengths — the same idea as HF `group_by_length`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from symerge.batching import num_samples

GROUP = 16  # batches per length-sorted chunk


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


class TaskSampler:
    """Batches for one task; `lengths` (token counts per sample) enables length grouping."""

    def __init__(self, seed: int, task_index: int, num: int, batch_size: int, lengths: Tensor | None = None):
        self.seed, self.task_index, self.num = seed, task_index, num
        self.batch_size = min(batch_size, num)
        self.lengths = lengths
        self._cache: dict[int, Tensor] = {}

    def epoch(self, epoch: int) -> Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = self.permutation(epoch)
        return self._cache[epoch]

    def permutation(self, epoch: int) -> Tensor:
        generator = torch.Generator().manual_seed(derived_seed(self.seed, 1, self.task_index, epoch))
        order = torch.randperm(self.num, generator=generator)
        if self.lengths is None:
            return order
        chunk = self.batch_size * GROUP
        grouped = [c[torch.argsort(self.lengths[c], stable=True)] for c in order.split(chunk)]
        batches = [b for c in grouped for b in c.split(self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [b for b in batches if len(b) != self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return torch.cat(shuffled + rest)

    def batch(self, step: int) -> Tensor:
        """Indices of the batch of `step` (wraps into the next epoch's permutation)."""
        position = step * self.batch_size
        parts = []
        remaining = self.batch_size
        while remaining > 0:
            epoch, offset = divmod(position, self.num)
            take = min(remaining, self.num - offset)
            parts.append(self.epoch(epoch)[offset : offset + take])
            position += take
            remaining -= take
        return torch.cat(parts)


def token_lengths(inputs: object) -> Tensor | None:
    """Token counts per sample for dict inputs with an attention mask, else None."""
    if isinstance(inputs, dict) and "attention_mask" in inputs:
        return inputs["attention_mask"].sum(dim=1)
    return None


def task_order(seed: int, step: int, num_tasks: int) -> list[int]:
    """The seeded random order in which tasks are visited at `step` (paper: randomized each iteration)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 2, step))
    return torch.randperm(num_tasks, generator=generator).tolist()


def make_samplers(seed: int, inputs: Sequence[object], batch_size: int, group_by_length: bool = True) -> list[TaskSampler]:
    return [TaskSampler(seed, k, num_samples(x), batch_size, token_lengths(x) if group_by_length else None)
            for k, x in enumerate(inputs)]
