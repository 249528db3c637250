"""`symerge study pilot`: the paper's pilot studies (§3) — cross-task performance and functional alignment.

Cross-task score M[i][j]: the encoder θ_pre + τ_i read by task j's head on task j's test data. Three head sets:
(a) the experts' own heads, (b) heads re-trained WITH LABELS on the fixed task-arithmetic encoder θ_pre + λ Σ τ
(the paper's two-stage "functional alignment" protocol, Fig. 3 / Fig. A / Fig. H), (c) SyMerge's heads (learned
without labels). Around it: the TA λ sweep (Fig. 3b: per task, the gain of (b) over (a) on foreign encoders) and
Fig. 2 (per task, mean cross-task score against mean pairwise-merge score, with Pearson / Spearman correlation).

Every (encoder, task data) pair is encoded once and read by every head set; head re-training runs on cached
features (no encoder forward in its loop).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from symerge.devices import floating_dtype, module_on
from symerge.errors import ValidationError
from symerge.evaluation.cross_task import (column_off_diagonal_means, encoder_features, head_outputs,
                                           off_diagonal_mean, score_matrix)
from symerge.evaluation.metrics import mean
from symerge.studies.base import StudyContext, StudyOutput, Variant, register_study
from symerge.studies.encoders import combined_state, one_hot_weights
from symerge.studies import plots
from symerge.studies.plots import gain_text, lambda_text, score_text
from symerge.suites.runner import static_result

LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's Fig. 3b / Fig. H rows
FOCUS_LAMBDA = 0.3  # the paper's Fig. A(b) and TA's usual coefficient
# The paper re-trains each classifier for ONE epoch of its task's full training set (thousands of samples, hundreds
# of Adam steps). Our labeled adaptation split is small (100-600 samples per task, so one epoch is a few dozen
# steps at the suite's batch size), so the head sees it 10 times: a few hundred steps, enough for a linear head at
# lr 1e-2 to converge on fixed features, while staying far from the experts' full fine-tuning.
HEAD_EPOCHS = 10
PAPER_FIG2 = "r = 0.863, p < 0.001 (20 ViT-B/32 tasks)"


def check_lambdas(value: Any) -> tuple[float, ...]:
    try:
        lambdas = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValidationError(f"study option 'lambdas' must be a list of numbers, got {value!r}") from None
    if not lambdas or any(not (0.0 < v <= 1.0) for v in lambdas) or len(set(lambdas)) != len(lambdas):
        raise ValidationError(f"study option 'lambdas' must be distinct numbers in (0, 1], got {list(lambdas)}")
    return tuple(sorted(lambdas))


def check_epochs(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(f"study option 'head_epochs' must be an integer ≥ 1, got {value!r}")
    return value


# --- head re-training on fixed features ------------------------------------------------------------------------------
def retrain_head(head: nn.Module, features: Tensor, labels: Tensor, objective: str, *, epochs: int, lr: float,
                 batch_size: int, seed: int, device: str) -> nn.Module:
    """A copy of `head` trained with labels on fixed `features` (CPU): Adam at `lr`, `epochs` seeded shuffles.

    Cross-entropy for classification outputs (per pixel for segmentation maps), L1 for regression (the experts'
    own fine-tuning losses). Returns a CPU module in eval mode; `head` itself is never changed."""
    model = module_on(copy.deepcopy(head), device).train().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = F.l1_loss if objective == "regression" else F.cross_entropy
    dtype = floating_dtype(model)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(features), generator=generator).split(batch_size):
            outputs = model(features[index].to(device, dtype)).float()
            loss = loss_fn(outputs, labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False).cpu()


# --- pieces -----------------------------------------------------------------------------------------------------------
def subtract(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> list[list[float]]:
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Pearson r and Spearman ρ with their two-sided p-values (scipy.stats); NaN where undefined (n < 3, or a
    constant vector)."""
    from scipy import stats

    xs, ys = [float(v) for v in x], [float(v) for v in y]
    nan = float("nan")
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"n": len(xs), "pearson_r": nan, "pearson_p": nan, "spearman_rho": nan, "spearman_p": nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(xs, ys)
        spearman = stats.spearmanr(xs, ys)
    return {"n": len(xs), "pearson_r": float(pearson[0]), "pearson_p": float(pearson[1]),
            "spearman_rho": float(spearman[0]), "spearman_p": float(spearman[1])}


def nearest(values: Sequence[float], target: float) -> float:
    return min(values, key=lambda v: (abs(v - target), v))


