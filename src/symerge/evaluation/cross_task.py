"""The paper's pilot diagnostic: encoder of task i (θ_pre + τ_i) read by the head of task j on task j's data.

Off-diagonal accuracy above the pretrained encoder's means synergy; at the pretrained level, non-interference.
Features of every (encoder i, data j) pair are computed once (`encoder_features`) and read by every set of heads
(`score_matrix`): the suites' diagnostics and the studies (`symerge study pilot / head-transfer`) share them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from symerge.batching import Inputs, batch_indices, encode_all
from symerge.devices import floating_dtype, module_on
from symerge.evaluation.metrics import accuracy

Scorer = Callable[[Tensor, Tensor], float]  # (head outputs, labels) -> score, higher is better


@torch.no_grad()
def encoder_features(
    encoder: nn.Module,
    encoder_params: Mapping[str, Mapping[str, Tensor]],
    inputs: Mapping[str, Inputs],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "encoder features",
) -> dict[str, dict[str, Tensor]]:
    """features[e][t] (CPU, float32): `encoder` with the weights `encoder_params[e]` over task t's inputs.

    One device copy per encoder; inputs that several tasks share (the same object, e.g. the dense suite's scenes)
    are encoded once per encoder."""
    features: dict[str, dict[str, Tensor]] = {}
    for name, params in tqdm(encoder_params.items(), desc=desc, disable=not progress, leave=False):
        on_device = module_on(encoder, device, replace=params).eval()
        done: dict[int, Tensor] = {}
        features[name] = {}
        for task, x in inputs.items():
            if id(x) not in done:
                done[id(x)] = encode_all(on_device, x, None, batch_size, device)
            features[name][task] = done[id(x)]
        del on_device
    return features


@torch.no_grad()
def head_outputs(head: nn.Module, features: Tensor, batch_size: int = 64, device: str = "cpu") -> Tensor:
    """`head` over precomputed features, in batches on `device`; outputs on CPU in float32."""
    on_device = module_on(head, device).eval()
    dtype = floating_dtype(on_device)
    return torch.cat([on_device(features[index].to(device, dtype)).float().cpu()
                      for index in batch_indices(len(features), batch_size)])


def score_matrix(
    features: Mapping[str, Mapping[str, Tensor]],
    heads: Mapping[str, nn.Module],
    labels: Mapping[str, Tensor],
    scorers: Mapping[str, Scorer] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> list[list[float]]:
    """M[i][j] = task j's score of task j's head reading the features of encoder i (rows in `features` order,
    columns in `labels` order). `scorers` default to top-1 accuracy."""
    tasks = list(labels)
    matrix = []
    for row in features.values():
        cells = []
        for task in tasks:
            score = (scorers or {}).get(task, accuracy)
            cells.append(float(score(head_outputs(heads[task], row[task], batch_size, device), labels[task])))
        matrix.append(cells)
    return matrix


def cross_task_matrices(
    encoder: nn.Module,
    encoder_params: Mapping[str, Mapping[str, Tensor]],
    head_sets: Mapping[str, Mapping[str, nn.Module]],
    inputs: Mapping[str, Inputs],
    labels: Mapping[str, Tensor],
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    scorers: Mapping[str, Scorer] | None = None,
) -> dict[str, list[list[float]]]:
    """{head set name: K×K score matrix [i][j]} for encoders i and tasks j (the same task order as `inputs`)."""
    tasks = list(inputs)
    features = encoder_features(encoder, {t: encoder_params[t] for t in tasks}, inputs, batch_size, device, progress,
                                desc="cross-task matrix")
    ordered = {t: labels[t] for t in tasks}
    return {name: score_matrix(features, heads, ordered, scorers, batch_size, device)
            for name, heads in head_sets.items()}


def off_diagonal_mean(matrix: list[list[float]]) -> float:
    values = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
    return float(sum(values) / len(values)) if values else float("nan")


def column_off_diagonal_means(matrix: list[list[float]]) -> list[float]:
    """Per column j: the mean over rows i ≠ j (task j's head on every foreign encoder; the paper's Fig. 2 / 3b)."""
    size = len(matrix)
    return [float(sum(matrix[i][j] for i in range(size) if i != j) / (size - 1)) if size > 1 else float("nan")
            for j in range(size)]
