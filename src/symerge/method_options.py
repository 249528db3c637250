"""Method options checked before anything is loaded: against each method's declared options, their types and values.

Static methods declare their options as keyword-only parameters (`merging.registry`): the annotations give the
types (checked with pydantic), and the method's own value checks run on a toy problem of the same number of tasks
(a few 8 × 8 tensors), so `density: 7` fails in milliseconds instead of after loading the checkpoints. Adaptive
methods declare theirs as constructor parameters (+ `build_trainer`'s keywords) and their value checks when they
register (`adaptive.registry.register_adaptive(..., checks=...)`); `build_trainer`'s keywords are checked here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from symerge.errors import ValidationError
from symerge.option_types import OptionError, blamed_option, check_types, declared_types  # noqa: F401 - re-exported


# --- static methods ------------------------------------------------------------------------------------------------
def toy_problem(num_tasks: int) -> Any:
    """Task vectors of `num_tasks` tasks on a few small tensors named like an encoder's."""
    from symerge.taskvectors import TaskVectors

    gen = torch.Generator().manual_seed(0)
    names = [f"encoder.layer.{i}.{part}" for i in range(2) for part in ("weight", "bias")]
    pre = {n: torch.randn((8, 8) if n.endswith("weight") else (8,), generator=gen) for n in names}
    experts = {f"task{k}": {n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in pre.items()}
               for k in range(num_tasks)}
    return TaskVectors.from_state_dicts(pre, experts)


def check_static_options(method: str, options: Mapping[str, Any], num_tasks: int) -> dict[str, Any]:
    """Names (registry), types (annotations) and values (the method run on a toy problem) of a static method's
    options; returns them coerced to their declared types."""
    from symerge.merging import get_method, merge_delta

    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        raise OptionError(unknown[0], f"method '{method}' has no option '{unknown[0]}'; valid options: "
                                      f"{sorted(spec.defaults) or 'none'}")
    typed = check_types(method, options, declared_types(spec.stream or spec.fn, list(spec.defaults)))
    scalars = {k: v for k, v in typed.items() if isinstance(v, (str, int, float, bool)) or v is None}
    try:  # containers (per-task lists, tensor-name maps) refer to the real model: type-checked only
        merge_delta(method, toy_problem(max(num_tasks, 2)), **scalars)
    except (ValidationError, ValueError, TypeError, RuntimeError) as err:
        raise OptionError(blamed_option(str(err), scalars), f"{err}") from None
    return typed


# --- adaptive methods ----------------------------------------------------------------------------------------------
NOT_OPTIONS = ("self", "merged", "heads", "feature_dim")


def adaptive_declared(method: str) -> dict[str, Any]:
    """Option name -> declared type: the method class's constructor (up the class chain) and `build_trainer`."""
    from symerge.adaptive import build_trainer
    from symerge.adaptive.registry import get_adaptive

    types: dict[str, Any] = {}
    for cls in get_adaptive(method).cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is torch.nn.Module or cls is object:
            continue
        params = [n for n, p in inspect.signature(init).parameters.items() if n not in NOT_OPTIONS
                  and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        types = {**declared_types(init, params), **types}
    common = ("granularity", "init", "clamp", "task_kinds")
    return {**types, **declared_types(build_trainer, list(common))}


def adaptive_value_checks(method: str) -> dict[str, Callable[[Any, int], None]]:
    """Value checks of an adaptive method's options: `build_trainer`'s keywords (here) and the method's own (declared
    when it registered)."""
    from symerge.adaptive import resolve_init
    from symerge.adaptive.base import TASK_KINDS
    from symerge.adaptive.merged_encoder import GRANULARITIES
    from symerge.adaptive.registry import get_adaptive, one_of

    def clamp(value: Any, _: int) -> None:
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"must be [low, high] with low ≤ high, got {list(value)}")

    def kinds(value: Any, _: int) -> None:
        for task, kind in (value or {}).items():
            if kind not in TASK_KINDS:
                raise ValueError(f"task '{task}': kind must be one of {list(TASK_KINDS)}, got {kind!r}")

    def per_value(check: Callable[[Any], None]) -> Callable[[Any, int], None]:
        return lambda value, _: check(value)

    common = {"granularity": per_value(one_of(GRANULARITIES)), "init": lambda value, k: resolve_init(value, k) and None,
              "clamp": clamp, "task_kinds": kinds}
    return {**common, **{name: per_value(check) for name, check in get_adaptive(method).checks.items()}}


def check_adaptive_options(method: str, options: Mapping[str, Any], num_tasks: int) -> dict[str, Any]:
    """Names, declared types and value domains of an adaptive method's options; returns them coerced."""
    types = adaptive_declared(method)
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise OptionError(unknown[0], f"method '{method}' has no option '{unknown[0]}'; valid options: {sorted(types)}")
    typed = check_types(method, options, types)
    checks = adaptive_value_checks(method)
    for name, value in typed.items():
        if name in checks:
            try:
                checks[name](value, num_tasks)
            except (ValidationError, ValueError, TypeError) as err:
                raise OptionError(name, f"method '{method}': {err}") from None
    return typed