def pairwise_merge_matrix(ctx: StudyContext, inputs: Mapping[str, Any], labels: Mapping[str, Tensor],
                          m_a: Sequence[Sequence[float]]) -> list[list[float]]:
    """P[i][j] = task j's score of the weight average of experts i and j (θ_pre + ½τ_i + ½τ_j) with j's head.
    The diagonal is each expert itself (θ_j averaged with itself), taken from M_a on the same samples."""
    tasks, tv, scorers = ctx.tasks, ctx.task_vectors(), ctx.scorers()
    matrix = [[float(m_a[i][j]) if i == j else float("nan") for j in range(len(tasks))] for i in range(len(tasks))]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    for i, j in tqdm(pairs, desc="pairwise merges", disable=not ctx.progress, leave=False):
        a, b = tasks[i], tasks[j]
        state = combined_state(tv, one_hot_weights(tv, {i: 0.5, j: 0.5}))
        feats = encoder_features(ctx.bench.encoder, {"pair": state}, {a: inputs[a], b: inputs[b]},
                                 device=ctx.device, progress=False)["pair"]
        for row, col in ((i, j), (j, i)):
            task = tasks[col]
            outputs = head_outputs(ctx.bench.heads[task], feats[task], device=ctx.device)
            matrix[row][col] = scorers[task](outputs, labels[task])
    return matrix


def lambda_sweep(ctx: StudyContext, features: Mapping[str, Mapping[str, Tensor]], labels: Mapping[str, Tensor],
                 m_a: list[list[float]], lambdas: Sequence[float], epochs: int) -> list[dict[str, Any]]:
    """Per TA λ: the merge's per-task and normalized scores with the experts' heads and with heads re-trained on its
    features (labeled adaptation split), the cross-task matrix of the re-trained heads, and their gain per task."""
    bench, tv, settings, scorers = ctx.bench, ctx.task_vectors(), ctx.settings, ctx.scorers()
    adapt, adapt_labels = ctx.adapt_inputs(), ctx.adapt_labels()
    test = {t: d.test for t, d in bench.tasks.items()}
    read = {**{f"adapt/{t}": x for t, x in adapt.items()}, **{f"test/{t}": x for t, x in test.items()}}
    rows = []
    for lam in tqdm(lambdas, desc="TA λ sweep", disable=not ctx.progress):
        state = static_result("task_arithmetic", bench, tv, {"scaling_coef": lam}).encoder_state
        ta = encoder_features(bench.encoder, {"ta": state}, read, device=ctx.device, progress=False)["ta"]
        del state
        retrained = {t: retrain_head(bench.heads[t], ta[f"adapt/{t}"], adapt_labels[t], bench.tasks[t].objective,
                                     epochs=epochs, lr=settings.layer_lr, batch_size=settings.batch_size,
                                     seed=ctx.seed * 1000 + k, device=ctx.device)
                     for k, t in enumerate(ctx.tasks)}
        expert_heads = {t: scorers[t](head_outputs(bench.heads[t], ta[f"test/{t}"], device=ctx.device),
                                      bench.tasks[t].test_labels) for t in ctx.tasks}
        new_heads = {t: scorers[t](head_outputs(retrained[t], ta[f"test/{t}"], device=ctx.device),
                                   bench.tasks[t].test_labels) for t in ctx.tasks}
        m_b = score_matrix(features, retrained, labels, scorers, device=ctx.device)
        gain = dict(zip(ctx.tasks, column_off_diagonal_means(subtract(m_b, m_a))))
        rows.append({"lambda": lam, "ta_per_task": expert_heads, "ta_normalized": ctx.normalized(expert_heads),
                     "ta_retrained_per_task": new_heads, "ta_retrained_normalized": ctx.normalized(new_heads),
                     "cross_task_retrained": m_b, "cross_task_retrained_off_diagonal": off_diagonal_mean(m_b),
                     "gain": gain, "mean_gain": mean(gain)})
        ctx.log(f"TA λ={lam:.2f}: normalized {rows[-1]['ta_normalized']:.4f} (re-trained heads "
                f"{rows[-1]['ta_retrained_normalized']:.4f}), mean cross-task gain {rows[-1]['mean_gain']:+.4f}")
    return rows


# --- the study --------------------------------------------------------------------------------------------------------
@register_study(
    "pilot", reproduces="paper §3: Fig. 2, Fig. 3b and Fig. A / H (cross-task pilot studies)",
    summary="cross-task matrices with expert / label-re-trained / SyMerge heads, the TA λ sweep of re-trained-head "
            "gains, and cross-task vs pairwise-merge correlation",
    min_tasks=2, options={"lambdas": check_lambdas, "head_epochs": check_epochs})
