"""The report's iteration curve (table and plot) appears only where a method was scored at ≥ 2 iteration counts: the
demo preset scores adaptive rows once, at the end, and a one-point "curve" only repeats the main table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from symerge.report.markdown import has_curves, render_markdown
from symerge.report.plots import make_plots

REPORT = Path(__file__).resolve().parents[1] / "docs" / "text" / "report-held-out.json"


def test_curve_section_and_plot_need_two_points(tmp_path):
    report = json.loads(REPORT.read_text())
    assert has_curves(report)
    full = tmp_path / "full"
    full.mkdir()
    plots = make_plots(report, full)
    assert (full / "iterations.png").exists()
    assert "Quality vs adaptation iterations" in render_markdown(report, plots)

    once = copy.deepcopy(report)
    for entry in once["methods"].values():
        entry["curve"] = entry.get("curve", [])[-1:]
    assert not has_curves(once)
    end_only = tmp_path / "end-only"
    end_only.mkdir()
    plots = make_plots(once, end_only)
    assert not (end_only / "iterations.png").exists() and (end_only / "normalized.png").exists()
    assert "Quality vs adaptation iterations" not in render_markdown(once, plots)
