"""Run a list of merge methods on one benchmark and evaluate them the same way (shared by every suite).

A benchmark is the model pool — a pretrained encoder, each task's expert (fine-tuned encoder tensors + head) — and
the task pool (`suites.tasks.TaskPool`): per task unlabeled adaptation inputs, labeled test data, a small labeled
validation split (used only by `task_arithmetic_val`, which picks λ on it, the TALL-masks protocol) and a scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from symerge.adaptive import TrainerConfig, build_trainer, compute_expert_cache
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.registry import adaptive_methods, is_adaptive
from symerge.batching import Inputs
from symerge.errors import ValidationError
from symerge.evaluation.metrics import TaskScore, mean, normalized
from symerge.merging import available_methods, merge_delta
from symerge.merging.registry import PerTaskDelta
from symerge.result import MergeResult
from symerge.suites.memory import track
from symerge.suites.tasks import TaskData, TaskPool
from symerge.taskvectors import TaskVectors

__all__ = ["AdaptSettings", "Benchmark", "MethodOutcome", "TaskData", "TaskPool", "run_methods", "known_methods"]

SPECIAL = ("pretrained", "individual", "task_arithmetic_val")
MERGED_BASELINES_EXCLUDED = ("pretrained", "individual")
PostMerge = Callable[[MergeResult], MergeResult]  # optional step applied to every merged result before evaluation


@dataclass
class Benchmark:
    encoder: nn.Module  # pretrained weights
    heads: dict[str, nn.Module]  # experts' heads
    experts: dict[str, dict[str, Tensor]]  # experts' fine-tuned encoder tensors (the merged keys)
    tasks: TaskPool  # the task pool (a plain {name: TaskData} mapping is wrapped)

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, TaskPool):
            self.tasks = TaskPool(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def pretrained_state(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def task_vectors(self, dtype: str = "float32") -> TaskVectors:
        """τ of every expert, stored in `dtype` (bfloat16 halves τ's memory; merges still compute in fp32)."""
        base = self.encoder.state_dict()
        keys = list(next(iter(self.experts.values())).keys())
        return TaskVectors.from_state_dicts(base, self.experts, keys=keys, dtype=dtype)


SUITE_TRAINER_DEFAULTS = {"regime": "nlp", "steps": 200, "batch_size": 16, "lr": 1e-2, "layer_lr": 1e-2}


class AdaptSettings(TrainerConfig):
    """A suite's adaptation settings: every `TrainerConfig` field (suite defaults: `SUITE_TRAINER_DEFAULTS`, fixed
    values rather than the regime's) plus what a suite adds: τ storage, the curve, per-method overrides."""

    model_config = ConfigDict(extra="forbid")

    storage_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="dtype τ is stored in for every method of the run (bfloat16: half the memory; "
        "θ = θ_pre + Σ λ τ is still computed in fp32)")
    curve: list[int] = Field(default_factory=lambda: [25, 50, 100, 200])
    per_method: dict[str, dict[str, Any]] = Field(default_factory=dict)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    ta_grid: list[float] = Field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0])

    @model_validator(mode="before")
    @classmethod
    def suite_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {**SUITE_TRAINER_DEFAULTS, **data}
        return data

    def overriding(self, method: str, trainer: Mapping[str, Any] | None = None,
                   options: Mapping[str, Any] | None = None) -> "AdaptSettings":
        """A copy in which `method` runs with these TrainerConfig overrides and method options on top of its own."""
        return self.model_copy(update={
            "per_method": {**self.per_method, method: {**self.per_method.get(method, {}), **(trainer or {})}},
            "method_options": {**self.method_options, method: {**self.method_options.get(method, {}),
                                                               **(options or {})}},
        })

    def trainer_config(self, method: str, progress: bool) -> TrainerConfig:
        base = self.model_dump(include=set(TrainerConfig.model_fields), exclude_unset=False)
        return TrainerConfig(**{**base, "progress": progress, **self.per_method.get(method, {})})


@dataclass
class MethodOutcome:
    result: MergeResult
    seconds: float
    peak_memory_mb: float
    per_task: dict[str, float] = field(default_factory=dict)  # primary score per task (accuracy, mIoU, 1/error)
    ece: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # every metric per task
    curve: list[dict[str, float]] = field(default_factory=list)
    notes: str = ""


