"""Stateless, seeded sampling: the batch of step s for task k depends only on (seed, k, s).

This makes resuming from a checkpoint reproduce an uninterrupted run exactly, without saving sampler state.
Each task's samples are visited in epochs of a fresh seeded permutation, so every sample is used once per epoch.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


@lru_cache(maxsize=256)
def epoch_permutation(seed: int, task_index: int, epoch: int, num: int) -> Tensor:
    generator = torch.Generator().manual_seed(derived_seed(seed, 1, task_index, epoch))
    return torch.randperm(num, generator=generator)


def batch_for_step(seed: int, task_index: int, step: int, batch_size: int, num: int) -> Tensor:
    """Indices of the batch of `step` for one task (wraps into the next epoch's permutation)."""
    batch_size = min(batch_size, num)
    position = step * batch_size
    parts = []
    remaining = batch_size
    while remaining > 0:
        epoch, offset = divmod(position, num)
        take = min(remaining, num - offset)
        parts.append(epoch_permutation(seed, task_index, epoch, num)[offset : offset + take])
        position += take
        remaining -= take
    return torch.cat(parts)


def task_order(seed: int, step: int, num_tasks: int) -> list[int]:
    """The seeded random order in which tasks are visited at `step` (paper: randomized each iteration)."""
    generator = torch.Generator().manual_seed(derived_seed(seed, 2, step))
    return torch.randperm(num_tasks, generator=generator).tolist()
