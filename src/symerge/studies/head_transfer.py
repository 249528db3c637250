"""`symerge study head-transfer`: SyMerge's task-specific layers on other methods' encoders (paper Table 4).

For the task-arithmetic encoder (λ = 0.3) and AdaMerging's (learned per-tensor λ), with the experts' heads and with
SyMerge's heads, unchanged:
- "Merged": the method's merged encoder θ_pre + Σ_k λ_k τ_k read by each task's head on its test split;
- "Cross": the encoder θ_pre + λ_i τ_i (task i's OWN λ row of that method, per tensor) read by task j's head on task
  j's data, averaged over all pairs i ≠ j.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from symerge.evaluation.cross_task import encoder_features, off_diagonal_mean, score_matrix
from symerge.evaluation.metrics import mean
from symerge.result import MergeResult
from symerge.studies import plots
from symerge.studies.plots import gain_text, lambda_text, score_text
from symerge.studies.base import StudyContext, StudyOutput, Variant, positive_number, register_study
from symerge.studies.encoders import per_tensor_lambdas, single_task_states, uniform_lambdas
from symerge.suites.runner import static_result

TA_LAMBDA = 0.3
# Paper Table 4 (ViT-B/32, 8 tasks): {encoder: {heads: (Merged, Cross)}}; the paper's "zero-shot" heads are the
# experts' shared heads (CLIP's zero-shot classifiers), our "experts' heads".
PAPER_TABLE4 = {"task_arithmetic": {"expert_heads": (69.1, 49.8), "symerge_heads": (79.6, 54.8)},
                "adamerging": {"expert_heads": (80.1, 50.1), "symerge_heads": (87.7, 54.1)}}
ENCODER_NAMES = {"task_arithmetic": "Task Arithmetic", "adamerging": "AdaMerging"}
HEAD_NAMES = {"expert_heads": "experts' heads (paper: zero-shot)", "symerge_heads": "SyMerge heads"}


check_lambda = positive_number("ta_lambda")


def off_diagonal_normalized(matrix: list[list[float]], reference: list[float]) -> float:
    """Mean over i ≠ j of M[i][j] / reference[j] (each cell against task j's expert)."""
    size = len(matrix)
    values = [matrix[i][j] / reference[j] for i in range(size) for j in range(size) if i != j and reference[j] > 0]
    return float(sum(values) / len(values)) if values else float("nan")


def transfer_rows(ctx: StudyContext, result: MergeResult, coefs: Any, head_sets: Mapping[str, Mapping[str, nn.Module]]
                  ) -> dict[str, dict[str, Any]]:
    """{head set: merged per-task / average / normalized, and the cross-task matrix of single scaled τ_i}."""
    inputs, labels = ctx.cross_task_data()
    features = encoder_features(ctx.bench.encoder, single_task_states(ctx.task_vectors(), coefs), inputs,
                                device=ctx.device, progress=ctx.progress, desc=f"{result.method}: single scaled τ_i")
    reference = [ctx.reference[t] for t in ctx.tasks]
    rows = {}
    for name, heads in head_sets.items():
        merged = ctx.score(result.with_heads(heads, method=f"{result.method}+{name}"))
        cross = score_matrix(features, heads, labels, ctx.scorers(), device=ctx.device)
        rows[name] = {"merged_per_task": merged, "merged_average": mean(merged),
                      "merged_normalized": ctx.normalized(merged), "cross_task": cross,
                      "cross_average": off_diagonal_mean(cross),
                      "cross_normalized": off_diagonal_normalized(cross, reference)}
    return rows


@register_study(
    "head-transfer", reproduces="paper Table 4 (transfer of the adapted layer to other merging methods)",
    summary="SyMerge's heads on task arithmetic's and AdaMerging's encoders: merged model, and cross-task reads of "
            "single scaled task vectors",
    min_tasks=2, options={"ta_lambda": check_lambda})
def head_transfer(ctx: StudyContext) -> StudyOutput:
    tv = ctx.task_vectors()
    ta_lambda = ctx.option("ta_lambda", TA_LAMBDA)
    symerge = ctx.run_variant(Variant("symerge"))
    adamerging = ctx.run_variant(Variant("adamerging", method="adamerging"))
    head_sets = {"expert_heads": dict(ctx.bench.heads), "symerge_heads": dict(symerge.result.heads)}
    ta = static_result("task_arithmetic", ctx.bench, tv, {"scaling_coef": ta_lambda})
    encoders = {"task_arithmetic": (ta, uniform_lambdas(tv, ta_lambda)),
                "adamerging": (adamerging.result, per_tensor_lambdas(adamerging.result, tv))}
    table = {name: transfer_rows(ctx, result, coefs, head_sets) for name, (result, coefs) in encoders.items()}
    headline = {f"{enc}/{kind}_{stat}/{heads}": table[enc][heads][f"{kind}_{stat}"]
                for enc in table for heads in head_sets
                for kind, stat in (("merged", "average"), ("merged", "normalized"), ("cross", "average"),
                                   ("cross", "normalized"))}
    data = {"tasks": ctx.tasks, "ta_lambda": ta_lambda, "cross_task_samples": ctx.cross_task_samples,
            "adamerging_lambda_mean": float(adamerging.result.lambdas.mean()) if adamerging.result.lambdas is not None
            else float("nan"),
            "table": table, "symerge": symerge.row(), "adamerging": adamerging.row(), "paper": PAPER_TABLE4,
            "headline": headline}
    percent = ctx.suite != "dense"
    return StudyOutput(data, transfer_markdown(data, percent), transfer_figures(data, percent))


def with_gain(row: Mapping[str, float], base: Mapping[str, float], key: str, percent: bool) -> str:
    """A score and, unless `row` is the baseline itself, its gain over the baseline (points for %)."""
    text = score_text(row[key], percent)
    return text if row is base else f"{text} ({gain_text(row[key] - base[key], percent)})"


def transfer_markdown(data: Mapping[str, Any], percent: bool = True) -> str:
    """Paper Table 4's layout (plus normalized columns) and the merged per-task scores; `percent` False shows raw
    primary scores (the dense suite's mIoU and 1/error)."""
    table, tasks = data["table"], data["tasks"]
    samples = f"first {data['cross_task_samples']}" if data["cross_task_samples"] else "all"
    unit = "%" if percent else "primary score"
    lines = [f"| Encoder | Classifier | Merged avg ({unit}) | Merged norm. % | Cross avg ({unit}) | Cross norm. % | "
             "paper Merged | paper Cross |", "|---|---|---|---|---|---|---|---|"]
    for enc, rows in table.items():
        base = rows["expert_heads"]
        for heads, row in rows.items():
            paper = PAPER_TABLE4[enc][heads]
            lines.append(f"| {ENCODER_NAMES[enc]} | {HEAD_NAMES[heads]} | "
                         f"{with_gain(row, base, 'merged_average', percent)} | {score_text(row['merged_normalized'])} | "
                         f"{with_gain(row, base, 'cross_average', percent)} | {score_text(row['cross_normalized'])} | "
                         f"{paper[0]} | {paper[1]} |")
    per_task = ["| encoder + heads | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for enc, rows in table.items():
        for heads, row in rows.items():
            per_task.append(f"| {ENCODER_NAMES[enc]} + {HEAD_NAMES[heads]} | "
                            + " | ".join(score_text(row["merged_per_task"][t], percent) for t in tasks) + " |")
    return "\n".join([
        f"Task arithmetic at λ = {lambda_text(data['ta_lambda'])}; AdaMerging's λ learned per tensor (mean "
        f"{data['adamerging_lambda_mean']:.3f}). SyMerge's heads are moved unchanged onto each encoder. \"Merged\": "
        "the merged encoder on each task's test split (average score, and normalized to the experts). \"Cross\": "
        "the encoder θ_pre + λ_i τ_i (task i's own λ row) read by task j's head on task j's "
        f"{samples} test samples, mean over i ≠ j. Paper columns: ViT-B/32, 8 tasks (Table 4), accuracy %.",
        "", *lines, "", f"### Merged, per task ({unit})", "", *per_task,
    ])


def transfer_figures(data: Mapping[str, Any], percent: bool = True) -> dict[str, Any]:
    tasks = list(data["tasks"])
    matrices = {f"{ENCODER_NAMES[enc]}, {HEAD_NAMES[heads]} (off-diag {score_text(row['cross_average'], percent)})":
                row["cross_task"]
                for enc, rows in data["table"].items() for heads, row in rows.items()}
    return {"cross_task_matrices.png": lambda path: plots.matrix_heatmaps(
        matrices, tasks, path, percent, row_label="encoder θ_pre + λ_i τ_i")}
