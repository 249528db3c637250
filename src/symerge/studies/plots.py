"""PNG figures of the studies (matplotlib, Agg backend): score matrices, a scatter with its regression line, and a
diverging heatmap. Each function draws from plain lists, so the studies' figure closures hold no models."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def signed(value: float) -> str:
    """'+1.2' / '-0.4', and '+0.0' rather than '-0.0' for a tiny negative."""
    return f"{round(value, 1) + 0.0:+.1f}"


def lambda_text(value: float) -> str:
    """0.3 -> '0.3', 1 -> '1.0' (λ labels that read as coefficients)."""
    text = f"{value:g}"
    return text if "." in text or "e" in text else f"{value:.1f}"


def score_text(value: float | None, percent: bool = True) -> str:
    """A score for a Markdown table: % with one decimal (accuracy-like), else 3 significant digits (e.g. the dense
    suite's 1/error); 'n/a' for a missing or NaN value."""
    if value is None or value != value:
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.3g}"


def gain_text(value: float, percent: bool = True) -> str:
    return signed(100 * value) if percent else f"{value:+.3g}"


def cell_text(value: float, percent: bool) -> str:
    return f"{100 * value:.0f}" if percent else f"{value:.2g}"


def matrix_heatmaps(matrices: Mapping[str, Sequence[Sequence[float]]], tasks: Sequence[str], path: Path,
                    percent: bool = True, row_label: str = "encoder θ_pre + τ_i",
                    column_label: str = "head / data of task j") -> None:
    """Side-by-side K×K heatmaps on one colour scale (the paper's Fig. A / H panels)."""
    values = {name: np.asarray(m, dtype=float) * (100 if percent else 1) for name, m in matrices.items()}
    low = 0.0 if percent else min(float(np.nanmin(v)) for v in values.values())
    high = 100.0 if percent else max(float(np.nanmax(v)) for v in values.values())
    fig, axes = plt.subplots(1, len(values), figsize=(5.2 * len(values) + 1.2, 5.0), squeeze=False,
                             constrained_layout=True)
    image = None
    for index, (ax, (name, grid)) in enumerate(zip(axes[0], values.items())):
        image = ax.imshow(grid, cmap="magma", vmin=low, vmax=high)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks if index == 0 else [""] * len(tasks), fontsize=7)
        ax.set_xlabel(column_label)
        if index == 0:
            ax.set_ylabel(row_label)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                shown = grid[i, j] / (100 if percent else 1)
                ax.text(j, i, cell_text(shown, percent), ha="center", va="center", fontsize=6,
                        color="white" if grid[i, j] < (low + high) / 2 else "black")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="score (%)" if percent else "score")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def scatter_with_fit(x: Sequence[float], y: Sequence[float], labels: Sequence[str], path: Path, *, xlabel: str,
                     ylabel: str, title: str) -> None:
    """One point per task with its name, and the least-squares line (the paper's Fig. 2)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    fig, ax = plt.subplots(figsize=(6.0, 4.6))
    ax.scatter(100 * xs, 100 * ys, color="tab:blue", zorder=3)
    for xi, yi, name in zip(xs, ys, labels):
        ax.annotate(name, (100 * xi, 100 * yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if finite.sum() >= 2 and np.ptp(xs[finite]) > 0:
        slope, intercept = np.polyfit(100 * xs[finite], 100 * ys[finite], 1)
        grid = np.linspace(100 * xs[finite].min(), 100 * xs[finite].max(), 50)
        ax.plot(grid, slope * grid + intercept, color="tab:red", linewidth=1.2,
                label=f"fit: y = {slope:.2f} x + {intercept:.1f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diverging_heatmap(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], path: Path, *,
                      title: str, row_label: str, unit: str = "%p") -> None:
    """Signed values (e.g. gains in percentage points) around 0: red positive, blue negative (the paper's Fig. 3b)."""
    grid = np.asarray(values, dtype=float)
    bound = max(float(np.nanmax(np.abs(grid))) if grid.size else 0.0, 1e-9)
    fig, ax = plt.subplots(figsize=(0.9 * len(columns) + 2.6, 0.42 * len(rows) + 1.6))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylabel(row_label)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, signed(grid[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if abs(grid[i, j]) > 0.6 * bound else "black")
    fig.colorbar(image, ax=ax, label=unit)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
