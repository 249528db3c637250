"""What every suite shares: its config's common fields, the expert fine-tuning loop, and run → diagnose → report.

A suite is then a data loader (task pool: `suites.tasks.TaskData` per task), a head / decoder per task, and its own
report extras; see `docs/architecture.md` ("how to add a suite").
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor, nn

from symerge.adaptive.symerge_method import parse_task_layer, select_task_layer_keys
from symerge.batching import Inputs
from symerge.devices import RunsOn
from symerge.errors import ValidationError
from symerge.suites.finetune import (Expert, FinetuneConfig, expert_folder, hash_tensors, load_cached_expert,
                                      train_and_store_expert)
from symerge.suites.runner import (ROW_VARIANTS, AdaptSettings, Benchmark, MethodOutcome, PostMerge, row_method,
                                   row_settings)
from symerge.suites.tasks import TaskData, TaskPool

Figures = Mapping[str, tuple[str, Callable[[Path], None]]]


def expert_workers_problem(workers: int, device: str) -> str | None:
    """Why `workers` expert processes cannot run for `device` (None if they can): the config's check and
    `fine_tune_experts`' own, for callers that skip the config."""
    if workers > 1 and device != "cpu":
        return (f"expert_workers > 1 trains experts in CPU processes; on '{device}' they train one after another: "
                "use expert_workers 1")
    return None


class SuiteConfig(RunsOn):
    """Fields every suite config has (each suite adds `tasks`, `methods`, `expert`, `adapt` with its defaults)."""

    model_config = ConfigDict(extra="forbid")

    protocol: Literal["held-out", "transductive"] = "held-out"
    seed: int = 0
    quick: bool = False
    expert_workers: int = Field(default=1, ge=1, description="experts fine-tuned at once, each in its own 1-thread "
                                "CPU process (benchmarks/expert_workers.py measures it against one multi-thread "
                                "process)")

    @model_validator(mode="after")
    def workers_on_cpu(self) -> "SuiteConfig":
        problem = expert_workers_problem(self.expert_workers, self.device)
        if problem is not None:
            raise ValueError(problem)
        return self

    @classmethod
    def presets(cls) -> dict[str, Callable[..., Any]]:
        """Named configurations `--preset NAME` selects (each takes the caller's overrides); `quick` in every suite."""
        return {"quick": getattr(cls, "quick_preset")}

    def with_adapt_steps(self, steps: int) -> "SuiteConfig":
        """A copy whose adaptive rows all run `steps` iterations (the curve keeps its marks below it and scores the
        last one), e.g. the paper's longer schedules (NLP: 1,000 iterations)."""
        adapt: AdaptSettings = getattr(self, "adapt")
        return self.model_copy(update={"adapt": adapt.model_copy(update={"steps": steps})})

    def adapt_settings(self) -> AdaptSettings:
        """The suite's adaptation settings, run with the suite's seed, device and precision."""
        adapt: AdaptSettings = getattr(self, "adapt")
        return adapt.model_copy(update={"seed": self.seed, "device": self.device, "precision": self.precision})


# The text and vision suites' default method list (issue 7); every other registered static method runs by name
# (`--methods`) or with `--methods all`. `adamerging_summed` is AdaMerging as its official code updates (issue 17).
CLASSIFICATION_METHODS = [
    "pretrained", "individual", "weight_averaging", "task_arithmetic", "task_arithmetic_val", "ties",
    "adamerging", "adamerging_summed", "surgery", "symerge", "wemoe",
]


def with_rows_after(methods: list[str], after: Mapping[str, Sequence[str]]) -> list[str]:
    """`methods` with the rows `after[m]` inserted right after each method m (a suite's extra variant rows)."""
    return [row for name in methods for row in [name, *after.get(name, [])]]


class ClassificationSuiteConfig(SuiteConfig):
    """Fields of the suites whose tasks are labeled samples split per task (text, vision)."""

    methods: list[str] = Field(default_factory=lambda: list(CLASSIFICATION_METHODS))
    max_test: int = 400
    max_adapt: int = 600
    cross_task_samples: int = 200


@dataclass
class ExpertJob:
    """One task to fine-tune an expert for: its task data, a fresh head, the expert's training data and recipe."""

    data: TaskData
    head: nn.Module
    inputs: Inputs
    labels: Tensor
    finetune: FinetuneConfig


def check_task_layers(cfg: SuiteConfig, encoder: nn.Module) -> None:
    """Every SyMerge row's `task_layer` names tensors of this encoder: checked before any expert trains, so a
    suite configured for another model fails in seconds, naming the row and the module."""
    keys = list(encoder.state_dict())
    settings = cfg.adapt_settings()
    methods: list[str] = getattr(cfg, "methods")
    for row in methods:
        if row_method(row) != "symerge" or (row in ROW_VARIANTS and ROW_VARIANTS[row].lambdas_from is not None):
            continue
        spelled = row_settings(row, settings, {}).method_options.get("symerge", {}).get("task_layer", "head")
        try:
            select_task_layer_keys(keys, parse_task_layer(spelled), spelled)
        except ValidationError as err:
            raise ValidationError(f"method '{row}': {err}") from None