def pilot(ctx: StudyContext) -> StudyOutput:
    tasks, bench = ctx.tasks, ctx.bench
    lambdas = ctx.option("lambdas", LAMBDAS)
    epochs = ctx.option("head_epochs", HEAD_EPOCHS)
    ctx.adapt_labels()  # the label-using reference needs them: fail before any work
    inputs, labels = ctx.cross_task_data()
    scorers = ctx.scorers()
    base = bench.pretrained_state()
    experts = {t: {**base, **bench.experts[t]} for t in tasks}
    features = encoder_features(bench.encoder, experts, inputs, device=ctx.device, progress=ctx.progress,
                                desc="expert features")
    m_a = score_matrix(features, bench.heads, labels, scorers, device=ctx.device)
    sweep = lambda_sweep(ctx, features, labels, m_a, lambdas, epochs)
    symerge = ctx.run_variant(Variant("symerge"))
    m_c = score_matrix(features, symerge.result.heads, labels, scorers, device=ctx.device)
    del features
    pairs = pairwise_merge_matrix(ctx, inputs, labels, m_a)

    focus = next(r for r in sweep if r["lambda"] == nearest(lambdas, FOCUS_LAMBDA))
    cross = column_off_diagonal_means(m_a)
    merge = column_off_diagonal_means(pairs)
    ta_focus = [focus["ta_per_task"][t] / ctx.reference[t] for t in tasks]
    fig2 = {"cross_task": dict(zip(tasks, cross)), "pairwise_merge": dict(zip(tasks, merge)),
            **correlation(cross, merge)}
    vs_ta = {"ta_lambda": focus["lambda"], "ta_normalized": dict(zip(tasks, ta_focus)), **correlation(cross, ta_focus)}
    lam = lambda_text(focus["lambda"])
    headline = {
        "cross_task_expert_heads": off_diagonal_mean(m_a),
        f"cross_task_retrained_heads_ta{lam}": focus["cross_task_retrained_off_diagonal"],
        "cross_task_symerge_heads": off_diagonal_mean(m_c),
        f"mean_retrained_gain_ta{lam}": focus["mean_gain"],
        f"ta{lam}_normalized": focus["ta_normalized"],
        "symerge_normalized": symerge.normalized_average,
        "pearson_r": fig2["pearson_r"], "pearson_p": fig2["pearson_p"],
        "spearman_rho": fig2["spearman_rho"], "spearman_p": fig2["spearman_p"],
    }
    data = {
        "tasks": tasks, "cross_task_samples": ctx.cross_task_samples, "head_epochs": epochs,
        "lambdas": list(lambdas), "focus_lambda": focus["lambda"],
        "cross_task": {"expert_heads": m_a, f"retrained_heads_ta{lam}": focus["cross_task_retrained"],
                       "symerge_heads": m_c},
        "sweep": sweep, "pairwise_merge": pairs, "fig2": fig2, "cross_task_vs_ta": vs_ta,
        "symerge": symerge.row(), "headline": headline,
    }
    return StudyOutput(data, pilot_markdown(ctx, data), pilot_figures(ctx, data))


