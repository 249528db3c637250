"""PNG plots of a suite report (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from symerge.report.markdown import has_curves  # noqa: E402


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_heatmap(report: Mapping[str, Any], path: Path) -> None:
    tasks = [t["name"] for t in report["tasks"]]
    names = list(report["methods"])
    values = np.array([[report["methods"][m]["per_task"][t] for t in tasks] + [report["methods"][m]["average"]]
                       for m in names]) * 100
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3, 0.42 * len(names) + 1.5))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    ax.set_xticks(range(len(tasks) + 1), tasks + ["AVERAGE"], rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(tasks) + 1):
            ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if values[i, j] < 60 else "black")
    fig.colorbar(image, ax=ax, label="test accuracy (%)")
    ax.set_title("Per-task accuracy by method")
    save(fig, path)


def normalized_bars(report: Mapping[str, Any], path: Path) -> None:
    names = [m for m in report["methods"] if m != "individual"]
    values = [100 * report["methods"][m]["normalized_average"] for m in names]
    order = np.argsort(values)
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    colors = ["tab:red" if names[i] == "symerge" else "tab:blue" for i in order]
    ax.barh([names[i] for i in order], [values[i] for i in order], color=colors)
    ax.axvline(100, color="black", linestyle="--", linewidth=1)
    for k, i in enumerate(order):
        ax.text(values[i] + 0.5, k, f"{values[i]:.1f}", va="center", fontsize=8)
    ax.set_xlabel("normalized accuracy (% of the individual experts, dashed line)")
    ax.set_xlim(0, max(105, max(values) + 8))
    save(fig, path)


def cross_task_heatmaps(report: Mapping[str, Any], path: Path) -> None:
    cross = report["cross_task"]
    names = [n for n in ("original", "symerge") if n in cross]
    tasks = cross["tasks"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names) + 1.5, 5.0), squeeze=False,
                             constrained_layout=True)
    for index, (ax, name) in enumerate(zip(axes[0], names)):
        values = np.array(cross[name]) * 100
        image = ax.imshow(values, cmap="magma", vmin=0, vmax=100)
        ax.set_title(f"{name} heads (off-diag {100 * cross['off_diagonal_mean'][name]:.1f}%)")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks if index == 0 else [""] * len(tasks), fontsize=7)
        ax.set_xlabel("head / data of task j")
        if index == 0:
            ax.set_ylabel("encoder θ_pre + τ_i")
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < 60 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy (%)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def lambda_heatmap(report: Mapping[str, Any], path: Path, method: str = "symerge") -> None:
    entry = report["lambdas"][method]
    values = np.array(entry["values"])
    fig, ax = plt.subplots(figsize=(0.6 * len(entry["tasks"]) + 3, 0.09 * len(entry["rows"]) + 2))
    image = ax.imshow(values, cmap="coolwarm", aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(entry["tasks"])), entry["tasks"], rotation=45, ha="right")
    step = max(1, len(entry["rows"]) // 25)
    ax.set_yticks(range(0, len(entry["rows"]), step), [entry["rows"][i] for i in range(0, len(entry["rows"]), step)], fontsize=6)
    ax.set_title(f"{method} λ (tensor × task)")
    fig.colorbar(image, ax=ax)
    save(fig, path)


def loss_curves(report: Mapping[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, losses in report["loss_history"].items():
        ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("iteration (one batch per task)")
    ax.set_ylabel("mean task loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Adaptation loss")
    save(fig, path)


def iteration_curves(report: Mapping[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, entry in report["methods"].items():
        if entry.get("curve"):
            xs = [p["iterations"] for p in entry["curve"]]
            ax.plot(xs, [100 * p["normalized_average"] for p in entry["curve"]], marker="o", label=name)
    for name in ("task_arithmetic", "task_arithmetic_val"):
        if name in report["methods"]:
            ax.axhline(100 * report["methods"][name]["normalized_average"], linestyle="--", linewidth=1, label=name,
                       color="gray" if name == "task_arithmetic" else "black")
    ax.set_xlabel("adaptation iterations")
    ax.set_ylabel("normalized accuracy (%)")
    ax.legend()
    save(fig, path)


def per_task_is_scalar(report: Mapping[str, Any]) -> bool:
    """Classification suites report one accuracy per task; the dense suite a dict of metrics."""
    first = next(iter(report["methods"].values()))
    return all(isinstance(v, (int, float)) for v in first["per_task"].values())


def gap_closed_bars(report: Mapping[str, Any], path: Path) -> None:
    """Share of the task-arithmetic → expert gap each method closes, per task metric (dense suite)."""
    table = report["gap_closed"]["methods"]
    names = list(table)
    columns = [(t, m) for t, metrics in next(iter(table.values())).items() for m in metrics]
    values = np.array([[100 * table[n][t][m] for t, m in columns] for n in names])
    fig, ax = plt.subplots(figsize=(0.75 * len(columns) + 3.5, 0.45 * len(names) + 1.8))
    image = ax.imshow(np.clip(values, -100, 100), cmap="RdYlGn", aspect="auto", vmin=-100, vmax=100)
    ax.set_xticks(range(len(columns)), [f"{t}\n{m}" for t, m in columns], fontsize=7)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(columns)):
            ax.text(j, i, f"{values[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="% of the gap closed (clipped at ±100)")
    ax.set_title(f"Gap closed between {report['gap_closed']['baseline']} (0) and the experts (100)")
    save(fig, path)


def colorize_segmentation(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return plt.get_cmap("tab10")(labels % 10)[..., :3] if num_classes <= 10 else plt.get_cmap("tab20")(labels % 20)[..., :3]


def dense_panel(task: str, value: np.ndarray, num_classes: int, depth_range: tuple[float, float]) -> tuple[np.ndarray, dict[str, Any]]:
    """One [C, H, W] output or label map -> an image and imshow keywords."""
    if task == "segmentation":
        labels = value.argmax(0) if value.ndim == 3 else value
        return colorize_segmentation(labels, num_classes), {}
    if task == "depth":
        return value.reshape(value.shape[-2:]), {"cmap": "viridis_r", "vmin": depth_range[0], "vmax": depth_range[1]}
    unit = value / np.maximum(np.linalg.norm(value, axis=0, keepdims=True), 1e-8)
    return np.clip((unit.transpose(1, 2, 0) + 1) / 2, 0, 1), {}


def dense_predictions(images: np.ndarray, truth: Mapping[str, Any], predictions: Mapping[str, Mapping[str, Any]],
                      path: Path) -> None:
    """Per scene (rows): the input, then per task the ground truth and each method's prediction (columns)."""
    tasks = list(truth)
    methods = list(predictions)
    columns = [("input", None, None)] + [(f"{t}\n{src}", t, src) for t in tasks for src in ["truth"] + methods]
    n = len(images)
    depth = np.asarray(truth["depth"]) if "depth" in truth else None
    depth_range = (float(depth.min()), float(depth.max())) if depth is not None else (0.0, 1.0)
    num_classes = int(next(iter(predictions.values()))["segmentation"].shape[1]) if "segmentation" in truth else 1
    fig, axes = plt.subplots(n, len(columns), figsize=(1.3 * len(columns), 1.4 * n + 0.4), squeeze=False)
    for row in range(n):
        for col, (title, task, source) in enumerate(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if task is None:
                ax.imshow(images[row])
            else:
                value = truth[task][row] if source == "truth" else predictions[source][task][row]
                picture, style = dense_panel(task, np.asarray(value), num_classes, depth_range)
                ax.imshow(picture, **style)
            if row == 0:
                ax.set_title(title, fontsize=7)
    save(fig, path)


def make_plots(report: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Write every plot the report's content allows; returns {title: relative path}."""
    plots: dict[str, str] = {}
    jobs = [
        ("accuracy by method and task", "accuracy.png", accuracy_heatmap, per_task_is_scalar(report)),
        ("gap closed per metric", "gap_closed.png", gap_closed_bars, bool(report.get("gap_closed", {}).get("methods"))),
        ("normalized accuracy", "normalized.png", normalized_bars, any(m != "individual" for m in report["methods"])),
        ("quality vs adaptation iterations", "iterations.png", iteration_curves, has_curves(report)),
        ("cross-task matrices", "cross_task.png", cross_task_heatmaps, "cross_task" in report),
        ("SyMerge λ", "lambda_symerge.png", lambda_heatmap, "symerge" in report.get("lambdas", {})),
        ("adaptation loss", "loss.png", loss_curves, bool(report.get("loss_history"))),
    ]
    for title, name, fn, wanted in jobs:
        if wanted:
            fn(report, out_dir / name)
            plots[title] = name
    return plots
