"""Bar charts of the ablation studies (matplotlib, Agg backend), drawn from plain floats so a figure closure holds no
model, and the helpers those studies share (scores as percentages, the headline)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from symerge.studies.base import Figure, VariantOutcome  # noqa: E402


def grouped_bars(series: Mapping[str, Mapping[str, float]], path: Path, *, title: str, ylabel: str,
                 lines: Mapping[str, float] | None = None) -> None:
    """One group of bars per category, one bar per series (values are fractions, drawn as %); `lines` adds dashed
    horizontal references (e.g. the ground-truth upper bound)."""
    categories = list(dict.fromkeys(c for values in series.values() for c in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(categories) * max(len(series), 1) + 2.0), 4.2))
    for index, (name, values) in enumerate(series.items()):
        xs = np.arange(len(categories)) + (index - (len(series) - 1) / 2) * width
        heights = [100 * values.get(c, np.nan) for c in categories]
        bars = ax.bar(xs, heights, width=width, label=name)
        for bar, height in zip(bars, heights):
            if np.isfinite(height):
                ax.text(bar.get_x() + bar.get_width() / 2, height, f"{height:.1f}", ha="center", va="bottom",
                        fontsize=6, rotation=90 if len(categories) * len(series) > 12 else 0)
    for k, (name, value) in enumerate((lines or {}).items()):
        ax.axhline(100 * value, linestyle="--", linewidth=1, color=f"C{len(series) + k}", label=name)
    ax.set_xticks(range(len(categories)), categories, rotation=35 if len(categories) > 4 else 0, ha="right"
                  if len(categories) > 4 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1 or lines:
        ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars_figure(series: Mapping[str, Mapping[str, float]], *, title: str,
                ylabel: str = "average test score (%)", lines: Mapping[str, float] | None = None) -> Figure:
    """A `Figure` (draw(path)) over copies of the given floats."""
    frozen = {name: dict(values) for name, values in series.items()}
    references = dict(lines or {})
    return lambda path: grouped_bars(frozen, path, title=title, ylabel=ylabel, lines=references)


def averages(outcomes: Mapping[str, VariantOutcome]) -> dict[str, float]:
    """{row label: average test score} (the paper's metric: mean accuracy over tasks)."""
    return {label: o.average for label, o in outcomes.items()}


def rows(outcomes: Mapping[str, VariantOutcome]) -> list[dict]:
    return [o.row() for o in outcomes.values()]
