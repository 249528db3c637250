"""Build the report dict (README schema) and write report.json / report.md / plots atomically into a run dir."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from symerge.atomic import atomic_directory
from symerge.evaluation.metrics import mean, normalized
from symerge.suites.runner import Benchmark, MethodOutcome

REPORT_FILES = ("report.json", "report.md")  # what marks a dir as a suite report that `--overwrite` may replace


def method_entry(outcome: MethodOutcome, reference: Mapping[str, float], metrics_per_task: bool = False) -> dict[str, Any]:
    """One method's report entry. `metrics_per_task` (dense suite): `per_task` holds every metric of each task,
    `primary` the higher-is-better score normalized against the experts, and `average` the normalized average
    (the tasks' metrics have different units, so a raw average would mean nothing)."""
    norm = mean(normalized(outcome.per_task, reference))
    entry = {
        "per_task": outcome.metrics if metrics_per_task else outcome.per_task,
        **({"primary": outcome.per_task} if metrics_per_task else {}),
        "average": norm if metrics_per_task else mean(outcome.per_task),
        "normalized_average": norm,
        "ece": mean(outcome.ece),
        "ece_per_task": outcome.ece,
        "seconds": outcome.seconds,
        "peak_memory_mb": outcome.peak_memory_mb,
    }
    if outcome.curve:
        entry["curve"] = outcome.curve
    if outcome.notes:
        entry["notes"] = outcome.notes
    if outcome.result.provenance.get("per_task_encoder"):
        entry["notes"] = (entry.get("notes", "") + " per-task encoder at inference (evaluated per task)").strip()
    prov = outcome.result.provenance
    for key in ("expert_runs_per_sample", "expert_seconds", "adapt_seconds", "skipped_steps", "options", "granularity"):
        if key in prov:
            entry[key] = prov[key]
    return entry


def build_report(
    suite: str, protocol: str, seed: int, bench: Benchmark, outcomes: Mapping[str, MethodOutcome],
    diagnostics: Mapping[str, Any], config: Mapping[str, Any], extra: Mapping[str, Any],
    metrics_per_task: bool = False,
) -> dict[str, Any]:
    reference = outcomes["individual"].per_task
    report: dict[str, Any] = {
        "suite": suite, "protocol": protocol, "seed": seed,
        "tasks": [{"name": t.name, "num_classes": t.num_classes, **t.sizes} for t in bench.tasks.values()],
        "methods": {name: method_entry(o, reference, metrics_per_task) for name, o in outcomes.items()},
        **diagnostics,
        "config": dict(config),
        **dict(extra),
    }
    for name in ("symerge", "adamerging"):
        if name in outcomes and outcomes[name].result.lambdas is not None:
            result = outcomes[name].result
            report.setdefault("lambdas", {})[name] = {"rows": result.lambda_rows, "tasks": result.tasks,
                                                      "values": result.lambdas.tolist()}
            report.setdefault("loss_history", {})[name] = [h["loss"] for h in result.loss_history]
    return report


def write_report(report: Mapping[str, Any], outcomes: Mapping[str, MethodOutcome], out_dir: Path,
                 figures: Mapping[str, tuple[str, Callable[[Path], None]]] | None = None) -> None:
    """Write into a temp dir beside `out_dir`, then rename: a failed run leaves no half-written report.

    `figures`: suite-specific plots, {title: (file name, writer(path))}, added to the report's plots."""
    from symerge.report.markdown import render_markdown
    from symerge.report.plots import make_plots

    with atomic_directory(Path(out_dir), manifests=REPORT_FILES) as tmp:
        plots = make_plots(report, tmp)
        for title, (name, draw) in (figures or {}).items():
            draw(tmp / name)
            plots[title] = name
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "report.md").write_text(render_markdown(report, plots))
