"""The adaptive methods, registered once: `@register_adaptive(name, ...)` on an `AdaptiveMethod` subclass.

Everything that needs the list reads it from here: `adapt` / `build_trainer`, the merge config (`config.py`), the
CLI (`symerge methods`), the suites (`suites.runner`) and the up-front option checks (`method_options.py`). So a
new adaptive method is ONE file: its class, decorated with

    @register_adaptive("mine", granularity="tensor", checks={"alpha": positive})
    class Mine(AdaptiveMethod): ...

plus an import in `adaptive/__init__.py` for a built-in method (a plugin only has to be imported). Its options
are its constructor's keyword parameters (their annotations are the types the config checks); `checks` adds value
checks (`check(value)` raises ValueError on a bad value) run before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from symerge.errors import ValidationError

Check = Callable[[Any], None]
CoefficientsOnly = bool | Callable[[Mapping[str, Any]], bool]  # fixed, or decided by the run's options


@dataclass(frozen=True)
class AdaptiveSpec:
    """What the rest of symerge knows about an adaptive method."""

    name: str
    cls: type  # an `AdaptiveMethod` subclass; built as cls(merged, heads, task_kinds=..., **options)
    granularity: str = "tensor"  # default λ granularity ("tensor": one λ per tensor and task; "task": one per task)
    coefficients_only: CoefficientsOnly = False  # trains λ alone: the regime's coefficient-only rate (App. A.1)
    learns_lambdas: bool = True  # λ is trained (its λ map and loss history go into suite reports)
    checks: Mapping[str, Check] = field(default_factory=dict)  # value checks of the method's own options
    # Option defaults per TrainerConfig regime (a paper's per-domain settings); options the caller gives win.
    regime_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options_for(self, regime: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options a run uses: the regime's defaults for this method, overridden by the given options."""
        return {**self.regime_options.get(regime, {}), **options}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """The method's value checks on the options given: a ValidationError naming the method and the option."""
        for name, value in options.items():
            if name in self.checks:
                try:
                    self.checks[name](value)
                except (ValueError, TypeError) as err:
                    raise ValidationError(f"{self.name} option '{name}': {err}") from None

    def trains_coefficients_only(self, options: Mapping[str, Any]) -> bool:
        """Whether a run with these options trains λ alone (SyMerge with `train_layer=False` does)."""
        if callable(self.coefficients_only):
            return bool(self.coefficients_only(options))
        return self.coefficients_only


ADAPTIVE: dict[str, AdaptiveSpec] = {}


def register_adaptive(
    name: str,
    *,
    granularity: str = "tensor",
    coefficients_only: CoefficientsOnly = False,
    learns_lambdas: bool = True,
    checks: Mapping[str, Check] | None = None,
    regime_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[type], type]:
    """Class decorator: register an `AdaptiveMethod` subclass under `name` (also set as the class's `name`)."""

    def wrap(cls: type) -> type:
        if name in ADAPTIVE and ADAPTIVE[name].cls is not cls:
            raise ValueError(f"adaptive method '{name}' is already registered")
        cls.name = name
        ADAPTIVE[name] = AdaptiveSpec(name, cls, granularity, coefficients_only, learns_lambdas, dict(checks or {}),
                                      {regime: dict(opts) for regime, opts in (regime_options or {}).items()})
        return cls

    return wrap


def unregister_adaptive(name: str) -> None:
    """Remove a registered method (tests register throw-away methods)."""
    ADAPTIVE.pop(name, None)


def adaptive_methods() -> list[str]:
    """Names of every registered adaptive method, sorted."""
    return sorted(ADAPTIVE)


def is_adaptive(name: str) -> bool:
    return name in ADAPTIVE


def get_adaptive(name: str) -> AdaptiveSpec:
    if name not in ADAPTIVE:
        raise ValidationError(f"unknown adaptive method '{name}'; available: {adaptive_methods()}")
    return ADAPTIVE[name]


# --- value checks methods declare --------------------------------------------------------------------------------
def one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> None:
        if value is not None and value not in choices:
            raise ValueError(f"must be one of {list(choices)}, got {value!r}")

    return check


def positive(value: Any) -> None:
    if not value > 0:
        raise ValueError(f"must be > 0, got {value!r}")
