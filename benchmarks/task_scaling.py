"""Normalized accuracy of each method as the task count grows (paper Table 1: 8 → 14 → 20 tasks), from suite reports
already run (`symerge bench text --tasks text8|text14|text20 ...`). Reads report.json files, runs nothing.

    python benchmarks/task_scaling.py docs/text/scaling/text8/report.json docs/text/scaling/text14/report.json \
        docs/text/scaling/text20/report.json [--out docs/text/scaling/scaling.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def scaling_table(reports: list[dict[str, Any]]) -> str:
    """Markdown: one row per method present in every report, one column per report (by task count)."""
    reports = sorted(reports, key=lambda r: len(r["tasks"]))
    methods = [m for m in reports[0]["methods"] if all(m in r["methods"] for r in reports)]
    counts = [len(r["tasks"]) for r in reports]
    lines = ["| method | " + " | ".join(f"{n} tasks" for n in counts) + " |", "|---|" + "---|" * len(counts)]
    for method in methods:
        cells = [f"{100 * r['methods'][method]['normalized_average']:.1f}" for r in reports]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    seconds = [f"{r.get('total_seconds', float('nan')) / 60:.0f} min" for r in reports]
    lines += ["", "Normalized accuracy (%, method / individual expert, averaged over tasks; Pearson r for regression "
              "tasks). Wall time per run: " + ", ".join(f"{n} tasks {s}" for n, s in zip(counts, seconds)) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="report.json of each task count")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()
    missing = [str(p) for p in args.reports if not p.is_file()]
    if missing:
        parser.error(f"no such report: {', '.join(missing)}")
    table = scaling_table([json.loads(p.read_text()) for p in args.reports])
    print(table, end="")
    if args.out is not None:
        from symerge.atomic import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(table)


if __name__ == "__main__":
    main()
