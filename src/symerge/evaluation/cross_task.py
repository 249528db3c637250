"""The paper's pilot diagnostic: encoder of task i (θ_pre + τ_i) read by the head of task j on task j's data.

Off-diagonal accuracy above the pretrained encoder's means synergy; at the pretrained level, non-interference.
Features of every (encoder i, data j) pair are computed once and read by every set of heads passed in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from symerge.batching import Inputs, encode_all
from symerge.devices import floating_dtype, module_on
from symerge.evaluation.metrics import accuracy


@torch.no_grad()
def cross_task_matrices(
    encoder: nn.Module,
    encoder_params: Mapping[str, Mapping[str, Tensor]],
    head_sets: Mapping[str, Mapping[str, nn.Module]],
    inputs: Mapping[str, Inputs],
    labels: Mapping[str, Tensor],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, list[list[float]]]:
    """{head set name: K×K accuracy matrix [i][j]} for encoders i and tasks j (the same task order as `inputs`)."""
    tasks = list(inputs)
    matrices = {name: [[0.0] * len(tasks) for _ in tasks] for name in head_sets}
    on_device, built = encoder, -1
    pairs = [(i, j) for i in range(len(tasks)) for j in range(len(tasks))]
    for i, j in tqdm(pairs, desc="cross-task matrix", disable=not progress, leave=False):
        if built != i:  # one device copy per encoder, read by every task's data
            on_device, built = module_on(encoder, device, replace=encoder_params[tasks[i]]).eval(), i
        feats = encode_all(on_device, inputs[tasks[j]], None, batch_size, device)
        for name, heads in head_sets.items():
            head = module_on(heads[tasks[j]], device).eval()
            matrices[name][i][j] = accuracy(head(feats.to(device, floating_dtype(head))).float().cpu(), labels[tasks[j]])
    return matrices


def off_diagonal_mean(matrix: list[list[float]]) -> float:
    values = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
    return float(sum(values) / len(values)) if values else float("nan")
