"""Build a suite's report dict (README schema) from its benchmark and method outcomes; `report/` renders it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from symerge.adaptive.registry import ADAPTIVE
from symerge.evaluation.metrics import mean, normalized
from symerge.suites.runner import Benchmark, MethodOutcome, row_method


def lambda_methods(outcomes: Mapping[str, MethodOutcome]) -> list[str]:
    """The rows run whose method learns λ (registered so): their λ map and loss history go into the report."""
    return [name for name in outcomes if row_method(name) in ADAPTIVE and ADAPTIVE[row_method(name)].learns_lambdas]


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
    kept = outcome.result.task_specific_values()
    if kept:
        entry["task_specific"] = {"values": kept, "per_task": kept // max(len(outcome.result.tasks), 1),
                                  "of_encoder": kept / max(outcome.result.encoder_values(), 1)}
    prov = outcome.result.provenance
    for key in ("expert_runs_per_sample", "expert_seconds", "adapt_seconds", "skipped_steps", "options", "granularity",
                "inference_cost"):  # inference_cost: methods that keep extra weights at inference (WEMoE)
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
    for name in lambda_methods(outcomes):
        if outcomes[name].result.lambdas is not None:
            result = outcomes[name].result
            report.setdefault("lambdas", {})[name] = {"rows": result.lambda_rows, "tasks": result.tasks,
                                                      "values": result.lambdas.tolist()}
            report.setdefault("loss_history", {})[name] = [h["loss"] for h in result.loss_history]
    return report
