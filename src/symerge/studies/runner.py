"""Run one registered study on a suite, for one or several seeds, and write its output directory atomically.

Per seed: build the suite's benchmark (data, experts fine-tuned or loaded from the cache) with that seed, score
each expert on its own test split (the normalized score's denominator), run the study, and write `study.json`
(data, config, seeds, what it reproduces, seconds), `study.md` (the paper figure / table it reproduces, the study's
Markdown, its figures embedded) and the figures (PNG). With several seeds each seed gets a `seed-N/` folder and the
top level holds the summary: mean ± std over seeds of every number in the study's `data["headline"]`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from symerge.atomic import atomic_directory, prepare_output_dir
from symerge.errors import ValidationError
from symerge.studies.base import StudyContext, StudyOutput, StudySpec, get_study
from symerge.suites.base import SuiteConfig
from symerge.suites.runner import AdaptSettings, Benchmark, primary_scores, row_settings, static_result
from symerge.suites.seeds import check_seeds, seed_statistics

STUDY_FILES = ("study.json", "study.md")  # what marks a dir as a study output that `--overwrite` may replace
# Which SyMerge a study runs: "paper", the paper's figures' (classifier head; `paper_head_settings`), or "suite", the
# suite's main row as its report runs it (text and vision: one encoder block at the block's lr; text: KL labels).
SYMERGE_AS = ("paper", "suite")
SUITES = ("text", "vision", "dense")
Builder = Callable[..., tuple[Benchmark, dict[str, Any]]]  # builder(cfg, progress=..., log=...) -> (bench, info)


def suite_parts(suite: str) -> tuple[type[SuiteConfig], Builder, int]:
    """The suite's config class, its benchmark builder and its default number of tasks (imported lazily)."""
    if suite == "text":
        from symerge.suites.text import TextSuiteConfig, text_benchmark

        return TextSuiteConfig, text_benchmark, 8
    if suite == "vision":
        from symerge.suites.vision import VisionSuiteConfig, vision_benchmark

        return VisionSuiteConfig, vision_benchmark, 6
    if suite == "dense":
        from symerge.suites.dense import DenseSuiteConfig, dense_benchmark

        return DenseSuiteConfig, dense_benchmark, 3
    raise ValidationError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")


