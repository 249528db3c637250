"""Several seeds of one suite (`symerge bench <suite> --seeds 0,1,2`): one complete report per seed in `seed-N/`
(its own splits, experts — cached per seed — and adaptation), then `summary.json` / `summary.md` with each method's
mean ± sample standard deviation over the seeds. A difference between two methods means something only when it
exceeds that spread.

The whole output is written into a temp dir and renamed into place at the end, as `symerge study --seeds` does, so a
failed or interrupted run leaves the previous output as it was; the finished seeds' experts stay cached, so a rerun
repeats only their adaptation.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from symerge.atomic import atomic_directory, atomic_file
from symerge.errors import ValidationError
from symerge.suites.runner import MERGED_BASELINES_EXCLUDED

SUMMARY_FILES = ("summary.json", "summary.md")  # what marks a dir as a multi-seed output `--overwrite` may replace
RunSuite = Callable[..., dict[str, Any]]  # run_<suite>_suite(cfg, out_dir, progress=...) -> report


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """A non-empty list of distinct integer seeds (`--seeds`), checked before any work."""
    values = list(seeds)
    if not values:
        raise ValidationError("--seeds: give at least one seed")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in values):
        raise ValidationError(f"--seeds: seeds must be integers, got {values}")
    repeated = sorted({s for s in values if values.count(s) > 1})
    if repeated:
        raise ValidationError(f"--seeds: seed {repeated[0]} given twice")
    return values


def seed_statistics(values: Mapping[Any, float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n − 1; 0 for one seed) and the value per seed."""
    numbers = [float(v) for v in values.values()]
    return {"mean": statistics.fmean(numbers), "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
            "values": {str(seed): float(v) for seed, v in values.items()}}