# --- rows that run an adaptive method the way a paper names a variant of it ---------------------------------------
@dataclass(frozen=True)
class RowVariant:
    """A suite row running a registered adaptive method another way: trainer overrides on top of the method's own
    suite settings (`per_method[method]`, then `per_method[row]`), and optionally the λ another row learned as its
    fixed starting point (a method that does not learn λ keeps it: Surgery w/ Ada)."""

    method: str
    about: str  # one line for the report's notes and the README
    trainer: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # method options on top of the method's suite options
    lambdas_from: str | None = None  # a row that must run first; its learned λ (and granularity) start this row


ROW_VARIANTS: dict[str, RowVariant] = {
    "adamerging_summed": RowVariant(
        "adamerging", "AdaMerging as its official code runs it: the K tasks' entropies summed, one update per iteration",
        trainer={"update": "summed"}),
    "surgery_ada": RowVariant(
        "surgery", "Surgery w/ Ada (the paper's vision rows): adapters on AdaMerging's merged encoder, λ taken from "
        "the adamerging row", lambdas_from="adamerging"),
    # The paper filters SyMerge's self-labels in the vision regime only (its regime default); each suite reports the
    # other setting beside it.
    "symerge_filtered": RowVariant(
        "symerge", "SyMerge with the relative confidence filter (the paper's vision setting)",
        options={"filter_rule": "code"}),
    "symerge_unfiltered": RowVariant(
        "symerge", "SyMerge without the confidence filter (the paper's NLP and dense setting)",
        options={"filter_rule": "none"}),
    # The text and vision suites adapt one encoder block per task (measured better than the head there, paper
    # Table B's choice); this row is the paper's main-table choice, the classifier head, beside it.
    "symerge_head": RowVariant(
        "symerge", "SyMerge with the classifier head as its task-specific layer (the paper's vision and NLP choice)",
        options={"task_layer": "head"}),
}


def known_methods() -> list[str]:
    return list(SPECIAL) + available_methods() + adaptive_methods() + list(ROW_VARIANTS)


def row_method(name: str) -> str:
    """The registered method a row runs (a row variant's method, else the row's own name)."""
    return ROW_VARIANTS[name].method if name in ROW_VARIANTS else name


def is_adaptive_row(name: str) -> bool:
    return is_adaptive(row_method(name))


def check_methods(methods: Sequence[str]) -> None:
    known = known_methods()
    for name in methods:
        if name not in known:
            raise ValidationError(f"unknown method '{name}'; available: {known}")
        source = ROW_VARIANTS[name].lambdas_from if name in ROW_VARIANTS else None
        if source is not None and source not in methods:
            raise ValidationError(f"method '{name}' starts from the λ that '{source}' learns: add '{source}' to the "
                                  f"method list")


def row_settings(name: str, settings: AdaptSettings, outcomes: Mapping[str, MethodOutcome]) -> AdaptSettings:
    """The settings a row runs its method with: a row variant's trainer overrides and starting λ layered on the
    method's own settings (a plain method's row: the settings unchanged)."""
    if name not in ROW_VARIANTS:
        return settings
    variant = ROW_VARIANTS[name]
    options = {**variant.options, **settings.method_options.get(name, {})}
    if variant.lambdas_from is not None:
        source = outcomes[variant.lambdas_from].result
        if source.lambdas is None:
            raise ValidationError(f"method '{name}': the '{variant.lambdas_from}' row learned no λ to start from")
        options.update(init=source.lambdas, granularity=source.provenance["granularity"])
    return settings.overriding(variant.method, {**variant.trainer, **settings.per_method.get(name, {})}, options)


def run_order(methods: Sequence[str]) -> list[str]:
    """individual first (normalized scores need it), then the methods, each row variant after the row it starts
    from."""
    order = ["individual"] + [m for m in methods if m != "individual"]
    dependent = [m for m in order if m in ROW_VARIANTS and ROW_VARIANTS[m].lambdas_from is not None]
    return [m for m in order if m not in dependent] + dependent


# --- evaluation ------------------------------------------------------------------------------------------------
def score(result: MergeResult, bench: Benchmark, device: str, split: str = "test") -> dict[str, TaskScore]:
    """Each task's TaskScore (its data's scorer) on the test (or validation) split."""
    return bench.tasks.score(result, device, split)


