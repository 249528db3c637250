"""Data-parallel adaptation with `torch.distributed` (launched by `torchrun`; gloo on CPU, nccl on GPU).

Every rank holds the whole model state and draws the same global batches (the samplers are seeded); rank r takes
its slice of every task batch. A task's loss is a mean over "units" (samples, kept samples, pixels), so each rank
scales its mean by units_r / units_total before backward, and the gradients of that task's trainable tensors are
summed over ranks before the (per-task, sequential) optimizer step: the update equals one process on the global
batch. The expert pass is sharded the same way and its outputs gathered. Without a process group (or with one
rank) every function here is the identity, so single-process code pays nothing.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from symerge.errors import ValidationError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (before or after joining the group), or the only process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def rank_device(device: str) -> str:
    """Under torchrun, a bare "cuda" means this rank's own GPU (LOCAL_RANK)."""
    if device == "cuda" and launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def ensure_process_group(device: str) -> World:
    """Join the torchrun process group (once) when launched by torchrun; else the single-process world."""
    if not launched_by_torchrun():
        return current_world()
    if not dist.is_available():
        raise ValidationError("launched by torchrun, but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend)
        # Leaving with the group alive lets gloo's threads outlive the interpreter ("terminate called without an
        # active exception", exit -6): we created it, so we tear it down.
        atexit.register(leave_process_group)
    return current_world()


def leave_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(index: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of a batch's sample indices (sizes differ by at most one)."""
    if not world.active:
        return index
    n = len(index)
    return index[world.rank * n // world.size : (world.rank + 1) * n // world.size]


def shard_range(n: int, world: World) -> slice:
    """This rank's contiguous slice of n samples (for the sharded expert pass)."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def cpu_group() -> object | None:
    """A gloo group for CPU-tensor collectives when the default backend is nccl (None: the default group)."""
    if dist.get_backend() == "gloo":
        return None
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


_CPU_GROUP: object | None = None


def sum_scalars(values: list[float], world: World) -> list[float]:
    """Sum a few numbers over ranks (float64 on the CPU, so counts and loss sums stay exact)."""
    if not world.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, group=cpu_group())
    return tensor.tolist()


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum `params`' gradients over ranks in one flat all-reduce (a missing gradient counts as zeros)."""
    if not world.active or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    flat = torch.cat([g.reshape(-1).to(dtype) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def gather_rows(local: Tensor, world: World) -> Tensor:
    """Concatenate every rank's rows in rank order (CPU tensors; row counts may differ by one)."""
    if not world.active:
        return local
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long), group=cpu_group())
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded.contiguous(), group=cpu_group())
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])
