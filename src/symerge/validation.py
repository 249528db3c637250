"""Up-front checks on pretrained / expert state dicts, shared by `ModelPool` and `merging.merge`.

Every failure names the task and the tensor so a user can fix the right checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from symerge.errors import ValidationError, subject

StateDict = Mapping[str, Tensor]


def layout(state: StateDict, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of `state[key]`, without reading it when `state` is lazy (has `layout(key)`, e.g.
    `tensorio.LazyStateDict`: tensors left in their files)."""
    lazy = getattr(state, "layout", None)
    if lazy is not None:
        return lazy(key)
    tensor = state[key]
    return tuple(tensor.shape), tensor.dtype


def is_lazy(state: object) -> bool:
    return callable(getattr(state, "layout", None))


def check_task_names(names: Iterable[str]) -> list[str]:
    """Task names must be non-empty strings and unique."""
    seen: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValidationError(f"task name {name!r} must be a non-empty string")
        if name in seen:
            raise ValidationError(f"duplicate task name '{name}'")
        seen.append(name)
    return seen


def all_finite(tensor: Tensor) -> bool:
    """Exactly whether a floating tensor holds no NaN / Inf, in one read-only pass and without a temporary.

    `aminmax` propagates NaN into both results, and an Inf is the max (+Inf) or the min (−Inf), so both results are
    finite iff every entry is (no summation tricks, which would let Inf − Inf or overflow slip through).
    """
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def check_finite(state: StateDict, owner: str, keys: Iterable[str] | None = None) -> None:
    """Reject NaN / Inf in floating tensors (integer buffers cannot hold them)."""
    for key in keys if keys is not None else state.keys():
        if is_lazy(state) and not layout(state, key)[1].is_floating_point:
            continue  # not read at all
        tensor = state[key]
        if tensor.is_floating_point() and not all_finite(tensor):
            n_bad = int((~torch.isfinite(tensor.detach())).sum())
            raise ValidationError(f"{owner}: tensor '{key}' has {n_bad} non-finite value(s) (NaN or Inf)")


def check_same_layout(reference: StateDict, other: StateDict, owner: str, keys: Iterable[str] | None = None) -> None:
    """`other` must have exactly the keys, shapes and dtypes of `reference` (restricted to `keys` if given)."""
    wanted = list(keys) if keys is not None else list(reference.keys())
    missing = [k for k in wanted if k not in other]
    if missing:
        raise ValidationError(f"{owner}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if keys is None:
        extra = [k for k in other if k not in reference]
        if extra:
            raise ValidationError(f"{owner}: unexpected tensor '{extra[0]}' not in the pretrained model"
                                  + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for key in wanted:
        if not is_lazy(other) and not isinstance(other[key], Tensor):
            raise ValidationError(f"{owner}: entry '{key}' is a {type(other[key]).__name__}, not a tensor")
        (ref_shape, ref_dtype), (shape, dtype) = layout(reference, key), layout(other, key)
        if tuple(shape) != tuple(ref_shape):
            raise ValidationError(f"{owner}: tensor '{key}' has shape {tuple(shape)}, pretrained has {tuple(ref_shape)}")
        if dtype != ref_dtype:
            raise ValidationError(f"{owner}: tensor '{key}' has dtype {dtype}, pretrained has {ref_dtype}; load "
                                  "every checkpoint in one dtype (merge config: set model.dtype: float32)")


def validate_state_dicts(
    pretrained: StateDict,
    experts: Mapping[str, StateDict],
    keys: Iterable[str] | None = None,
    min_experts: int = 1,
) -> None:
    """Validate a pretrained state dict and named expert state dicts before merging them."""
    if not isinstance(pretrained, Mapping):
        raise ValidationError(f"pretrained must be a dict of tensors, got {type(pretrained).__name__}")
    if not isinstance(experts, Mapping):
        raise ValidationError(f"experts must be a dict task -> state dict, got {type(experts).__name__}")
    names = check_task_names(experts.keys())
    if len(names) < min_experts:
        raise ValidationError(f"need at least {min_experts} expert(s), got {len(names)}")
    key_list = list(keys) if keys is not None else None
    for key in key_list if key_list is not None else pretrained.keys():
        if key not in pretrained:
            raise ValidationError(f"pretrained: missing tensor '{key}'")
        if not is_lazy(pretrained) and not isinstance(pretrained[key], Tensor):
            raise ValidationError(f"pretrained: entry '{key}' is a {type(pretrained[key]).__name__}, not a tensor")
    with subject("pretrained"):
        check_finite(pretrained, "pretrained", key_list)
    for task, state in experts.items():
        owner = f"expert '{task}'"
        with subject("expert", task):
            if not isinstance(state, Mapping):
                raise ValidationError(f"{owner}: expected a state dict, got {type(state).__name__}")
            check_same_layout(pretrained, state, owner, key_list)
            check_finite(state, owner, key_list)
