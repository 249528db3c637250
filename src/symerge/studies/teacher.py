"""Supervisory-model composition (paper Fig. 6a): SyMerge trained on self-labels from partial experts
θ_pre + α τ_k (α = 1 is the expert itself, SyMerge's default), each teacher's own test score beside the result."""

from __future__ import annotations

from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.evaluation.metrics import mean
from symerge.result import MergeResult
from symerge.studies.bars import bars_figure, rows
from symerge.studies.base import StudyContext, StudyOutput, Variant, VariantOutcome, register_study, variants_table

ALPHAS = (0.25, 0.5, 0.75, 1.0)
PAPER_SAYS = ("Paper (Fig. 6a, ViT-B/32, 8 tasks, read from the figure): α 0.2 ≈77.8, 0.3 ≈84.2, 0.5 ≈88.6, "
              "0.7 ≈90.0, 0.8 ≈90.2 (best), 1.0 ≈90.1; the paper keeps the unmerged expert (α = 1).")


def label(alpha: float) -> str:
    return f"α={alpha:g}"


def teacher_scores(ctx: StudyContext, merged: MergedEncoder, alpha: float) -> dict[str, float]:
    """Each teacher θ_pre + α τ_k with task k's head, scored on task k's test split (one task's encoder at a time)."""
    base = ctx.bench.pretrained_state()
    scores: dict[str, float] = {}
    for task in ctx.tasks:
        params = {k: v.detach().cpu() for k, v in merged.task_params(task, alpha).items()}
        teacher = MergeResult("teacher", [task], ctx.bench.encoder, base, {task: ctx.bench.heads[task]},
                              task_overrides={task: params})
        scores.update(ctx.score(teacher))
    return scores


@register_study("teacher", reproduces="paper Fig. 6a",
                summary="self-labels from partial experts θ_pre + α τ_k, α ∈ {0.25, 0.5, 0.75, 1}")
def teacher(ctx: StudyContext) -> StudyOutput:
    outcomes: dict[str, VariantOutcome] = {}
    teachers: dict[str, dict[str, float]] = {}
    merged = MergedEncoder(ctx.bench.encoder, ctx.task_vectors())  # on the CPU: only builds the teachers' weights
    for alpha in ALPHAS:
        outcomes[label(alpha)] = ctx.run_variant(Variant(label(alpha)), cache=ctx.expert_cache(scale=alpha))
        teachers[label(alpha)] = teacher_scores(ctx, merged, alpha)
    lines = ["| teacher | teacher avg (%) | teacher norm. (%) | SyMerge avg (%) | SyMerge norm. (%) |",
             "|---|---|---|---|---|"]
    for name, outcome in outcomes.items():
        lines.append(f"| {name} | {100 * mean(teachers[name]):.1f} | {100 * ctx.normalized(teachers[name]):.1f} | "
                     f"{100 * outcome.average:.1f} | {100 * outcome.normalized_average:.1f} |")
    markdown = "\n\n".join(["\n".join(lines), PAPER_SAYS, variants_table(outcomes, ctx.tasks)])
    series = {"SyMerge": {n: o.average for n, o in outcomes.items()},
              "teacher alone": {n: mean(s) for n, s in teachers.items()}}
    headline = {**{f"SyMerge {n}": v for n, v in series["SyMerge"].items()},
                **{f"teacher {n}": v for n, v in series["teacher alone"].items()}}
    data = {"headline": headline, "alphas": list(ALPHAS), "teachers": teachers, "rows": rows(outcomes)}
    figures = {"teacher.png": bars_figure(series, title="Teacher θ_pre + α τ_k (Fig. 6a)")}
    return StudyOutput(data=data, markdown=markdown, figures=figures)
