"""Choice of the self-supervised objective (paper Fig. C): every loss of `objectives.SELF_LABEL_LOSSES` against the
cached expert outputs, with λ only ("coef-only") and with the classifier and λ ("classifier+coef"), and the
"Training w/ GT" upper bound of both rows: CE to the TRUE labels of the adaptation inputs, read from a cache whose
outputs are those labels as one-hot logits (no confidence filter); a regression task's rows learn by L1 to its true
targets. The labels come from `ctx.adapt_labels()` (TaskData.adapt_labels, or the test labels under the
transductive protocol); no method ever sees them otherwise. Each row sets `loss` itself (and clears the older
`labels` spelling a suite may set, e.g. the dense suite's soft labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.objectives import LOSSES
from symerge.errors import ValidationError
from symerge.studies.bars import bars_figure, rows
from symerge.studies.base import StudyContext, StudyOutput, Variant, VariantOutcome, register_study, variants_table

ROWS = {"coef-only": {"train_layer": False}, "classifier+coef": {}}  # Fig. C's two rows: what trains
GT = "GT"
# Fig. C read by eye (ViT-B/32, 8 tasks, avg acc %, ±0.3): per loss (coef-only, classifier+coef).
PAPER_FIG_C = {"l1": (76.6, 86.7), "smooth_l1": (76.7, 86.8), "l2": (76.7, 87.8), "cosine": (75.2, 86.7),
               "entropy": (81.6, 68.8), "ce": (83.5, 89.6), "kl": (83.4, 89.6), "js": (83.3, 89.8), GT: (83.3, 95.0)}
PAPER_SAYS = ("Paper (Fig. C, ViT-B/32, 8 tasks, read from the figure): with λ only, distribution losses (CE 83.5, KL "
              "83.4, JS 83.3) beat distances (L1 76.6, L2 76.7, cosine 75.2) and entropy (81.6); with the classifier "
              "trained too most losses reach 86.7–89.8, entropy collapses to 68.8; training with GT labels gives 83.3 "
              "(λ only) and 95.0 (classifier + λ).")


def one_hot_logits(labels: Tensor, classes: int, task: str) -> Tensor:
    """True labels [N, ...] as one-hot logits [N, C, ...] (class dimension 1, as the heads output)."""
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValidationError(f"task '{task}': adaptation labels must lie in [0, {classes}) for the ground-truth "
                              f"reference, found [{int(labels.min())}, {int(labels.max())}]")
    hot = F.one_hot(labels, classes).float()
    return hot if hot.dim() == 2 else hot.movedim(-1, 1)


def true_outputs(labels: Tensor, expected: Tensor, objective: str, task: str) -> Tensor:
    """What a perfect teacher would output: one-hot logits of the label (classification), the target (regression)."""
    target = one_hot_logits(labels, int(expected.shape[1]), task) if objective == "classification" else labels
    if target.numel() != expected.numel():
        raise ValidationError(f"task '{task}': adaptation labels {tuple(labels.shape)} do not fit the expert outputs "
                              f"{tuple(expected.shape)}")
    return target.reshape(expected.shape).to(expected.dtype)


def ground_truth_cache(ctx: StudyContext) -> ExpertCache:
    """The experts' cache with its outputs replaced by the true labels (one-hot logits; targets for regression)."""
    experts = ctx.expert_cache()
    labels = ctx.adapt_labels()
    outputs = {t: true_outputs(labels[t], experts.outputs[t], ctx.bench.tasks[t].objective, t) for t in ctx.tasks}
    return ExpertCache(outputs=outputs, features=experts.features, forward_passes={t: 0 for t in ctx.tasks})


def subset_of(known: Sequence[str], option: str) -> Callable[[Any], list[str]]:
    """A study-option check: a non-empty list of distinct names from `known` (kept in `known`'s order)."""

    def check(value: Any) -> list[str]:
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise ValidationError(f"study option '{option}' must be a non-empty list, e.g. [{known[0]}], got {value!r}")
        unknown = [v for v in value if v not in known]
        if unknown:
            raise ValidationError(f"study option '{option}': unknown '{unknown[0]}'; known: {', '.join(known)}")
        return [name for name in known if name in value]

    return check


def loss_variants(losses: Sequence[str] = tuple(LOSSES), rows: Sequence[str] = tuple(ROWS)) -> list[Variant]:
    return [Variant(f"{row} / {loss}", options={**ROWS[row], "loss": loss, "labels": None})
            for row in rows for loss in losses]


def gt_variants(rows: Sequence[str] = tuple(ROWS)) -> list[Variant]:
    return [Variant(f"{row} / {GT}", options={**ROWS[row], "loss": "ce", "labels": None, "filter_rule": "none"})
            for row in rows]


def pivot(outcomes: dict[str, VariantOutcome]) -> dict[str, dict[str, float]]:
    """{row: {loss or GT: average}} from the 'row / loss' labels."""
    table: dict[str, dict[str, float]] = {}
    for label, outcome in outcomes.items():
        row, loss = label.split(" / ")
        table.setdefault(row, {})[loss] = outcome.average
    return table


def pivot_markdown(table: dict[str, dict[str, float]]) -> str:
    header = ["loss", *(f"{row} (%)" for row in ROWS), *(f"paper {row}" for row in ROWS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    run = {loss for values in table.values() for loss in values}
    for loss in [name for name in [*LOSSES, GT] if name in run]:
        ours = [f"{100 * table[row][loss]:.1f}" if loss in table.get(row, {}) else "–" for row in ROWS]
        paper = [f"≈{value}" for value in PAPER_FIG_C[loss]]
        lines.append("| " + " | ".join([loss, *ours, *paper]) + " |")
    return "\n".join(lines)


@register_study("losses", reproduces="paper Fig. C (App. D.2)",
                summary="every self-supervised loss, λ only and classifier + λ, against CE to the true labels",
                options={"losses": subset_of(list(LOSSES), "losses"), "rows": subset_of(list(ROWS), "rows")})
def losses(ctx: StudyContext) -> StudyOutput:
    rows_run = ctx.option("rows", list(ROWS))
    outcomes = ctx.run_variants(loss_variants(ctx.option("losses", list(LOSSES)), rows_run))
    gt = ground_truth_cache(ctx)
    for variant in gt_variants(rows_run):
        outcomes[variant.label] = ctx.run_variant(variant, cache=gt)
    table = pivot(outcomes)
    markdown = "\n\n".join([
        pivot_markdown(table), PAPER_SAYS,
        "Teacher losses are confidence-filtered by the suite's `filter_rule`; entropy never is (it has no "
        "teacher); the GT rows use no filter.",
        "<details><summary>per task</summary>\n\n" + variants_table(outcomes, ctx.tasks) + "\n\n</details>",
    ])
    series = {row: {loss: v for loss, v in values.items() if loss != GT} for row, values in table.items()}
    lines = {f"{row} w/ GT": values[GT] for row, values in table.items()}
    headline = {label: o.average for label, o in outcomes.items()}
    figures = {"losses.png": bars_figure(series, lines=lines, title="Self-supervised objective (Fig. C); dashed: "
                                                                    "training with the true labels")}
    return StudyOutput(data={"headline": headline, "table": table, "rows": rows(outcomes)}, markdown=markdown,
                       figures=figures)