def summarize_reports(reports: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method run for every seed: statistics of its normalized average, average and seconds."""
    methods = [m for m in next(iter(reports.values()))["methods"] if all(m in r["methods"] for r in reports.values())]
    return {method: {field: seed_statistics({seed: r["methods"][method][field] for seed, r in reports.items()})
                     for field in ("normalized_average", "average", "seconds")} for method in methods}


def leader_margins(methods: Mapping[str, Mapping[str, Any]], excluded: Sequence[str] = MERGED_BASELINES_EXCLUDED,
                   ) -> dict[str, Any]:
    """How far the merged method with the best mean normalized score leads each other merged method: the gap of
    the means, that gap in units of the larger of the two methods' seed std, and the per-seed (paired) difference's
    mean ± std. Empty with fewer than two merged methods."""
    merged = {m: s["normalized_average"] for m, s in methods.items() if m not in excluded}
    if len(merged) < 2:
        return {}
    leader = max(merged, key=lambda m: merged[m]["mean"])
    top = merged[leader]
    rows = {}
    for method, other in merged.items():
        if method == leader:
            continue
        gap = top["mean"] - other["mean"]
        spread = max(top["std"], other["std"])
        paired = seed_statistics({seed: top["values"][seed] - other["values"][seed] for seed in top["values"]})
        rows[method] = {"gap": gap, "gap_in_std": gap / spread if spread > 0 else None,
                        "paired_mean": paired["mean"], "paired_std": paired["std"]}
    return {"leader": leader, "over": rows}


def margins_markdown(margins: Mapping[str, Any]) -> list[str]:
    if not margins:
        return []
    lines = [f"## How far {margins['leader']} leads (normalized, points)", "",
             "| over | gap of means | gap / larger std | per-seed difference mean ± std |", "|---|---|---|---|"]
    for method, row in sorted(margins["over"].items(), key=lambda item: item[1]["gap"]):
        in_std = "—" if row["gap_in_std"] is None else f"{row['gap_in_std']:.1f}"
        lines.append(f"| {method} | {100 * row['gap']:.2f} | {in_std} | "
                     f"{100 * row['paired_mean']:.2f} ± {100 * row['paired_std']:.2f} |")
    return ["", *lines]


def summary_markdown(summary: Mapping[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = ["| method | normalized (%) mean ± std | average (%) mean ± std | "
             + " | ".join(f"seed {s} norm." for s in seeds) + " |", "|" + "---|" * (len(seeds) + 3)]
    for method, stats in summary["methods"].items():
        norm, avg = stats["normalized_average"], stats["average"]
        lines.append(f"| {method} | {100 * norm['mean']:.1f} ± {100 * norm['std']:.1f} | "
                     f"{100 * avg['mean']:.1f} ± {100 * avg['std']:.1f} | "
                     + " | ".join(f"{100 * norm['values'][str(s)]:.1f}" for s in seeds) + " |")
    runs = [f"- seed {s}: [seed-{s}/report.md](seed-{s}/report.md)" for s in seeds]
    return "\n".join([f"# symerge bench {summary['suite']}: {len(seeds)} seeds", "",
                      f"Protocol {summary['protocol']}; seeds {', '.join(map(str, seeds))}; mean ± sample std over "
                      f"seeds ({summary['seconds']:.0f} s in all).", "", *lines,
                      *margins_markdown(summary.get("margins", {})), "", "Per seed:", "", *runs, ""])


def seed_summary(suite: str, protocol: str, config: Mapping[str, Any], reports: Mapping[int, Mapping[str, Any]],
                 seconds: float) -> dict[str, Any]:
    """The summary of one report per seed (what summary.json holds)."""
    seeds = list(reports)
    methods = summarize_reports(reports)
    return {"suite": suite, "protocol": protocol, "seeds": seeds, "config": dict(config),
            "runs": {str(s): f"seed-{s}/report.json" for s in seeds}, "methods": methods,
            "margins": leader_margins(methods), "seconds": seconds}


def run_seeds(suite: str, cfg: Any, seeds: Sequence[int], out_dir: Path, run_suite: RunSuite, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite once per seed into `out_dir/seed-N`, then write the summary; returns it."""
    seeds = check_seeds(seeds)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    reports: dict[int, dict[str, Any]] = {}
    with atomic_directory(out_dir, manifests=SUMMARY_FILES) as tmp:
        for seed in seeds:
            log(f"{suite} suite, seed {seed}")
            reports[seed] = run_suite(cfg.model_copy(update={"seed": seed}), tmp / f"seed-{seed}", progress=progress)
        summary = seed_summary(suite, cfg.protocol, cfg.model_dump(mode="json"), reports, time.perf_counter() - start)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(summary))
    return summary


def summarize_folder(folder: Path) -> dict[str, Any]:
    """Summarize the `seed-N/report.json` runs already in `folder` (seeds run as separate commands or on separate
    machines) into its summary.json / summary.md; the reports must be one suite and protocol. Returns the summary."""
    folder = Path(folder)
    found = sorted(folder.glob("seed-*/report.json"), key=lambda p: p.parent.name)
    if not found:
        raise ValidationError(f"{folder}: no seed-N/report.json to summarize (each seed's report in its own seed-N/)")
    reports: dict[int, dict[str, Any]] = {}
    for path in found:
        report = json.loads(path.read_text())
        if f"seed-{report.get('seed')}" != path.parent.name:
            raise ValidationError(f"{path}: the report is for seed {report.get('seed')}, not {path.parent.name}")
        reports[int(report["seed"])] = report
    first = next(iter(reports.values()))
    for seed, report in reports.items():
        for key in ("suite", "protocol"):
            if report.get(key) != first.get(key):
                raise ValidationError(f"{folder / f'seed-{seed}' / 'report.json'}: {key} '{report.get(key)}' differs "
                                      f"from seed {first['seed']}'s '{first.get(key)}'")
    reports = dict(sorted(reports.items()))
    summary = seed_summary(first["suite"], first["protocol"], first.get("config", {}), reports,
                           sum(float(r.get("total_seconds", 0.0)) for r in reports.values()))
    with atomic_file(folder / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_file(folder / "summary.md") as tmp:
        tmp.write_text(summary_markdown(summary))
    return summary
