"""A baseline's hyper-parameters on the suite (`symerge study tuning`): one adaptive method over a grid of learning
rates and method options, scored at every curve step, beside task arithmetic (the bar every merging method must
clear). It is how a baseline's configuration is chosen and shown to be fair: a baseline below task arithmetic at
every learning rate and step is weak on the suite, not under-tuned.

Options: `method` (an adaptive method, default WEMoE), `lrs` (learning rates), `grid` ({method option: [values]},
crossed with the learning rates), `trainer` (TrainerConfig fields for every run, e.g. {update: summed}), `steps`
(default: the method's configured steps), `curve` (the steps scored on the way; default steps/4, steps/2) and
`split` (the labeled split scored: `test`, or `val` to choose a setting without looking at the test split; each
task's expert is scored on the same split as the reference).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError as PydanticError

from symerge.adaptive.config import TrainerConfig
from symerge.adaptive.registry import get_adaptive
from symerge.errors import ValidationError
from symerge.evaluation.metrics import mean
from symerge.studies.bars import bars_figure
from symerge.studies.base import StudyContext, StudyOutput, Variant, positive_number, register_study
from symerge.suites.runner import static_result
from symerge.suites.tasks import SCORED_SPLITS

DEFAULT_LRS = (1e-4, 1e-3)


def method_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"study option 'method' must be an adaptive method name, got {value!r}")
    get_adaptive(value)  # names the available methods when unknown
    return value


def learning_rates(value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValidationError(f"study option 'lrs' must be a non-empty list of learning rates, got {value!r}")
    return [positive_number("lrs")(lr) for lr in value]


def option_grid(value: Any) -> dict[str, list[Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValidationError(f"study option 'grid' must map method option names to lists of values, got {value!r}")
    grid = {}
    for name, values in value.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValidationError(f"study option 'grid': '{name}' must list at least one value, got {values!r}")
        grid[name] = list(values)
    return grid


def trainer_overrides(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"study option 'trainer' must map TrainerConfig fields to values, got {value!r}")
    if "lr" in value or "steps" in value:
        raise ValidationError("study option 'trainer': set learning rates with 'lrs' and steps with 'steps'")
    try:
        TrainerConfig(**value)
    except PydanticError as err:
        raise ValidationError(f"study option 'trainer': {err}") from None
    return dict(value)


def step_count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"study option 'steps' must be an integer ≥ 1, got {value!r}")
    return value


def step_list(value: Any) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"study option 'curve' must be a list of step counts, got {value!r}")
    return sorted({step_count(s) for s in value})


def scored_split(value: Any) -> str:
    if not isinstance(value, str) or value not in SCORED_SPLITS:  # a YAML list / mapping is unhashable
        raise ValidationError(f"study option 'split' must be one of {list(SCORED_SPLITS)}, got {value!r}")
    return str(value)


OPTIONS = {"method": method_name, "lrs": learning_rates, "grid": option_grid, "trainer": trainer_overrides,
           "steps": step_count, "curve": step_list, "split": scored_split}


def variants(method: str, lrs: list[float], grid: Mapping[str, list[Any]], trainer: Mapping[str, Any],
             steps: int) -> list[Variant]:
    """The learning rates crossed with every combination of the grid's method options (labels name each)."""
    names = list(grid)
    runs = []
    for lr, values in itertools.product(lrs, itertools.product(*(grid[n] for n in names))):
        options = dict(zip(names, values))
        label = ", ".join([f"lr={lr:g}", *(f"{n}={v}" for n, v in options.items())])
        runs.append(Variant(label, method=method, options=options, trainer={**trainer, "lr": lr, "steps": steps}))
    return runs


def check_grid(method: str, grid: Mapping[str, list[Any]]) -> None:
    """Every grid value through the method's own option checks, before any training."""
    spec = get_adaptive(method)
    for name, values in grid.items():
        for value in values:
            try:
                spec.check_options({name: value})
            except ValidationError as err:
                raise ValidationError(f"study option 'grid': {err}") from None


def curve_table(rows: Mapping[str, list[dict[str, float]]], marks: list[int], baseline: float) -> str:
    header = ["run", *(f"{m} steps" for m in marks), "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             "| task arithmetic | " + " | ".join(f"{100 * baseline:.1f}" for _ in marks) + " | – |"]
    for label, curve in rows.items():
        by_step = {int(p["iterations"]): p for p in curve}
        cells = [f"{100 * by_step[m]['normalized_average']:.1f}" if m in by_step else "–" for m in marks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {curve[-1]['seconds']:.0f} |")
    return "\n".join(lines)


@register_study("tuning", reproduces="a baseline's configuration (its paper / official code against this suite)",
                summary="one adaptive method over learning rates and options, normalized score per step, against "
                        "task arithmetic", options=OPTIONS)
def tuning(ctx: StudyContext) -> StudyOutput:
    method = ctx.option("method", "wemoe")
    grid = ctx.option("grid", {})
    check_grid(method, grid)
    configured = ctx.settings.trainer_config(method, ctx.progress).resolved(get_adaptive(method).trains_coefficients_only(
        ctx.settings.method_options.get(method, {})))
    steps = ctx.option("steps", int(configured.steps))
    marks = sorted({m for m in ctx.option("curve", [max(1, steps // 4), max(1, steps // 2)]) if m < steps} | {steps})
    runs = variants(method, ctx.option("lrs", list(DEFAULT_LRS)), grid, ctx.option("trainer", {}), steps)
    split = ctx.option("split", "test")
    ta = ctx.score(static_result("task_arithmetic", ctx.bench, ctx.task_vectors(), {}), split)
    baseline = ctx.normalized(ta, split)
    curves: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        curves[run.label] = ctx.run_curve(run, marks, split)
    best_label, best = max(((label, c[-1]["normalized_average"]) for label, c in curves.items()), key=lambda x: x[1])
    markdown = "\n\n".join([
        f"Method `{method}`, {steps} steps; normalized average (%) on the {SCORED_SPLITS[split]} split at each step, "
        f"task arithmetic (the suite's λ) as the bar.", curve_table(curves, marks, baseline),
        f"Best final: {best_label} at {100 * best:.1f} % against task arithmetic's {100 * baseline:.1f} %."])
    final = {label: c[-1]["normalized_average"] for label, c in curves.items()}
    headline = {"task_arithmetic": baseline, **final}
    figures = {"tuning.png": bars_figure({"final normalized": final}, title=f"{method}: final normalized score",
                                         ylabel="normalized average (%)", lines={"task arithmetic": baseline})}
    data = {"headline": headline, "method": method, "marks": marks, "split": split, "task_arithmetic": {"per_task": ta,
            "average": mean(ta), "normalized_average": baseline}, "curves": curves}
    return StudyOutput(data=data, markdown=markdown, figures=figures, steps=steps)
