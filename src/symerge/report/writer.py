"""Write a report dict (built by the suites, `suites.report.build_report`) as report.json / report.md / plots,
atomically, into a run dir. Renders dicts only: imports nothing of the suites."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from symerge.atomic import atomic_directory

REPORT_FILES = ("report.json", "report.md")  # what marks a dir as a suite report that `--overwrite` may replace


def write_report(report: Mapping[str, Any], outcomes: Mapping[str, Any] | None, out_dir: Path,
                 figures: Mapping[str, tuple[str, Callable[[Path], None]]] | None = None) -> None:
    """Write into a temp dir beside `out_dir`, then rename: a failed run leaves no half-written report.

    `outcomes` is unused (kept for old callers). `figures`: suite-specific plots, {title: (file name,
    writer(path))}, added to the report's plots."""
    from symerge.report.markdown import render_markdown
    from symerge.report.plots import make_plots

    with atomic_directory(Path(out_dir), manifests=REPORT_FILES) as tmp:
        plots = make_plots(report, tmp)
        for title, (name, draw) in (figures or {}).items():
            draw(tmp / name)
            plots[title] = name
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "report.md").write_text(render_markdown(report, plots))
