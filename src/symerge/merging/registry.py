"""A small decorator registry of static merge methods.

A method is a pure function `fn(tv: TaskVectors, **options) -> dict[str, Tensor]` returning the merged update Δ
(float32) per merged tensor; `merge()` adds it to θ_pre. Methods whose result differs per task (EMR) return
`PerTaskDelta` instead. Options are keyword-only parameters with defaults; unknown options are rejected by name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from symerge.errors import ValidationError

Delta = dict[str, Tensor]


@dataclass
class PerTaskDelta:
    """A method result that is task-specific at inference time (e.g. EMR-merging): one Δ per task."""

    per_task: dict[str, Delta]
    shared: Delta | None = None
    extras: dict[str, Any] = field(default_factory=dict)


MergeFn = Callable[..., "Delta | PerTaskDelta"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MergeFn
    defaults: dict[str, Any]
    per_task: bool

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by `options`; an unknown option raises naming it and the valid ones."""
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValidationError(
                f"method '{self.name}' has no option '{unknown[0]}'; valid options: {sorted(self.defaults) or 'none'}"
            )
        return {**self.defaults, **options}


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, per_task: bool = False) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` under `name`; its keyword-only parameters (with defaults) are the method's options."""

    def decorator(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' registered twice")
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, defaults=defaults, per_task=per_task)
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValidationError(f"unknown merge method '{name}'; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
