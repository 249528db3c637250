"""A small decorator registry of static merge methods.

A method is a pure function `fn(tv: TaskVectors, **options) -> dict[str, Tensor]` returning the merged update Δ
(float32) per merged tensor; `merge()` adds it to θ_pre. Methods whose result differs per task (EMR) return
`PerTaskDelta` instead. Options are keyword-only parameters with defaults; unknown options are rejected by name.

A method that is *separable* — Δ of a tensor needs only that tensor's τ, plus at most a few scalars gathered in an
earlier pass (e.g. global TIES thresholds) — can also register `stream=fn_stream`, with the same options:
`fn_stream(source: TauSource, sink, **options)` reads τ tensor by tensor (block by block) and writes Δ into the sink
(see `merging.stream`). `merge()` then runs it straight on the state dicts and never materialises the stacked task
vectors; `fn` should produce the same Δ (`register_stream` derives it from the stream form).
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
    stream: MergeFn | None = None  # separable implementation on a τ source (see the module docstring)

    @property
    def separable(self) -> bool:
        return self.stream is not None and not self.per_task

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults overridden by `options`; an unknown option, or one not of its declared type (the parameter's
        annotation, e.g. `scaling_coef="x"`), raises naming it."""
        from symerge.option_types import check_types, declared_types

        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValidationError(
                f"method '{self.name}' has no option '{unknown[0]}'; valid options: {sorted(self.defaults) or 'none'}"
            )
        typed = check_types(self.name, options, declared_types(self.stream or self.fn, list(options)))
        return {**self.defaults, **typed}


_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, per_task: bool = False, stream: MergeFn | None = None) -> Callable[[MergeFn], MergeFn]:
    """Register `fn` under `name`; its keyword-only parameters (with defaults) are the method's options.

    `stream`: optional separable implementation `stream(source, sink, **options)` taking the same options.
    """

    def decorator(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY:
            raise ValueError(f"merge method '{name}' registered twice")
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, defaults=defaults, per_task=per_task, stream=stream)
        return fn

    return decorator


def register_stream(name: str, stream: MergeFn, doc: str) -> MergeFn:
    """Register a separable method from its stream form alone: `fn(tv, **options)` is derived (the stream run over
    every tensor of `tv`), so the options are declared once, as the stream's keyword-only parameters."""
    from symerge.merging.stream import stream_delta

    def fn(tv: Any, **options: Any) -> Delta:
        return stream_delta(stream, tv, **options)

    options = [p for p in inspect.signature(stream).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    tv_param = inspect.Parameter("tv", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fn.__signature__ = inspect.Signature([tv_param, *options])  # type: ignore[attr-defined]
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return register(name, stream=stream)(fn)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ValidationError(f"unknown merge method '{name}'; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
