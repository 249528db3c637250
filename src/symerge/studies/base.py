"""What every study shares: the registry, the context a study runs in, and running one adaptive variant.

A study is a function `study(ctx: StudyContext) -> StudyOutput`, registered once with

    @register_study("ablation", reproduces="paper Table 5 and Table B")
    def ablation(ctx): ...

It gets a built benchmark (pretrained encoder, experts, heads, task pool) and the suite's adaptation settings, runs
what it needs (most studies are a list of `Variant`s: one adaptive method with options), and returns JSON-able
data, a Markdown section and figures. `studies.runner` builds the benchmark per suite / seed and writes the output.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from symerge.adaptive.experts import ExpertCache
from symerge.batching import Inputs, num_samples, take
from symerge.errors import ValidationError
from symerge.evaluation.metrics import mean, normalized, primary_of
from symerge.result import MergeResult
from symerge.suites.runner import (AdaptSettings, Benchmark, adaptive_result, expert_cache_for, primary_scores,
                                   static_result)
from symerge.taskvectors import TaskVectors

Figure = Callable[[Path], None]  # draws one figure into the given file path
Scorer = Callable[[Tensor, Tensor], float]  # (outputs, labels) -> a task's primary score (higher is better)


@dataclass(frozen=True)
class Variant:
    """One adaptive run of a study: a row label, the adaptive method, its options, and TrainerConfig overrides."""

    label: str
    method: str = "symerge"
    options: Mapping[str, Any] = field(default_factory=dict)
    trainer: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"lr": 1e-3}; unset = the suite's settings


@dataclass
class VariantOutcome:
    label: str
    per_task: dict[str, float]
    average: float
    normalized_average: float
    seconds: float
    result: MergeResult

    def row(self) -> dict[str, Any]:
        """The JSON-able part (the result stays in memory)."""
        return {"label": self.label, "per_task": self.per_task, "average": self.average,
                "normalized_average": self.normalized_average, "seconds": self.seconds}


@dataclass
class StudyOutput:
    """What a study returns: JSON-able data, a Markdown body, figures {file name: draw(path)}, and the adaptation
    steps it ran where it chose its own (None: the suite's), so the report's set-up line states what ran."""

    data: dict[str, Any]
    markdown: str
    figures: dict[str, Figure] = field(default_factory=dict)
    steps: int | None = None


@dataclass
class StudyContext:
    """A built benchmark and how to adapt on it; caches what several variants share (task vectors, expert passes)."""

    suite: str
    bench: Benchmark
    settings: AdaptSettings  # the suite's adaptation settings (seed, device and precision applied)
    protocol: str
    seed: int
    quick: bool
    reference: dict[str, float]  # each expert's own test score (normalized accuracy's denominator)
    progress: bool = True
    log: Callable[[str], None] = print
    cross_task_samples: int | None = None  # first test samples per task read by cross-task studies (None: all)
    options: dict[str, Any] = field(default_factory=dict)  # the study's own options (`StudySpec.options`)
    _tv: TaskVectors | None = None
    _caches: dict[float, ExpertCache] = field(default_factory=dict)
    _references: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return self.bench.task_names

    @property
    def device(self) -> str:
        return str(self.settings.device)

    def task_vectors(self) -> TaskVectors:
        if self._tv is None:
            self._tv = self.bench.task_vectors(self.settings.storage_dtype)
        return self._tv

    def adapt_inputs(self) -> dict[str, Inputs]:
        return self.bench.tasks.adapt_inputs(self.protocol)

    def adapt_labels(self) -> dict[str, Tensor]:
        """True labels of the adaptation inputs (label-using references only)."""
        return self.bench.tasks.adapt_targets(self.protocol)

    def expert_cache(self, scale: float = 1.0) -> ExpertCache:
        """The teachers' outputs on the adaptation inputs: θ_pre + scale · τ_k with task k's head (1.0 = the experts)."""
        if scale not in self._caches:
            self._caches[scale] = expert_cache_for(self.bench, self.task_vectors(), self.adapt_inputs(), self.settings,
                                                   self.progress, scale)
        return self._caches[scale]

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)

    def scorers(self) -> dict[str, Scorer]:
        """Each task's primary score from raw outputs (accuracy, mIoU, 1/error), as its TaskData scores it."""
        return {t: primary_of(self.bench.tasks[t].scorer) for t in self.tasks}

    def cross_task_data(self) -> tuple[dict[str, Inputs], dict[str, Tensor]]:
        """The first `cross_task_samples` test inputs and labels per task (all when unset)."""
        n = self.cross_task_samples
        inputs = {t: d.test if n is None else take(d.test, slice(0, min(n, num_samples(d.test))))
                  for t, d in self.bench.tasks.items()}
        labels = {t: d.test_labels if n is None else d.test_labels[:n] for t, d in self.bench.tasks.items()}
        return inputs, labels

    def split_reference(self, split: str) -> dict[str, float]:
        """The experts' own scores on a labeled split: `reference` for "test"; computed once for "val"."""
        if split == "test":
            return self.reference
        if split not in self._references:
            individual = static_result("individual", self.bench, self.task_vectors(), {})
            self._references[split] = primary_scores(individual, self.bench, self.device, split)
        return self._references[split]

    def normalized(self, per_task: Mapping[str, float], split: str = "test") -> float:
        return mean(normalized(dict(per_task), self.split_reference(split)))

    def score(self, result: MergeResult, split: str = "test") -> dict[str, float]:
        return primary_scores(result, self.bench, self.device, split)

    def variant_settings(self, variant: Variant, curve: list[int]) -> AdaptSettings:
        """The suite's settings with the variant's trainer overrides and method options layered on its method."""
        overridden = self.settings.overriding(variant.method, variant.trainer, variant.options)
        return overridden.model_copy(update={"curve": list(curve)})

    def adapt(self, variant: Variant, cache: ExpertCache | None, curve: list[int],
              on_point: Callable[[dict[str, float]], None] | None = None, split: str = "test") -> tuple[
            MergeResult, list[dict[str, float]], dict[str, float], float]:
        """Train one variant, scoring the test (or validation) split at the `curve` steps on the way: (result, curve
        points with average / normalized_average / seconds, final per-task scores, adaptation seconds). `on_point`
        sees each point as it is scored."""
        def point(per_task: dict[str, float]) -> dict[str, float]:
            scored = {"average": mean(per_task), "normalized_average": self.normalized(per_task, split)}
            if on_point is not None:
                on_point(scored)
            return scored

        start = time.perf_counter()
        result, points, scores = adaptive_result(
            variant.method, self.bench, self.task_vectors(), self.adapt_inputs(), cache or self.expert_cache(),
            self.variant_settings(variant, curve), self.progress, point, split=split)
        seconds = float(result.provenance.get("adapt_seconds", time.perf_counter() - start))
        return result, points, {t: s.primary for t, s in scores.items()}, seconds

    def run_variant(self, variant: Variant, cache: ExpertCache | None = None) -> VariantOutcome:
        """Train one variant with the suite's settings (plus its overrides) and score it on the test split."""
        result, _points, per_task, seconds = self.adapt(variant, cache, [])
        outcome = VariantOutcome(variant.label, per_task, mean(per_task), self.normalized(per_task), seconds, result)
        self.log(f"{variant.label:>28s}: normalized {outcome.normalized_average:.4f} ({seconds:.0f}s)")
        return outcome

    def run_curve(self, variant: Variant, marks: list[int], split: str = "test") -> list[dict[str, float]]:
        """Train one variant, returning its score on `split` at each of `marks` steps (the last one: the variant's
        steps)."""
        pending = iter(sorted(marks))

        def log_point(scored: dict[str, float]) -> None:  # as each point is scored: long runs are not silent
            self.log(f"{variant.label:>28s} @ {next(pending, '?')}: normalized {scored['normalized_average']:.4f}")

        _result, points, _per_task, _seconds = self.adapt(variant, None, marks, log_point, split)
        return points

    def run_variants(self, variants: list[Variant]) -> dict[str, VariantOutcome]:
        return {v.label: self.run_variant(v) for v in variants}


def positive_number(option: str) -> Callable[[Any], float]:
    """A study-option check: a finite number > 0 (bools refused), returned as float."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValidationError(f"study option '{option}' must be a positive number, got {value!r}")
        return float(value)

    return check


StudyFn = Callable[[StudyContext], StudyOutput]


@dataclass(frozen=True)
class StudySpec:
    name: str
    fn: StudyFn
    reproduces: str  # the paper's figure / table this study reproduces
    summary: str  # one line for `symerge study --list` and the README
    min_tasks: int = 1  # checked before the benchmark is built (cross-task studies need pairs of tasks)
    # The options `StudyContext.option` may read: name -> check(value) returning the value to use (raise
    # ValidationError naming the option); `run_study` checks them before building anything, refuses unknown ones.
    options: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)


STUDIES: dict[str, StudySpec] = {}


def register_study(name: str, *, reproduces: str, summary: str, min_tasks: int = 1,
                   options: Mapping[str, Callable[[Any], Any]] | None = None) -> Callable[[StudyFn], StudyFn]:
    """Function decorator: register a study under `name`."""

    def wrap(fn: StudyFn) -> StudyFn:
        if name in STUDIES and STUDIES[name].fn is not fn:
            raise ValueError(f"study '{name}' is already registered")
        STUDIES[name] = StudySpec(name, fn, reproduces, summary, min_tasks, dict(options or {}))
        return fn

    return wrap


def study_names() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> StudySpec:
    if name not in STUDIES:
        raise ValidationError(f"unknown study '{name}'; available: {', '.join(STUDIES)}")
    return STUDIES[name]


def variants_table(outcomes: Mapping[str, VariantOutcome], tasks: list[str]) -> str:
    """Markdown table: one row per variant, per-task score (%), average and normalized average."""
    header = ["variant", *tasks, "avg", "norm. avg", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for o in outcomes.values():
        cells = [o.label, *(f"{100 * o.per_task[t]:.1f}" for t in tasks), f"{100 * o.average:.1f}",
                 f"**{100 * o.normalized_average:.1f}**", f"{o.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