def primary_and_ece(scores: Mapping[str, TaskScore]) -> tuple[dict[str, float], dict[str, float]]:
    return ({t: s.primary for t, s in scores.items()}, {t: s.ece for t, s in scores.items() if s.ece is not None})


def primary_scores(result: MergeResult, bench: Benchmark, device: str, split: str = "test") -> dict[str, float]:
    """The primary score per task (accuracy, mIoU, ...) on the test (or validation) split."""
    return primary_and_ece(score(result, bench, device, split))[0]


# --- static results ------------------------------------------------------------------------------------------------
def static_result(name: str, bench: Benchmark, tv: TaskVectors, options: Mapping[str, Any]) -> MergeResult:
    base = bench.pretrained_state()
    if name == "pretrained":
        return MergeResult(name, bench.task_names, bench.encoder, base, dict(bench.heads))
    if name == "individual":
        return MergeResult(name, bench.task_names, bench.encoder, base, dict(bench.heads),
                           task_overrides={t: dict(bench.experts[t]) for t in bench.task_names})
    delta = merge_delta(name, tv, **options)
    if isinstance(delta, PerTaskDelta):
        overrides = {t: tv.apply(d) for t, d in delta.per_task.items()}
        return MergeResult(name, bench.task_names, bench.encoder, base, dict(bench.heads), task_overrides=overrides,
                           provenance={"method": name, "options": dict(options), "per_task_encoder": True})
    return MergeResult(name, bench.task_names, bench.encoder, tv.apply(delta), dict(bench.heads),
                       provenance={"method": name, "options": dict(options)})


def task_arithmetic_on_validation(bench: Benchmark, tv: TaskVectors, grid: Sequence[float], device: str,
                                  post_merge: PostMerge | None = None) -> tuple[MergeResult, float]:
    """Task arithmetic with λ chosen by mean validation accuracy over `grid` (TALL-masks protocol)."""
    best: tuple[float, float, MergeResult] | None = None
    for coef in grid:
        result = static_result("task_arithmetic", bench, tv, {"scaling_coef": coef})
        if post_merge is not None:
            result = post_merge(result)
        score = mean(primary_scores(result, bench, device, split="val"))
        if best is None or score > best[0]:
            best = (score, coef, result)
    assert best is not None
    best[2].method = "task_arithmetic_val"
    best[2].provenance["chosen_on_validation"] = {"scaling_coef": best[1], "val_accuracy": best[0]}
    return best[2], best[1]


# --- adaptive results ------------------------------------------------------------------------------------------------
def adaptive_result(
    name: str, bench: Benchmark, tv: TaskVectors, adapt_inputs: Mapping[str, Inputs], cache: ExpertCache,
    settings: AdaptSettings, progress: bool, curve_point: Callable[[dict[str, float]], dict[str, float]],
    post_merge: PostMerge | None = None, split: str = "test",
) -> tuple[MergeResult, list[dict[str, float]], dict[str, TaskScore]]:
    """Train an adaptive method, evaluating at the `curve` iterations on the way (quality vs iterations).

    Returns the result, the curve, and the final TaskScore per task (the last curve evaluation, reused).
    `post_merge` (optional) transforms every evaluated result (e.g. BatchNorm re-estimation in the vision suite).
    `split`: the labeled split scored ("test", or "val" to choose settings without looking at the test split).
    """
    cfg = settings.trainer_config(name, progress)
    options = dict(settings.method_options.get(name, {}))
    kinds = {t: d.objective for t, d in bench.tasks.items()}
    trainer = build_trainer(name, bench.encoder, bench.heads, tv, adapt_inputs, config=cfg, cache=cache,
                            task_kinds=kinds, **options)
    steps = int(trainer.config.steps)
    marks = sorted({s for s in settings.curve if 0 < s < steps} | {steps})
    curve: list[dict[str, float]] = []
    scores: dict[str, TaskScore] = {}
    post = post_merge or (lambda r: r)
    for mark in marks:
        trainer.run(stop_after=mark - trainer.start_step)
        scores = score(post(trainer.result()), bench, settings.device, split)
        curve.append({"iterations": mark, **curve_point(primary_and_ece(scores)[0]), "seconds": trainer.seconds})
    return post(trainer.result()), curve, scores


