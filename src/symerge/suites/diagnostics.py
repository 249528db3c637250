"""Suite diagnostics: cross-task matrices (original vs SyMerge heads) and head transfer (paper Table 4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from symerge.batching import Inputs, num_samples, take
from symerge.evaluation.cross_task import cross_task_matrices, off_diagonal_mean
from symerge.evaluation.metrics import mean, normalized, primary_of
from symerge.suites.runner import Benchmark, MethodOutcome, primary_scores


def first_samples(inputs: Inputs, n: int) -> Inputs:
    return take(inputs, slice(0, min(n, num_samples(inputs))))


# Rows whose learned heads the diagnostics read, in order of preference: the first that trained its heads (a row
# whose task layer is an encoder block keeps the experts' heads and learns per-task tensors instead).
HEAD_ROWS = ("symerge", "symerge_head")


def symerge_heads_row(outcomes: Mapping[str, MethodOutcome]) -> str | None:
    """The SyMerge row whose task layer is the head, if any ran."""
    return next((n for n in HEAD_ROWS if n in outcomes and not outcomes[n].result.task_overrides), None)


def run_diagnostics(
    bench: Benchmark, outcomes: Mapping[str, MethodOutcome], samples: int, device: str, progress: bool
) -> dict[str, Any]:
    """Cross-task matrix on the first `samples` test inputs per task, and SyMerge's heads (`symerge_heads_row`) on
    other encoders."""
    tasks = bench.task_names
    base = bench.pretrained_state()
    encoders = {t: {**base, **bench.experts[t]} for t in tasks}
    head_sets = {"original": dict(bench.heads)}
    heads_row = symerge_heads_row(outcomes)
    if heads_row is not None:
        head_sets["symerge"] = dict(outcomes[heads_row].result.heads)
    inputs = {t: first_samples(bench.tasks[t].test, samples) for t in tasks}
    labels = {t: bench.tasks[t].test_labels[: samples] for t in tasks}
    scorers = {t: primary_of(bench.tasks[t].scorer) for t in tasks}  # each head read by its own task's metric
    matrices = cross_task_matrices(bench.encoder, encoders, head_sets, inputs, labels, device=device, progress=progress,
                                   scorers=scorers)
    diagnostics: dict[str, Any] = {
        "cross_task": {"tasks": tasks, "samples_per_task": samples, **matrices,
                       "off_diagonal_mean": {k: off_diagonal_mean(m) for k, m in matrices.items()},
                       "symerge_heads_from": heads_row},
    }
    if heads_row is not None and "individual" in outcomes:
        transfer = {}
        reference = outcomes["individual"].per_task
        for name in ("task_arithmetic", "adamerging"):
            if name not in outcomes:
                continue
            swapped = outcomes[name].result.with_heads(head_sets["symerge"], method=f"{name}+symerge_heads")
            accs = primary_scores(swapped, bench, device)
            transfer[name] = {
                "original_heads": {"average": mean(outcomes[name].per_task),
                                   "normalized_average": mean(normalized(outcomes[name].per_task, reference))},
                "symerge_heads": {"average": mean(accs), "normalized_average": mean(normalized(accs, reference)),
                                  "per_task": accs},
            }
        diagnostics["head_transfer"] = transfer
    return diagnostics
