"""`symerge` command line: benchmarks, the paper's studies, merging and method listing."""

from __future__ import annotations

import argparse
import io
import re
import sys
import time
from pathlib import Path
from typing import Any

from symerge.errors import SymergeError


def parse_methods(value: str | None) -> list[str] | None:
    return [m.strip() for m in value.split(",") if m.strip()] if value else None


def positive_int(value: str) -> int:
    """argparse type: an integer ≥ 1 (e.g. --threads 0 would silently mean 'torch's choice')."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {number}")
    return number


def suite_config(config_cls: Any, preset: str | None, overrides: dict[str, Any]) -> Any:
    """The suite's config (its named `preset`, else the defaults) with `overrides`, or a SymergeError with one line per
    bad option (before any download or training)."""
    import pydantic

    presets = config_cls.presets()
    if preset is not None and preset not in presets:
        raise SymergeError(f"--preset: unknown preset '{preset}'; this suite has: {', '.join(presets)}")
    try:
        return presets[preset](**overrides) if preset is not None else config_cls(**overrides)
    except pydantic.ValidationError as err:
        lines = [f"--{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
                 for e in err.errors()]
        raise SymergeError("; ".join(lines)) from None


def bench_preset(args: argparse.Namespace) -> str | None:
    """`--preset NAME`, with `--quick` short for `--preset quick`."""
    if args.quick and args.preset not in (None, "quick"):
        raise SymergeError(f"--quick and --preset {args.preset} contradict each other: give one")
    return "quick" if args.quick else args.preset


def run_bench(args: argparse.Namespace, suite: str, config_cls: Any, run_suite: Any, extra: dict[str, Any]) -> int:
    """Shared driver of `symerge bench <suite>`: options -> config -> run -> table on stdout."""
    import torch

    from symerge.atomic import prepare_output_dir
    from symerge.report.markdown import methods_table
    from symerge.report.writer import REPORT_FILES
    from symerge.suites.runner import check_methods, known_methods
    from symerge.suites.seeds import SUMMARY_FILES, check_seeds, run_seeds, summary_markdown

    overrides = {"protocol": args.protocol, "seed": args.seed, "device": args.device, "precision": args.precision,
                 "expert_workers": args.expert_workers, **extra}
    methods = parse_methods(args.methods)
    if methods == ["all"]:
        methods = known_methods()
    if methods:
        check_methods(methods)
        overrides["methods"] = methods
    if args.tasks:
        overrides["tasks"] = parse_methods(args.tasks)
    cfg = suite_config(config_cls, bench_preset(args), overrides)
    if args.steps is not None:
        cfg = cfg.with_adapt_steps(args.steps)
    out = Path(args.out or f"runs/{suite}-{time.strftime('%Y%m%d-%H%M%S')}")
    seeds = check_seeds(args.seeds) if args.seeds is not None else None
    # before any work: only ever replace a previous report (or multi-seed output)
    prepare_output_dir(out, args.overwrite, REPORT_FILES if seeds is None else SUMMARY_FILES)
    if args.threads:
        torch.set_num_threads(args.threads)
    if seeds is not None:
        summary = run_seeds(suite, cfg, seeds, out, run_suite, progress=not args.no_progress)
        print()
        print(summary_markdown(summary))
        print(f"\nsummary: {out / 'summary.md'}  ({summary['seconds']:.0f} s)")
        return 0
    report = run_suite(cfg, out, progress=not args.no_progress)
    print()
    print(methods_table(report))
    print(f"\nreport: {out / 'report.md'}  ({report['total_seconds']:.0f} s)")
    return 0


def cmd_bench_text(args: argparse.Namespace) -> int:
    from symerge.suites.text import TextSuiteConfig, run_text_suite

    return run_bench(args, "text", TextSuiteConfig, run_text_suite, {})


def cmd_bench_vision(args: argparse.Namespace) -> int:
    from symerge.suites.vision import VisionSuiteConfig, run_vision_suite

    return run_bench(args, "vision", VisionSuiteConfig, run_vision_suite, {"bn_reestimate": args.bn_reestimate})


def cmd_bench_dense(args: argparse.Namespace) -> int:
    from symerge.suites.dense import DenseSuiteConfig, run_dense_suite

    return run_bench(args, "dense", DenseSuiteConfig, run_dense_suite, {})


def parse_seeds(value: str) -> list[int]:
    """argparse type: comma-separated integer seeds ("0,1,2")."""
    try:
        seeds = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of integers") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def parse_study_options(values: list[str] | None) -> dict[str, Any]:
    """`--option NAME=VALUE` pairs, each value read as YAML ("head_epochs=5", "lambdas=[0.1, 0.3]")."""
    import yaml

    from symerge.errors import ValidationError

    options: dict[str, Any] = {}
    for value in values or []:
        name, sep, raw = value.partition("=")
        if not sep or not name.strip():
            raise ValidationError(f"--option: '{value}' is not NAME=VALUE")
        try:
            options[name.strip()] = number_or(yaml.safe_load(raw))
        except yaml.YAMLError:
            raise ValidationError(f"--option {name.strip()}: '{raw}' is not a valid YAML value") from None
    return options


EXPONENT_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)[eE][-+]?\d+")


def number_or(value: Any) -> Any:
    """YAML 1.1 reads '1e-4' (no decimal point) as a string: read such strings as the numbers they spell, inside
    lists and mappings too ("lrs=[1e-4, 1e-3]")."""
    if isinstance(value, str):
        return float(value) if EXPONENT_NUMBER.fullmatch(value.strip()) else value
    if isinstance(value, list):
        return [number_or(v) for v in value]
    if isinstance(value, dict):
        return {k: number_or(v) for k, v in value.items()}
    return value


def print_study_list() -> None:
    from symerge.studies.base import STUDIES

    width = max(len(name) for name in STUDIES)
    for spec in STUDIES.values():
        print(f"{spec.name:<{width}}  {spec.reproduces}\n{'':<{width}}  {spec.summary}")
        if spec.options:
            print(f"{'':<{width}}  options (--option NAME=VALUE): {', '.join(spec.options)}")


def cmd_study(args: argparse.Namespace) -> int:
    """`symerge study NAME --suite S`: options -> config -> run the study per seed -> headline on stdout."""
    import torch

    import symerge.studies  # noqa: F401  (registers the built-in studies)
    from symerge.atomic import prepare_output_dir
    from symerge.errors import ValidationError
    from symerge.studies.base import get_study
    from symerge.studies.runner import SYMERGE_AS, STUDY_FILES, check_seeds, check_study_options, run_study, suite_parts

    if args.list:
        print_study_list()
        return 0
    if not args.name:
        raise ValidationError("give a study name (`symerge study --list` shows them)")
    spec = get_study(args.name)
    if args.symerge_as not in SYMERGE_AS:
        raise ValidationError(f"--symerge-as must be one of {', '.join(SYMERGE_AS)}, got '{args.symerge_as}'")
    config_cls, _build, _count = suite_parts(args.suite)
    seeds = check_seeds(args.seeds)
    study_options = parse_study_options(args.option)
    check_study_options(spec, study_options)  # before any work (run_study checks again)
    overrides: dict[str, Any] = {"seed": seeds[0], "device": args.device}
    if args.tasks:
        overrides["tasks"] = parse_methods(args.tasks)
    cfg = suite_config(config_cls, "quick" if args.quick else None, overrides)
    out = Path(args.out or f"runs/study-{spec.name}-{args.suite}-{time.strftime('%Y%m%d-%H%M%S')}")
    prepare_output_dir(out, args.overwrite, STUDY_FILES)  # before any work (run_study checks again)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = run_study(spec.name, args.suite, cfg, out, seeds, progress=not args.no_progress,
                       overwrite=args.overwrite, steps=args.steps, study_options=study_options,
                       symerge_as=args.symerge_as)
    print()
    for name, value in record["headline"].items():
        shown = f"{value['mean']:.4f} ± {value['std']:.4f}" if isinstance(value, dict) else f"{value:.4f}"
        print(f"{name:>48s}: {shown}")
    print(f"\nstudy: {out / 'study.md'}  ({record['seconds']:.0f} s)")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from symerge.suites.seeds import summarize_folder, summary_markdown

    summary = summarize_folder(Path(args.folder))
    print(summary_markdown(summary))
    return 0


def cmd_methods(_: argparse.Namespace) -> int:
    from symerge.adaptive import adaptive_methods
    from symerge.merging import available_methods

    print("static:  ", ", ".join(available_methods()))
    print("adaptive:", ", ".join(adaptive_methods()))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from symerge.adaptive.distributed import is_main_process
    from symerge.pipeline import run_merge

    main_process = is_main_process()  # under torchrun, rank 0 reports and writes
    result, out = run_merge(args.config, overwrite=True if args.overwrite else None,
                            progress=not args.no_progress and main_process, log=print if main_process else None)
    if not main_process:
        return 0
    print(f"merged {len(result.tasks)} tasks ({', '.join(result.tasks)}) with '{result.method}'")
    print(f"output: {Path(out).resolve()}  (load it with symerge.load; see {Path(out) / 'symerge.json'})")
    return 0


def add_bench_parser(suites: Any, name: str, help_text: str, default_tasks: str, quick_help: str,
                     func: Any) -> argparse.ArgumentParser:
    """`symerge bench <name>` with the options every suite shares."""
    parser = suites.add_parser(name, help=help_text)
    parser.add_argument("--out", help=f"output dir (default runs/{name}-<timestamp>)")
    parser.add_argument("--protocol", choices=["held-out", "transductive"], default="held-out")
    parser.add_argument("--methods", help="comma-separated method names, or 'all' (default: the suite's list)")
    parser.add_argument("--tasks", help=f"comma-separated task names (default: {default_tasks})")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--preset", help="a named configuration of the suite (quick; text also demo: the main rows "
                                         "only, 50 adaptation iterations, as `make demo` runs)")
    seeding = parser.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=0)
    seeding.add_argument("--seeds", type=parse_seeds, default=None,
                         help="comma-separated seeds, e.g. 0,1,2: one report per seed in seed-N/ plus summary.md with "
                              "each method's mean ± std")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="adaptation iterations of every adaptive row (default: the suite's; its curve's marks "
                             "below it are scored too)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (checked before any download)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast dtype of adaptation (fp16: GPU only, with a GradScaler)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--expert-workers", type=positive_int, default=1,
                        help="experts fine-tuned at once, each in its own 1-thread CPU process (default 1: one after "
                        "another in this process)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=func)
    return parser


def add_study_parser(sub: Any) -> argparse.ArgumentParser:
    """`symerge study NAME --suite S` (and `symerge study --list`)."""
    parser = sub.add_parser("study", help="reproduce one of the paper's studies on a suite (--list shows them)")
    parser.add_argument("name", nargs="?", help="study name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the studies and what each reproduces")
    parser.add_argument("--suite", default="text", help="text, vision or dense (default: text)")
    parser.add_argument("--tasks", help="comma-separated task names (default: the suite's)")
    parser.add_argument("--seeds", type=parse_seeds, default=[0],
                        help="comma-separated seeds, e.g. 0,1,2 (several: one folder per seed plus mean ± std)")
    parser.add_argument("--quick", action="store_true", help="the suite's quick preset (small sizes, short training)")
    parser.add_argument("--steps", type=positive_int, default=None, help="adaptation steps of every variant "
                        "(default: the suite's)")
    parser.add_argument("--option", action="append", metavar="NAME=VALUE",
                        help="a study option (repeatable; --list shows each study's), value read as YAML")
    parser.add_argument("--symerge-as", default="paper", metavar="{paper,suite}",
                        help="SyMerge as the paper's figures run it (paper: the classifier head; default) or as the "
                             "suite's main row (suite: its task layer, lr and loss)")
    parser.add_argument("--out", help="output dir (default runs/study-<name>-<suite>-<timestamp>)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (checked before any download)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing study output dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_study)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symerge", description="Multi-task model merging (SyMerge and baselines).")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run an offline benchmark suite")
    suites = bench.add_subparsers(dest="suite", required=True)
    add_bench_parser(suites, "text", "MiniLM-L6 on packaged text tasks (8 classification tasks by default)",
                     "the 8 defaults, text8; task sets: text8_v1, text14, text20, all",
                     "≤ 3-minute smoke run with small sizes",
                     cmd_bench_text)
    vision = add_bench_parser(suites, "vision", "ImageNet MobileNetV2 on 6 packaged image-classification tasks",
                              "the 6 defaults", "smoke run: 4 tasks, small sizes, short training", cmd_bench_vision)
    vision.add_argument("--bn-reestimate", action="store_true",
                        help="re-estimate BatchNorm statistics on the unlabeled adaptation inputs after every merge "
                             "(off by default: measured harmful, the experts were trained under the pretrained ones)")
    add_bench_parser(suites, "dense", "ImageNet MobileNetV2: segmentation, depth and normals on exact synthetic scenes",
                     "segmentation,depth,normals", "smoke run: few scenes, short training", cmd_bench_dense)
    add_study_parser(sub)
    merge = sub.add_parser("merge", help="merge your own checkpoints as described by a YAML config")
    merge.add_argument("config", help="config file (see README, 'Merging your own checkpoints')")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    merge.add_argument("--no-progress", action="store_true", help="no progress bars")
    merge.set_defaults(func=cmd_merge)
    from symerge.models.convert import register_convert_command

    register_convert_command(sub)
    from symerge.memory_plan import register_plan_command

    register_plan_command(sub)  # `symerge plan CONFIG`: memory estimate before loading anything
    methods = sub.add_parser("methods", help="list the registered merge methods")
    methods.set_defaults(func=cmd_methods)
    summarize = sub.add_parser("summarize", help="mean ± std over the seed-N/ bench reports in a folder (seeds run as "
                                                 "separate commands, e.g. side by side)")
    summarize.add_argument("folder", help="folder holding seed-N/report.json; summary.json / summary.md go there")
    summarize.set_defaults(func=cmd_summarize)
    return parser


def main(argv: list[str] | None = None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # log lines reach a redirected log (file, pipe) as they happen
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SymergeError as err:
        print(f"symerge: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