def check_study_options(spec: StudySpec, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Each option checked by the study's own checker; an unknown name is refused, naming the known ones."""
    checked = {}
    for name, value in (options or {}).items():
        if name not in spec.options:
            known = ", ".join(spec.options) or "none"
            raise ValidationError(f"study '{spec.name}' has no option '{name}' (options: {known})")
        checked[name] = spec.options[name](value)
    return checked


def check_task_count(spec: StudySpec, count: int) -> None:
    if count < spec.min_tasks:
        raise ValidationError(f"--tasks: study '{spec.name}' needs at least {spec.min_tasks} tasks, got {count}")


OMIT = object()  # `jsonable`'s marker for a value JSON cannot hold


def jsonable(value: Any) -> Any:
    """Plain JSON types (tensors and arrays as lists, paths as strings); values of other types are left out."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, Mapping):
        out = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not OMIT}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return OMIT


def check_headline(name: str, data: Mapping[str, Any]) -> dict[str, float]:
    headline = data.get("headline")
    if not isinstance(headline, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in headline.items()):
        raise TypeError(f"study '{name}' must return data['headline'] as a flat {{name: float}} dict")
    return {k: float(v) for k, v in headline.items()}


def reference_scores(bench: Benchmark, ctx: StudyContext) -> dict[str, float]:
    """Each expert's own test score (θ_pre + τ_k with its head): the normalized score's denominator."""
    return primary_scores(static_result("individual", bench, ctx.task_vectors(), {}), bench, ctx.device)


# --- writing ------------------------------------------------------------------------------------------------------------
def write_seed(folder: Path, spec: StudySpec, record: dict[str, Any], output: StudyOutput) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file_name, draw in output.figures.items():
        draw(folder / file_name)
    (folder / "study.json").write_text(json.dumps(jsonable(record), indent=2) + "\n")
    (folder / "study.md").write_text(seed_markdown(spec, record, output))


def title(spec: StudySpec) -> str:
    return f"# symerge study {spec.name}: reproduces {spec.reproduces}"


def seed_markdown(spec: StudySpec, record: Mapping[str, Any], output: StudyOutput) -> str:
    tasks = ", ".join(record["tasks"])
    setup = (f"Suite `{record['suite']}` ({'quick preset' if record['config'].get('quick') else 'full settings'}), "
             f"tasks {tasks}; seed {record['seed']}; protocol {record['config']['protocol']}; "
             f"{record['steps']} adaptation steps; {record['seconds']:.0f} s.")
    figures = [f"![{name}]({name})" for name in output.figures]
    return "\n".join([title(spec), "", spec.summary[0].upper() + spec.summary[1:] + ".", "", setup, "",
                      output.markdown.rstrip(), *(["", "## Figures", "", *figures] if figures else []), ""])


def summarize(headlines: Mapping[int, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per headline number: mean and sample standard deviation (n − 1) over seeds, and the values per seed."""
    names = list(next(iter(headlines.values())))
    return {name: seed_statistics({seed: h.get(name, math.nan) for seed, h in headlines.items()}) for name in names}


def summary_markdown(spec: StudySpec, summary: Mapping[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = ["| number | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 2)]
    for name, entry in summary["headline"].items():
        lines.append(f"| {name} | {entry['mean']:.4f} ± {entry['std']:.4f} | "
                     + " | ".join(f"{entry['values'][str(s)]:.4f}" for s in seeds) + " |")
    runs = [f"- seed {s}: [seed-{s}/study.md](seed-{s}/study.md)" for s in seeds]
    return "\n".join([title(spec), "", f"Suite `{summary['suite']}`, seeds {', '.join(map(str, seeds))}: mean ± "
                      f"sample std over seeds of the headline numbers ({summary['seconds']:.0f} s in all).", "",
                      *lines, "", "Per seed:", "", *runs, ""])


# --- the run ----------------------------------------------------------------------------------------------------------
def run_study(
    name: str,
    suite: str,
    cfg: SuiteConfig,
    out_dir: Path,
    seeds: Sequence[int] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
    study_options: Mapping[str, Any] | None = None,
    steps: int | None = None,
    benchmark: Benchmark | None = None,
    symerge_as: str = "paper",
) -> dict[str, Any]:
    """Run study `name` on `suite` for each seed (default: the config's) and write `out_dir`; returns what
    `study.json` holds (the summary with several seeds).

    Everything is checked before any download or training: the study, the suite, the seeds, the study options,
    the number of tasks and the output dir (new, empty, or a previous study output with `overwrite`). `steps`
    overrides the suite's adaptation steps (a variant's own `trainer={"steps": ...}` still wins). `symerge_as`
    (`SYMERGE_AS`): SyMerge as the paper's figures run it (default) or as the suite's main row. `benchmark`: a
    built benchmark, used for every seed instead of building the suite's (tests)."""
    spec = get_study(name)
    _config_cls, build, default_tasks = suite_parts(suite)
    seed_list = check_seeds(seeds if seeds is not None else [cfg.seed])
    options = check_study_options(spec, study_options)
    if symerge_as not in SYMERGE_AS:
        raise ValidationError(f"symerge_as must be one of {list(SYMERGE_AS)}, got '{symerge_as}'")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValidationError(f"--steps must be an integer ≥ 1, got {steps!r}")
    tasks = getattr(cfg, "tasks", None)
    check_task_count(spec, len(benchmark.tasks) if benchmark is not None else len(tasks) if tasks else default_tasks)
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, overwrite, STUDY_FILES)
    start = time.perf_counter()
    records: dict[int, dict[str, Any]] = {}
    with atomic_directory(out_dir, manifests=STUDY_FILES) as tmp:
        for seed in seed_list:
            folder = tmp if len(seed_list) == 1 else tmp / f"seed-{seed}"
            records[seed] = run_one_seed(spec, suite, cfg.model_copy(update={"seed": seed}), folder, progress, log,
                                         options, steps, benchmark, build, symerge_as)
        if len(seed_list) == 1:
            return records[seed_list[0]]
        summary = {"study": spec.name, "reproduces": spec.reproduces, "summary": spec.summary, "suite": suite,
                   "seeds": seed_list, "config": jsonable(cfg.model_dump(mode="json")), "study_options": options,
                   "symerge_as": symerge_as,
                   "runs": {str(s): f"seed-{s}/study.json" for s in seed_list},
                   "headline": summarize({s: r["headline"] for s, r in records.items()}),
                   "seconds": time.perf_counter() - start}
        (tmp / "study.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
        (tmp / "study.md").write_text(summary_markdown(spec, summary))
    return summary


def paper_head_settings(settings: AdaptSettings) -> AdaptSettings:
    """The suite's settings with SyMerge on the classifier head, as the paper's figures run it (the suites' main
    row adapts an encoder block; the studies reproduce the paper's head, and the ablation compares the two)."""
    return row_settings("symerge_head", settings, {})


def run_one_seed(spec: StudySpec, suite: str, cfg: SuiteConfig, folder: Path, progress: bool,
                 log: Callable[[str], None], options: dict[str, Any], steps: int | None,
                 benchmark: Benchmark | None, build: Builder, symerge_as: str = "paper") -> dict[str, Any]:
    """Build (or take) the benchmark, run the study with this seed, write its files into `folder`."""
    start = time.perf_counter()
    log(f"study {spec.name} on {suite}, seed {cfg.seed}")
    if symerge_as == "paper":
        cfg = cfg.model_copy(update={"adapt": paper_head_settings(getattr(cfg, "adapt"))})
    if steps is not None:
        cfg = cfg.with_adapt_steps(steps)
    if benchmark is None:
        bench, info = build(cfg, progress=progress, log=log)
    else:
        bench, info = benchmark, {"benchmark": "given"}
    settings = cfg.adapt_settings()
    ctx = StudyContext(suite=suite, bench=bench, settings=settings, protocol=cfg.protocol, seed=cfg.seed,
                       quick=cfg.quick, reference={}, progress=progress, log=log,
                       cross_task_samples=getattr(cfg, "cross_task_samples", None), options=options)
    ctx.reference = reference_scores(bench, ctx)
    torch.manual_seed(cfg.seed)
    study_start = time.perf_counter()
    output = spec.fn(ctx)
    headline = check_headline(spec.name, output.data)
    record = {"study": spec.name, "reproduces": spec.reproduces, "summary": spec.summary, "suite": suite,
              "seed": cfg.seed, "tasks": ctx.tasks, "config": cfg.model_dump(mode="json"),
              "settings": settings.model_dump(mode="json"),
              "steps": settings.steps if output.steps is None else output.steps,
              "study_options": options, "symerge_as": symerge_as, "benchmark": info,
              "reference": ctx.reference, "headline": headline, "data": output.data,
              "figures": list(output.figures), "study_seconds": time.perf_counter() - study_start,
              "seconds": time.perf_counter() - start}
    write_seed(folder, spec, record, output)
    return jsonable(record)