# --- report -----------------------------------------------------------------------------------------------------------
def matrix_table(matrix: Sequence[Sequence[float]], tasks: Sequence[str], percent: bool) -> str:
    lines = ["| enc \\ eval | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for i, row in enumerate(matrix):
        cells = [f"**{score_text(v, percent)}**" if i == j else score_text(v, percent) for j, v in enumerate(row)]
        lines.append(f"| {tasks[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def pilot_markdown(ctx: StudyContext, data: Mapping[str, Any]) -> str:
    tasks, lam = data["tasks"], lambda_text(data["focus_lambda"])
    percent = ctx.suite != "dense"  # dense primary scores (mIoU, 1/error) are shown as they are
    unit = "%" if percent else "primary score"
    samples = f"first {data['cross_task_samples']}" if data["cross_task_samples"] else "all"
    fig2, vs_ta, head = data["fig2"], data["cross_task_vs_ta"], data["headline"]
    sweep_lines = ["| TA λ | TA norm. % (expert heads) | TA norm. % (re-trained heads) | " + " | ".join(tasks)
                   + " | mean gain |", "|" + "---|" * (len(tasks) + 4)]
    for row in data["sweep"]:
        gains = " | ".join(gain_text(row["gain"][t], percent) for t in tasks)
        sweep_lines.append(f"| {lambda_text(row['lambda'])} | {score_text(row['ta_normalized'])} | "
                           f"{score_text(row['ta_retrained_normalized'])} | {gains} | "
                           f"{gain_text(row['mean_gain'], percent)} |")
    fig2_lines = [f"| task | cross-task score ({unit}, mean over foreign encoders) | pairwise merge score ({unit}, mean "
                  f"over partners) | TA λ={lam} normalized % |", "|---|---|---|---|"]
    for t in tasks:
        fig2_lines.append(f"| {t} | {score_text(fig2['cross_task'][t], percent)} | "
                          f"{score_text(fig2['pairwise_merge'][t], percent)} | {score_text(vs_ta['ta_normalized'][t])} |")
    return "\n".join([
        f"Cross-task score M[i][j]: the encoder θ_pre + τ_i read by task j's head on task j's {samples} test "
        f"samples ({unit}: each task's primary score, accuracy for classification). Heads: (a) the experts' own; (b) "
        f"re-trained with labels on the fixed task-arithmetic encoder θ_pre + λ Σ τ (labeled adaptation split, "
        f"{data['head_epochs']} epochs of Adam at the suite's layer lr; the paper: one epoch of the training set); (c) "
        "SyMerge's (no labels).",
        "",
        f"| head set | off-diagonal mean ({unit}) |", "|---|---|",
        f"| (a) experts' heads | {score_text(head['cross_task_expert_heads'], percent)} |",
        f"| (b) re-trained on TA λ={lam} | {score_text(head[f'cross_task_retrained_heads_ta{lam}'], percent)} |",
        f"| (c) SyMerge heads | {score_text(head['cross_task_symerge_heads'], percent)} |",
        "",
        f"SyMerge's merged model: {score_text(head['symerge_normalized'])} % normalized; task arithmetic (λ={lam}) "
        f"{score_text(head[f'ta{lam}_normalized'])} %.",
        "",
        "### (a) experts' heads (paper Fig. A(a))", "",
        matrix_table(data["cross_task"]["expert_heads"], tasks, percent), "",
        f"### (b) heads re-trained on TA λ={lam} (paper Fig. A(b))", "",
        matrix_table(data["cross_task"][f"retrained_heads_ta{lam}"], tasks, percent), "",
        "### (c) SyMerge heads", "", matrix_table(data["cross_task"]["symerge_heads"], tasks, percent), "",
        f"### TA λ sweep: gain of re-trained over original heads on foreign encoders ({'%p' if percent else unit}; "
        "paper Fig. 3b)", "",
        "Per task j: mean over encoders i ≠ j of M_b(λ)[i][j] − M_a[i][j]. The paper (ViT-B/32, 8 tasks) finds gains "
        "on most tasks, largest at small λ (e.g. GTSRB +29.6 at λ=0.1, +20.7 at 0.3, +6.7 at 1.0), SVHN the exception.",
        "", *sweep_lines, "",
        "### Cross-task vs merge performance (paper Fig. 2)", "",
        "Per task j: its mean cross-task score (column mean of (a) over i ≠ j) against its mean pairwise merge score "
        "(weight average of experts i and j, evaluated on task j with j's head, mean over i ≠ j), on the same samples.",
        "", *fig2_lines, "",
        f"Pearson r = {number(fig2['pearson_r'])} (p = {number(fig2['pearson_p'])}), Spearman ρ = "
        f"{number(fig2['spearman_rho'])} (p = {number(fig2['spearman_p'])}), n = {fig2['n']} tasks. Paper: {PAPER_FIG2}.",
        "",
        f"Cross-task score vs TA λ={lam} per-task normalized score: Pearson r = {number(vs_ta['pearson_r'])} "
        f"(p = {number(vs_ta['pearson_p'])}), Spearman ρ = {number(vs_ta['spearman_rho'])} "
        f"(p = {number(vs_ta['spearman_p'])}).",
    ] + ([f"\nWith {len(tasks)} tasks the correlations are undefined (n < 3)."] if len(tasks) < 3 else []))


def pilot_figures(ctx: StudyContext, data: Mapping[str, Any]) -> dict[str, Any]:
    tasks, lam = list(data["tasks"]), lambda_text(data["focus_lambda"])
    percent = ctx.suite != "dense"
    matrices = {"(a) experts' heads": data["cross_task"]["expert_heads"],
                f"(b) heads re-trained on TA λ={lam}": data["cross_task"][f"retrained_heads_ta{lam}"],
                "(c) SyMerge heads": data["cross_task"]["symerge_heads"]}
    fig2 = data["fig2"]
    gains = [[100 * row["gain"][t] for t in tasks] for row in data["sweep"]]
    lambdas = [lambda_text(row["lambda"]) for row in data["sweep"]]
    return {
        "cross_task_matrices.png": lambda path: plots.matrix_heatmaps(matrices, tasks, path, percent),
        "fig2_cross_task_vs_merge.png": lambda path: plots.scatter_with_fit(
            [fig2["cross_task"][t] for t in tasks], [fig2["pairwise_merge"][t] for t in tasks], tasks, path,
            xlabel="mean cross-task score (%)", ylabel="mean pairwise merge score (%)",
            title=f"Cross-task vs merge (Pearson r = {number(fig2['pearson_r'])}, p = {number(fig2['pearson_p'])})"),
        "fig3b_retrained_gain.png": lambda path: plots.diverging_heatmap(
            gains, lambdas, tasks, path, title="Re-trained over original heads on foreign encoders (%p)",
            row_label="TA λ of the fixed encoder"),
    }
