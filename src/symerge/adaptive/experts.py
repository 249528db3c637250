"""Expert outputs on the adaptation set, computed ONCE before adaptation and kept on CPU.

After this pass the experts are no longer needed: the trainer reads their logits / features from the cache, one
batch at a time, moved to the training device by `ExpertCache.batch` (the cache itself stays on the CPU, where
memory is cheap).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from symerge.adaptive.distributed import current_world, gather_rows, shard_range, sum_scalars
from symerge.batching import Inputs, batch_indices, encode_all, num_samples, take
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.devices import autocast, floating_dtype, module_on
from symerge.errors import ValidationError


@dataclass
class ExpertCache:
    """Per task: the teacher's head outputs [N, ...] and encoder features [N, ...] on the adaptation inputs.

    The teacher of task k is θ_pre + scale · τ_k with task k's head; `scale` 1.0 (the default) is the expert itself.
    """

    outputs: dict[str, Tensor]
    features: dict[str, Tensor]
    forward_passes: dict[str, int] = field(default_factory=dict)  # samples the expert encoder actually ran on
    seconds: float = 0.0
    scale: float = 1.0  # teacher = θ_pre + scale · τ_k (paper Fig. 6a); part of a checkpointed run's fingerprint

    def runs_per_sample(self) -> dict[str, float]:
        return {t: self.forward_passes[t] / max(len(self.outputs[t]), 1) for t in self.outputs}

    def batch(self, kind: str, task: str, index: Tensor, device: torch.device | str) -> Tensor:
        """Rows `index` of the cached expert `kind` ("outputs" / "features") of `task`, moved to `device`."""
        table = self.outputs if kind == "outputs" else self.features
        return table[task][index].to(device, non_blocking=True)


@contextmanager
def count_samples(module: nn.Module) -> Iterator[list[int]]:
    """Counts the samples `module` really runs forward on (first output dimension of every call)."""
    seen = [0]

    def hook(_module: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() > 0:
            seen[0] += int(output.shape[0])

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@torch.no_grad()
def compute_expert_cache(
    merged: MergedEncoder,
    heads: dict[str, nn.Module],
    inputs: dict[str, Inputs],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
    precision: str = "fp32",
    scale: float = 1.0,
) -> ExpertCache:
    """Run each teacher (θ_pre + scale · τ_k with task k's head; scale 1.0 = the expert) once over its task's
    adaptation inputs.

    Under torchrun each rank runs its contiguous slice and the slices are gathered, so every rank holds the whole
    cache after ~1/N of the work."""
    from tqdm.auto import tqdm

    if not math.isfinite(scale):
        raise ValidationError(f"teacher scale must be a finite number, got {scale!r}")
    start = time.perf_counter()
    outputs: dict[str, Tensor] = {}
    features: dict[str, Tensor] = {}
    passes: dict[str, int] = {}
    world = current_world()
    merged.encoder.eval()
    for task in tqdm(merged.tasks, desc="expert outputs", disable=not (progress and world.is_main), leave=False):
        params = merged.task_params(task, scale)
        head = module_on(heads[task], device).eval()
        mine = take(inputs[task], shard_range(num_samples(inputs[task]), world))
        with count_samples(merged.encoder) as seen, autocast(device, precision):
            local = encode_all(merged.encoder, mine, params, batch_size, device)
            dtype = floating_dtype(head)
            local_out = torch.cat([head(local[i].to(device, dtype)).float().cpu()
                                   for i in batch_indices(len(local), batch_size)])
        features[task], outputs[task] = gather_rows(local, world), gather_rows(local_out, world)
        passes[task] = int(sum_scalars([seen[0]], world)[0])
        del params
    return ExpertCache(outputs=outputs, features=features, forward_passes=passes, seconds=time.perf_counter() - start,
                       scale=float(scale))