def expert_cache_for(bench: Benchmark, tv: TaskVectors, adapt_inputs: Mapping[str, Inputs], settings: AdaptSettings,
                     progress: bool, scale: float = 1.0) -> ExpertCache:
    """Experts run ONCE over the adaptation inputs; every adaptive method reuses these outputs (`scale` < 1: the
    partial teachers θ_pre + scale · τ_k of the teacher study)."""
    merged = MergedEncoder(bench.encoder, tv).to(settings.device)
    return compute_expert_cache(merged, dict(bench.heads), dict(adapt_inputs), 64, settings.device, progress,
                                settings.precision, scale=scale)


# --- the whole run ------------------------------------------------------------------------------------------------------
def run_methods(
    bench: Benchmark,
    methods: Sequence[str],
    protocol: str,
    settings: AdaptSettings,
    static_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    post_merge: PostMerge | None = None,
) -> dict[str, MethodOutcome]:
    """Run every method in `methods` (individual first: normalized accuracy needs it) and evaluate on test.

    `post_merge` (optional) is applied to every merged result before it is evaluated (not to `pretrained` and
    `individual`), e.g. the vision suite's BatchNorm re-estimation.
    """
    check_methods(methods)
    if protocol not in ("held-out", "transductive"):
        raise ValidationError(f"protocol must be 'held-out' or 'transductive', got '{protocol}'")
    order = run_order(methods)
    device = settings.device
    tv = bench.task_vectors(settings.storage_dtype)
    adapt_inputs = bench.tasks.adapt_inputs(protocol)
    cache: ExpertCache | None = None
    outcomes: dict[str, MethodOutcome] = {}

    def curve_point(accs: dict[str, float]) -> dict[str, float]:
        return {"average": mean(accs), "normalized_average": mean(normalized(accs, outcomes["individual"].per_task))}

    for name in tqdm(order, desc="methods", disable=not progress):
        curve: list[dict[str, float]] = []
        notes = ""
        with track() as meter:
            if is_adaptive_row(name):
                if cache is None:
                    cache = expert_cache_for(bench, tv, adapt_inputs, settings, progress)
                    log(f"expert outputs cached for {sum(len(v) for v in cache.outputs.values())} adaptation inputs "
                        f"in {cache.seconds:.1f}s (runs per sample: {sorted(set(cache.runs_per_sample().values()))})")
                result, curve, scores = adaptive_result(row_method(name), bench, tv, adapt_inputs, cache,
                                                        row_settings(name, settings, outcomes), progress, curve_point,
                                                        post_merge)
                notes = ROW_VARIANTS[name].about if name in ROW_VARIANTS else ""
            elif name == "task_arithmetic_val":
                result, coef = task_arithmetic_on_validation(bench, tv, settings.ta_grid, device, post_merge)
                notes = f"λ={coef} chosen on the labeled validation split"
            else:
                result = static_result(name, bench, tv, (static_options or {}).get(name, {}))
                if post_merge is not None and name not in MERGED_BASELINES_EXCLUDED:
                    result = post_merge(result)
        if not is_adaptive_row(name):
            scores = score(result, bench, device)
        accs, eces = primary_and_ece(scores)
        # Seconds = merging / adaptation work only (evaluation excluded; the shared expert pass is reported apart).
        seconds = float(result.provenance.get("adapt_seconds", meter.seconds)) if is_adaptive_row(name) else meter.seconds
        outcomes[name] = MethodOutcome(result, seconds, meter.peak_mb, accs, eces,
                                       {t: s.metrics for t, s in scores.items()}, curve, notes)
        log(f"{name:>22s}: average {mean(accs):.4f}  ({seconds:.1f}s, peak {meter.peak_mb:.0f} MB)")
    return {name: outcomes[name] for name in methods if name in outcomes} | (
        {"individual": outcomes["individual"]} if "individual" not in methods else {})


def known_names(kind: str, known: Callable[[], Sequence[str]]) -> AfterValidator:
    """A pydantic check that every name of a list is one of `known()` (looked up only when validating), no repeats."""

    def check(names: list[str]) -> list[str]:
        valid = list(known())
        unknown = [n for n in names if n not in valid]
        if unknown:
            raise ValueError(f"unknown {kind} '{unknown[0]}'; known: {', '.join(valid)}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{kind} '{repeated[0]}' given twice")
        return names

    return AfterValidator(check)
