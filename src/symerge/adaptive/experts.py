"""Expert outputs on the adaptation set, computed ONCE before adaptation and kept on CPU.

After this pass the experts are no longer needed: the trainer reads their logits / features from the cache, one
batch at a time, moved to the training device by `ExpertCache.batch` (the cache itself stays on the CPU, where
memory is cheap).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from symerge.adaptive.inputs import Inputs, batch_indices, encode_all
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.devices import autocast, module_on


@dataclass
class ExpertCache:
    """Per task: expert head outputs [N, ...] and encoder features [N, ...] on the adaptation inputs."""

    outputs: dict[str, Tensor]
    features: dict[str, Tensor]
    forward_passes: dict[str, int] = field(default_factory=dict)  # samples the expert encoder actually ran on
    seconds: float = 0.0

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
) -> ExpertCache:
    """Run each expert (θ_pre + τ_k with its own head) once over its task's adaptation inputs."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    outputs: dict[str, Tensor] = {}
    features: dict[str, Tensor] = {}
    passes: dict[str, int] = {}
    merged.encoder.eval()
    for task in tqdm(merged.tasks, desc="expert outputs", disable=not progress, leave=False):
        params = merged.task_params(task)
        head = module_on(heads[task], device).eval()
        with count_samples(merged.encoder) as seen, autocast(device, precision):
            features[task] = encode_all(merged.encoder, inputs[task], params, batch_size, device)
            outputs[task] = torch.cat([head(features[task][i].to(device)).float().cpu()
                                       for i in batch_indices(len(features[task]), batch_size)])
        passes[task] = seen[0]
        del params
    return ExpertCache(outputs=outputs, features=features, forward_passes=passes, seconds=time.perf_counter() - start)