def fine_tune_experts(
    encoder: nn.Module, jobs: Iterable[ExpertJob], cache_dir: Path, device: str, log: Callable[[str], None],
    progress: bool, per_task_finetune: bool = False, workers: int = 1,
) -> tuple[Benchmark, dict[str, Any]]:
    """Fine-tune (or load cached, by content hash) one expert per job and assemble the Benchmark; `info` holds each
    expert's seconds / cache hit and the fine-tuning recipe (one for all, or per task). `workers` > 1 (CPU only)
    fine-tunes that many experts at once, each in its own 1-thread process."""
    datas: dict[str, TaskData] = {}
    heads: dict[str, nn.Module] = {}
    experts: dict[str, dict[str, Tensor]] = {}
    info: dict[str, Any] = {"experts": {}, "finetune": {}}
    for data, recipe, expert in expert_results(encoder, jobs, cache_dir, device, log, progress, workers):
        name = data.name
        log(f"expert {name}: {'cached' if expert.cached else f'fine-tuned in {expert.seconds:.0f}s'}")
        datas[name], heads[name], experts[name] = data, expert.head, expert.encoder_state
        info["experts"][name] = {"seconds": expert.seconds, "cached": expert.cached}
        if per_task_finetune:
            info["finetune"][name] = recipe.as_dict()
        else:
            info["finetune"] = recipe.as_dict()
    return Benchmark(encoder=encoder, heads=heads, experts=experts, tasks=TaskPool(datas)), info


def expert_results(
    encoder: nn.Module, jobs: Iterable[ExpertJob], cache_dir: Path, device: str, log: Callable[[str], None],
    progress: bool, workers: int,
) -> Iterator[tuple[TaskData, FinetuneConfig, Expert]]:
    """Each job's (task data, recipe, expert), in the jobs' order. Cached experts load here; the others train here
    (`workers` = 1) or in a pool of `workers` 1-thread processes, at most `workers` + 1 uncached jobs' training data
    in memory at once (the jobs are a generator: one task's data is built at a time)."""
    problem = expert_workers_problem(workers, device)
    if problem is not None:
        raise ValidationError(problem)
    model_hash = hash_tensors(encoder.state_dict())
    # each worker process trains with 1 torch thread (set once, when the process starts)
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None)
    in_flight: deque[tuple[TaskData, FinetuneConfig, Expert | Future[Expert]]] = deque()
    try:
        for job in jobs:
            folder = expert_folder(cache_dir, model_hash, job.head, job.inputs, job.labels, job.finetune)
            expert: Expert | Future[Expert] | None = load_cached_expert(folder, job.head)
            if expert is None and pool is None:
                expert = train_and_store_expert(folder, encoder, job.head, job.inputs, job.labels, job.finetune,
                                                device, f"expert {job.data.name}", progress)
            elif expert is None:
                assert pool is not None
                log(f"expert {job.data.name}: fine-tuning in a worker process")
                expert = pool.submit(train_and_store_expert, folder, encoder, job.head, job.inputs, job.labels,
                                     job.finetune, "cpu", f"expert {job.data.name}", False)
            in_flight.append((job.data, job.finetune, expert))
            del job
            # report what is ready at the head at once; wait for the oldest worker while more than `workers` run
            while in_flight and (not isinstance(in_flight[0][2], Future)
                                 or sum(isinstance(entry[2], Future) for entry in in_flight) > workers):
                yield finished(in_flight.popleft())
        while in_flight:
            yield finished(in_flight.popleft())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def finished(entry: tuple[TaskData, FinetuneConfig, Expert | Future[Expert]]) -> tuple[TaskData, FinetuneConfig, Expert]:
    """The entry with its expert (a worker's result waited for; its failure names the task)."""
    data, recipe, expert = entry
    if not isinstance(expert, Future):
        return data, recipe, expert
    try:
        return data, recipe, expert.result()
    except Exception as error:
        raise RuntimeError(f"expert {data.name}: fine-tuning in a worker process failed: "
                           f"{type(error).__name__}: {error}") from error


def run_and_report(
    suite: str,
    cfg: SuiteConfig,
    bench: Benchmark,
    out_dir: Path,
    extra: Callable[[Mapping[str, MethodOutcome]], Mapping[str, Any]],
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    post_merge: PostMerge | None = None,
    cross_task_samples: int | None = None,
    figures: Callable[[Mapping[str, MethodOutcome]], Figures] | None = None,
    metrics_per_task: bool = False,
) -> dict[str, Any]:
    """Run the config's methods, diagnose (cross-task matrices, head transfer; when `cross_task_samples` is given),
    build the report dict and write it. `extra(outcomes)` is called last, so it may time the whole run."""
    from symerge.report.writer import write_report
    from symerge.suites.diagnostics import run_diagnostics
    from symerge.suites.report import build_report
    from symerge.suites.runner import run_methods

    outcomes = run_methods(bench, cfg.methods, cfg.protocol, cfg.adapt_settings(), progress=progress, log=log,
                           post_merge=post_merge)
    start = time.perf_counter()
    diagnostics = ({} if cross_task_samples is None else
                   run_diagnostics(bench, outcomes, cross_task_samples, cfg.device, progress))
    if diagnostics:  # where a run's time goes (with each method's seconds and the experts')
        diagnostics["diagnostics_seconds"] = time.perf_counter() - start
    drawn = figures(outcomes) if figures is not None else None
    report = build_report(suite, cfg.protocol, cfg.seed, bench, outcomes, diagnostics,
                          config=cfg.model_dump(mode="json"), extra=extra(outcomes), metrics_per_task=metrics_per_task)
    write_report(report, outcomes, out_dir, figures=drawn)
    return report
