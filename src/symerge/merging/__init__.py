"""Static (training-free) merge methods on plain state dicts.

    merged = symerge.merging.merge("ties", pretrained, {"a": sd_a, "b": sd_b}, density=0.2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from symerge.merging.registry import Delta, MethodSpec, PerTaskDelta, available_methods, get_method, register
from symerge.merging.stream import MergedSink, StateDictTau
from symerge.taskvectors import TaskVectors, resolve_dtype
from symerge.validation import StateDict, validate_state_dicts

# Importing the method modules registers them.
from symerge.merging import weight_averaging, task_arithmetic, ties, dare, magmax, lines, consensus, pcb, tsv, iso, emr  # noqa: E402,F401  isort: skip

__all__ = [
    "merge", "merge_task_vectors", "merge_delta", "available_methods", "get_method", "register",
    "Delta", "PerTaskDelta", "MethodSpec",
]


def merge_delta(method: str, tv: TaskVectors, **options: Any) -> Delta | PerTaskDelta:
    """Run a registered method on task vectors; returns the merged update Δ (or one per task)."""
    spec = get_method(method)
    return spec.fn(tv, **spec.resolve_options(options))


def merge_task_vectors(method: str, tv: TaskVectors, **options: Any) -> dict[str, Tensor] | dict[str, dict[str, Tensor]]:
    """θ_pre + Δ; for a per-task method (EMR), a dict task -> state dict."""
    delta = merge_delta(method, tv, **options)
    if isinstance(delta, PerTaskDelta):
        return {task: tv.apply(d) for task, d in delta.per_task.items()}
    return tv.apply(delta)


def merge(
    method: str,
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    keys: Iterable[str] | None = None,
    storage_dtype: torch.dtype | str = torch.float32,
    **options: Any,
) -> dict[str, Tensor] | dict[str, dict[str, Tensor]]:
    """Merge expert state dicts into one state dict with a registered static method.

    `pretrained` is a dict name -> tensor, `experts` a dict task -> state dict of the same layout. The inputs are
    validated first (missing keys, shape / dtype mismatch, NaN / Inf raise `ValidationError` naming task and
    tensor). `keys` restricts merging to those tensors (others are copied from `pretrained`); integer buffers are
    always copied. Method options are keyword arguments (see each method's docstring).

    Separable methods (task_arithmetic, weight_averaging, ties, dare, magmax: see `registry`) stream: after the
    whole input is validated, τ is computed and merged one tensor (one cache-sized block) at a time straight into
    the output, so the working memory is one tensor's stack instead of K copies of the model. The others build
    `TaskVectors` and run `merge_task_vectors`. Both give the same result.
    """
    spec = get_method(method)
    resolved = spec.resolve_options(options)  # fail on a bad name / option before any work
    if not spec.separable:
        tv = TaskVectors.from_state_dicts(pretrained, experts, keys=keys, dtype=storage_dtype)
        return merge_task_vectors(method, tv, **options)
    storage = resolve_dtype(storage_dtype)
    key_list = list(keys) if keys is not None else None
    validate_state_dicts(pretrained, experts, key_list)
    source = StateDictTau(pretrained, experts, key_list, storage)
    sink = MergedSink(pretrained, source.workspace)
    spec.stream(source, sink, **resolved)
    return sink.result()
