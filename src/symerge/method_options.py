"""Method options checked before anything is loaded: against each method's declared options, their types and values.

Static methods declare their options as keyword-only parameters (`merging.registry`): the annotations give the
types (checked with pydantic), and the method's own value checks run on a toy problem of the same number of tasks
(a few 8 × 8 tensors), so `density: 7` fails in milliseconds instead of after loading the checkpoints. Adaptive
methods declare theirs as constructor parameters (+ `build_trainer`'s keywords); their value domains are the
adaptive package's own constants (`FILTER_RULES`, `GRANULARITIES`, ...).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

import pydantic
import torch

from symerge.errors import ValidationError


class OptionError(ValidationError):
    """A bad option; `option` names it (None: the options as a whole)."""

    def __init__(self, option: str | None, why: str):
        super().__init__(why)
        self.option = option


def declared_types(fn: Callable[..., Any], names: list[str]) -> dict[str, Any]:
    """Resolved annotations of `fn`'s parameters `names` (Any where a parameter has none)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is simply not type-checked
        hints = {}
    return {n: hints.get(n, Any) for n in names}


def check_types(method: str, options: Mapping[str, Any], types: Mapping[str, Any]) -> dict[str, Any]:
    """Each option validated (and coerced, e.g. a YAML list to a tuple) against its declared type."""
    out = {}
    for name, value in options.items():
        adapter = pydantic.TypeAdapter(types.get(name, Any), config=pydantic.ConfigDict(arbitrary_types_allowed=True))
        try:
            out[name] = adapter.validate_python(value)
        except pydantic.ValidationError as err:
            expected = getattr(types.get(name), "__name__", None) or str(types.get(name)).replace("typing.", "")
            raise OptionError(name, f"method '{method}': option '{name}': {value!r} is not a valid {expected} "
                                    f"({err.errors()[0]['msg']})") from None
    return out


def blamed_option(message: str, options: Mapping[str, Any]) -> str | None:
    """The option a method's error message is about (its name appears in the message), if any."""
    for name in options:
        if re.search(rf"\b{re.escape(name)}\b", message):
            return name
    return None


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
    from symerge.adaptive import ADAPTIVE_METHODS, build_trainer

    types: dict[str, Any] = {}
    for cls in ADAPTIVE_METHODS[method].__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls is torch.nn.Module or cls is object:
            continue
        params = [n for n, p in inspect.signature(init).parameters.items() if n not in NOT_OPTIONS
                  and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        types = {**declared_types(init, params), **types}
    common = ("granularity", "init", "clamp", "task_kinds")
    return {**types, **declared_types(build_trainer, list(common))}


def adaptive_value_checks() -> dict[str, Callable[[Any, int], None]]:
    """Value domains of adaptive options, from the adaptive package's own constants and parsers."""
    from symerge.adaptive import resolve_init
    from symerge.adaptive.base import TASK_KINDS
    from symerge.adaptive.merged_encoder import GRANULARITIES
    from symerge.adaptive.objectives import FILTER_RULES, LABEL_TYPES
    from symerge.adaptive.symerge_method import parse_task_layer

    def one_of(choices: tuple[str, ...]) -> Callable[[Any, int], None]:
        def check(value: Any, _: int) -> None:
            if value is not None and value not in choices:
                raise ValueError(f"must be one of {list(choices)}, got {value!r}")
        return check

    def clamp(value: Any, _: int) -> None:
        if value is not None and not value[0] <= value[1]:
            raise ValueError(f"must be [low, high] with low ≤ high, got {list(value)}")

    def positive(value: Any, _: int) -> None:
        if not value > 0:
            raise ValueError(f"must be > 0, got {value!r}")

    def kinds(value: Any, _: int) -> None:
        for task, kind in (value or {}).items():
            if kind not in TASK_KINDS:
                raise ValueError(f"task '{task}': kind must be one of {list(TASK_KINDS)}, got {kind!r}")

    return {
        "filter_rule": one_of(FILTER_RULES), "labels": one_of(LABEL_TYPES), "granularity": one_of(GRANULARITIES),
        "init": lambda value, k: resolve_init(value, k) and None, "clamp": clamp, "temperature": positive,
        "rank": positive, "task_layer": lambda value, _: parse_task_layer(value) and None, "task_kinds": kinds,
    }


def check_adaptive_options(method: str, options: Mapping[str, Any], num_tasks: int) -> dict[str, Any]:
    """Names, declared types and value domains of an adaptive method's options; returns them coerced."""
    types = adaptive_declared(method)
    unknown = sorted(set(options) - set(types))
    if unknown:
        raise OptionError(unknown[0], f"method '{method}' has no option '{unknown[0]}'; valid options: {sorted(types)}")
    typed = check_types(method, options, types)
    checks = adaptive_value_checks()
    for name, value in typed.items():
        if name in checks:
            try:
                checks[name](value, num_tasks)
            except (ValidationError, ValueError, TypeError) as err:
                raise OptionError(name, f"method '{method}': {err}") from None
    return typed
