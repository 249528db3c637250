"""Encoders the cross-task studies read: θ_pre + Σ_k w_k^l τ_k^l for fixed per-tensor weights.

The pilot reads pairwise weight averages (w = ½ e_i + ½ e_j) and the task-arithmetic merge;
head-transfer reads one task vector at its method's own λ row (θ_pre + λ_i^l τ_i^l, paper Table 4 "Cross").
States are built on access (`LazyStates`), so at most one extra copy of the encoder is alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from symerge.adaptive.merged_encoder import group_index
from symerge.errors import ValidationError
from symerge.result import MergeResult
from symerge.taskvectors import TaskVectors


def combined_state(tv: TaskVectors, weights: Tensor) -> dict[str, Tensor]:
    """θ_pre + Σ_k w[l, k] τ_k^l for weights [n_tensors, K] (rows in `tv.keys` order), or [K] for every tensor."""
    if weights.dim() == 1:
        weights = weights.expand(len(tv.keys), -1)
    if tuple(weights.shape) != (len(tv.keys), tv.num_tasks):
        raise ValidationError(f"weights have shape {tuple(weights.shape)}, expected ({len(tv.keys)}, {tv.num_tasks})")
    delta = {}
    for row, key in enumerate(tv.keys):
        stack = tv.vectors[key]
        w = weights[row].to(torch.promote_types(stack.dtype, torch.float32))
        delta[key] = torch.tensordot(w, stack.to(w.dtype), dims=1)
    return tv.apply(delta)


class LazyStates(Mapping[str, dict[str, Tensor]]):
    """{name: encoder state}, each built when read (never all at once)."""

    def __init__(self, names: Sequence[str], build: Callable[[str], dict[str, Tensor]]):
        self._names, self._build = list(names), build

    def __getitem__(self, name: str) -> dict[str, Tensor]:
        if name not in self._names:
            raise KeyError(name)
        return self._build(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def one_hot_weights(tv: TaskVectors, coefs: Mapping[int, float]) -> Tensor:
    """[K] weights with `coefs[k]` at task index k and 0 elsewhere."""
    weights = torch.zeros(tv.num_tasks, dtype=torch.float64)
    for index, value in coefs.items():
        weights[index] = value
    return weights


def single_task_states(tv: TaskVectors, coefs: Tensor) -> LazyStates:
    """{task i: θ_pre + coefs[:, i] ⊙ τ_i} for per-tensor coefficients [n_tensors, K]: task i's own λ row only."""
    def build(task: str) -> dict[str, Tensor]:
        index = tv.tasks.index(task)
        weights = torch.zeros_like(coefs)
        weights[:, index] = coefs[:, index]
        return combined_state(tv, weights)

    return LazyStates(tv.tasks, build)


def uniform_lambdas(tv: TaskVectors, value: float) -> Tensor:
    """Per-tensor λ [n_tensors, K] of task arithmetic: the same `value` everywhere."""
    return torch.full((len(tv.keys), tv.num_tasks), float(value), dtype=torch.float64)


def per_tensor_lambdas(result: MergeResult, tv: TaskVectors) -> Tensor:
    """A λ-learning method's λ [n_tensors, K] (rows in `tv.keys` order), expanded from its λ rows (per tensor,
    block or task, as `result.provenance["granularity"]` says)."""
    if result.lambdas is None:
        raise ValidationError(f"method '{result.method}' has no learned λ")
    granularity = str(result.provenance.get("granularity", "tensor"))
    names, rows = group_index(tv.keys, granularity)
    if names != list(result.lambda_rows) or list(result.tasks) != list(tv.tasks):
        raise ValidationError(f"method '{result.method}': its λ rows / tasks do not match these task vectors")
    return result.lambdas.detach().to("cpu", torch.float64)[rows]
