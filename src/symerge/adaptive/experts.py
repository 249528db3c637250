"""Expert outputs on the adaptation set, computed ONCE before adaptation and kept on CPU.

After this pass the experts are no longer needed: the trainer reads their logits / features from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from symerge.adaptive.inputs import Inputs, batch_indices, encode_all, num_samples
from symerge.adaptive.merged_encoder import MergedEncoder


@dataclass
class ExpertCache:
    """Per task: expert head outputs [N, ...] and encoder features [N, ...] on the adaptation inputs."""

    outputs: dict[str, Tensor]
    features: dict[str, Tensor]
    forward_passes: dict[str, int] = field(default_factory=dict)  # samples run through each expert
    seconds: float = 0.0

    def runs_per_sample(self) -> dict[str, float]:
        return {t: self.forward_passes[t] / max(len(self.outputs[t]), 1) for t in self.outputs}


@torch.no_grad()
def compute_expert_cache(
    merged: MergedEncoder,
    heads: dict[str, nn.Module],
    inputs: dict[str, Inputs],
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> ExpertCache:
    """Run each expert (θ_pre + τ_k with its own head) once over its task's adaptation inputs."""
    import time

    from tqdm.auto import tqdm

    start = time.perf_counter()
    outputs: dict[str, Tensor] = {}
    features: dict[str, Tensor] = {}
    passes: dict[str, int] = {}
    merged.encoder.eval()
    for task in tqdm(merged.tasks, desc="expert outputs", disable=not progress, leave=False):
        params = merged.task_params(task)
        head = heads[task].eval()
        features[task] = encode_all(merged.encoder, inputs[task], params, batch_size, device)
        outputs[task] = torch.cat([head(features[task][i].to(device)).float().cpu()
                                   for i in batch_indices(len(features[task]), batch_size)])
        passes[task] = num_samples(inputs[task])
        del params
    return ExpertCache(outputs=outputs, features=features, forward_passes=passes, seconds=time.perf_counter() - start)
