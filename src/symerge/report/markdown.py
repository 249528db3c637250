"""Markdown rendering of a suite report: per-task table, normalized accuracy, ECE, cost, curves, diagnostics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MERGED_EXCLUDED = ("pretrained", "individual")
PERCENT_METRICS = ("accuracy", "miou", "pixel_acc", "within_11.25")


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metric_cell(metric: str, value: float) -> str:
    """Shares and accuracies as percentages, errors and angles as plain numbers."""
    return pct(value) if metric in PERCENT_METRICS else f"{value:.3f}" if metric.endswith("_err") else f"{value:.1f}"


def methods_table(report: Mapping[str, Any]) -> str:
    tasks = [t["name"] for t in report["tasks"]]
    best = max((m for m in report["methods"] if m not in MERGED_EXCLUDED),
               key=lambda m: report["methods"][m]["normalized_average"], default=None)
    first = next(iter(report["methods"].values()))["per_task"]
    dense = not all(isinstance(first[t], (int, float)) for t in tasks)
    columns = [(t, m) for t in tasks for m in first[t]] if dense else [(t, None) for t in tasks]
    rows = []
    for name, entry in report["methods"].items():
        label = f"**{name}**" if name == best else name
        cells = [metric_cell(m, entry["per_task"][t][m]) if m else pct(entry["per_task"][t]) for t, m in columns]
        rows.append([label] + cells + ([] if dense else [pct(entry["average"])]) + [
            pct(entry["normalized_average"]), "-" if entry["ece"] != entry["ece"] else f"{entry['ece']:.3f}",
            f"{entry['seconds']:.1f}", f"{entry['peak_memory_mb']:.0f}"])
    header = [f"{t} {m}" if m else t for t, m in columns] + ([] if dense else ["avg"])
    return table(["method"] + header + ["norm. avg", "ECE", "seconds", "peak MB"], rows)


def gap_closed_section(report: Mapping[str, Any]) -> str:
    gap = report.get("gap_closed", {}).get("methods")
    if not gap:
        return ""
    columns = [(t, m) for t, metrics in next(iter(gap.values())).items() for m in metrics]
    rows = [[name] + [pct(values[t][m]) for t, m in columns] for name, values in gap.items()]
    return (f"Share (%) of the gap between {report['gap_closed']['baseline']} (0 %) and the individual experts "
            "(100 %) each method closes, per metric.\n\n" + table(["method"] + [f"{t} {m}" for t, m in columns], rows))


def has_curves(report: Mapping[str, Any]) -> bool:
    """Whether some method was scored at ≥ 2 iteration counts (a run scored once, at the end, has no curve to show:
    its one point is the main table's row)."""
    return any(len(entry.get("curve", [])) >= 2 for entry in report["methods"].values())


def curve_table(report: Mapping[str, Any]) -> str:
    if not has_curves(report):
        return ""
    raw_average = report["suite"] != "dense"  # dense tasks' primary metrics have different units: no raw average
    rows = []
    for name, entry in report["methods"].items():
        for point in entry.get("curve", []):
            rows.append([name, str(point["iterations"])] + ([pct(point["average"])] if raw_average else [])
                        + [pct(point["normalized_average"]), f"{point['seconds']:.0f}"])
    header = ["method", "iterations"] + (["avg"] if raw_average else []) + ["norm. avg", "adaptation seconds"]
    return table(header, rows) if rows else ""


def cross_task_section(report: Mapping[str, Any]) -> str:
    cross = report.get("cross_task")
    if not cross:
        return ""
    tasks = cross["tasks"]
    parts = [f"Encoder of task i (θ_pre + τ_i, rows) read by the head of task j (columns) on task j's first "
             f"{cross['samples_per_task']} test inputs. Mean off-diagonal accuracy: "
             + ", ".join(f"{k} heads {pct(v)}" for k, v in cross["off_diagonal_mean"].items()) + "."]
    for name in ("original", "symerge"):
        if name in cross:
            rows = [[tasks[i]] + [pct(v) for v in row] for i, row in enumerate(cross[name])]
            source = cross.get("symerge_heads_from")
            origin = f" (learned by the `{source}` row)" if name == "symerge" and source not in (None, "symerge") else ""
            parts.append(f"**{name} heads**{origin}\n\n" + table(["encoder \\ head"] + tasks, rows))
    return "\n\n".join(parts)


def transfer_section(report: Mapping[str, Any]) -> str:
    transfer = report.get("head_transfer")
    if not transfer:
        return ""
    rows = []
    for name, entry in transfer.items():
        for heads in ("original_heads", "symerge_heads"):
            rows.append([name, heads.replace("_", " "), pct(entry[heads]["average"]), pct(entry[heads]["normalized_average"])])
    return table(["encoder", "heads", "avg", "norm. avg"], rows)


def inference_cost_table(report: Mapping[str, Any]) -> str:
    """What each row keeps beyond one merged encoder and the task heads (block copies, adapters, experts; WEMoE's
    task vectors and routers), relative to the encoder, and how much slower WEMoE runs than a merged encoder."""
    rows = []
    for name, entry in report["methods"].items():
        cost, kept = entry.get("inference_cost"), entry.get("task_specific")
        if cost:
            slowdown = f"{cost['slowdown']:.2f}×" if "slowdown" in cost else "-"
            rows.append([name, f"{cost['extra_stored_params']:,}", "-", f"{cost['extra_params_ratio']:.2f}×",
                         f"{cost['router_params']:,}", slowdown])
        elif kept:
            rows.append([name, f"{kept['values']:,}", f"{kept['per_task']:,}", f"{kept['of_encoder']:.3g}×", "-", "-"])
    return table(["method", "extra values kept", "per task", "extra / encoder", "trained router params",
                  "time / sample vs merged"], rows) if rows else ""


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    cfg = report.get("config", {})
    sections = [
        f"# symerge bench {report['suite']} — protocol `{report['protocol']}`, seed {report['seed']}",
        "Accuracy (%) on the labeled test split (Pearson r × 100 for a regression task); normalized = mean over tasks "
        "of method / individual expert. "
        "ECE = expected calibration error (15 bins). Bold = best merged method by normalized average."
        if report["suite"] != "dense" else
        "Metrics on the labeled test scenes: mIoU and pixel accuracy (%), absolute and relative depth error, angular "
        "error of the normals (degrees) and share of pixels within 11.25° (%). Normalized = mean over tasks of the "
        "primary metric relative to the expert (errors inverted). ECE = pixel-level calibration of segmentation. "
        "Bold = best merged method by normalized average.",
        methods_table(report),
    ]
    tasks_rows = [[t["name"], str(t["num_classes"]), str(t.get("n_train", "")), str(t.get("n_val", "")),
                   str(t.get("n_adapt", "")), str(t.get("n_test", ""))] for t in report["tasks"]]
    sections += ["## Tasks", table(["task", "classes", "train", "val", "adapt", "test"], tasks_rows)]
    optional = (("Quality vs adaptation iterations", curve_table), ("Cross-task matrix", cross_task_section),
                ("Gap closed", gap_closed_section),
                ("Head transfer (SyMerge heads on other merged encoders)", transfer_section),
                ("Inference cost", inference_cost_table))
    for title, section in optional:  # each only when the report has its data
        body = section(report)
        if body:
            sections += [f"## {title}", body]
    if plots:
        sections += ["## Plots"] + [f"![{name}]({path})" for name, path in plots.items()]
    if report.get("notes"):  # suite-specific remarks (e.g. the vision suite's BatchNorm handling)
        sections += ["## Notes", "\n".join(f"- {note}" for note in report["notes"])]
    settings = {k: cfg[k] for k in ("expert", "adapt", "max_len", "freeze_word_embeddings", "image_size",
                                    "bn_reestimate") if k in cfg}
    if settings:
        sections += ["## Settings", "```json\n" + __import__("json").dumps(settings, indent=1) + "\n```"]
    if "total_seconds" in report:
        sections.append(f"Total wall time: {report['total_seconds']:.0f} s.")
    return "\n\n".join(sections) + "\n"
