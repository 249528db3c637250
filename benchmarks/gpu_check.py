"""GPU check: the adaptive and evaluation paths on CUDA, against the CPU, in one table (≤ 8 minutes on one GPU).

    python benchmarks/gpu_check.py [--device cuda:0] [--skip-bench] [--timeout 300]

(a) the tiny-model adaptive scenarios of the test suite (SyMerge hard / soft / L1 / block layer, AdaMerging,
    Surgery) on CUDA in fp32, bf16 and fp16, compared with the CPU fp32 run: max |Δλ| and the share of test inputs
    whose predicted class agrees;
(b) `symerge bench text --quick --device CUDA` end to end (needs the packaged MiniLM and text data in
    $SYMERGE_CACHE or reachable package registries; otherwise the same suite on a tiny random BERT and synthetic
    text runs instead, and the row says so);
(c) `benchmarks/adapt_cost.py` on CUDA (MiniLM-shaped BERT, K = 2, 4, 8) in fp32 and bf16.
Every row: seconds per iteration, peak GPU memory (`torch.cuda.max_memory_allocated`), agreement with the CPU.
Without CUDA it says so and exits 0. Exit 1 when a check fails (an error, or agreement below its bound).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "symerge hard labels": ("symerge", {}),
    "symerge soft labels": ("symerge", {"labels": "soft"}),
    "symerge L1 (regression task)": ("symerge", {"task_kinds": {"task2": "regression"}}),
    "symerge block task layer": ("symerge", {"task_layer": "block:layer2."}),
    "adamerging": ("adamerging", {}),
    "surgery": ("surgery", {"rank": 4}),
}
# Agreement bounds vs the CPU fp32 run (20 iterations at lr 1e-2 on the toy problem).
MAX_LAMBDA_DIFF = {"fp32": 1e-3, "bf16": 0.05, "fp16": 0.05}
MIN_AGREEMENT = {"fp32": 0.99, "bf16": 0.95, "fp16": 0.95}


@dataclass
class Row:
    check: str
    setting: str
    seconds_per_iteration: float = float("nan")
    peak_gpu_mb: float = float("nan")
    lambda_diff: float = float("nan")
    agreement: float = float("nan")
    status: str = "ok"


def load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_gpu(device: str, body: Callable[[], Row]) -> Row:
    """Run `body` with the peak-memory counter reset; a crash becomes a FAILED row."""
    import torch

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    row = body()
    torch.cuda.synchronize(device)
    row.peak_gpu_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def scenario_rows(device: str) -> list[Row]:
    """(a) every adaptive scenario on CUDA at each precision vs the CPU fp32 run."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from toy import build_toy_problem

    from symerge.adaptive import TrainerConfig, adapt

    problem = build_toy_problem()
    tv = problem.task_vectors()
    settings = dict(steps=20, batch_size=32, progress=False, lr=1e-2, layer_lr=1e-2)
    rows = []
    for name, (method, options) in SCENARIOS.items():
        cpu = adapt(method, problem.encoder, problem.heads, tv, problem.adapt_inputs, config=TrainerConfig(**settings),
                    **options)
        for precision in ("fp32", "bf16", "fp16"):
            def body() -> Row:
                start = time.perf_counter()
                result = adapt(method, problem.encoder, problem.heads, tv, problem.adapt_inputs,
                               config=TrainerConfig(**settings, device=device, precision=precision), **options)
                torch.cuda.synchronize(device)
                seconds = (time.perf_counter() - start) / settings["steps"]
                agree = []
                for task in tv.tasks:
                    x = problem.test_inputs[task]
                    agree.append((result.predict(task, x, device=device).argmax(1) == cpu.predict(task, x).argmax(1))
                                 .float().mean().item())
                diff = float((result.lambdas - cpu.lambdas).abs().max())
                row = Row(f"(a) {name}", f"{device} {precision}", seconds, lambda_diff=diff, agreement=min(agree))
                if diff > MAX_LAMBDA_DIFF[precision] or row.agreement < MIN_AGREEMENT[precision]:
                    row.status = f"FAILED: beyond bounds (|Δλ| ≤ {MAX_LAMBDA_DIFF[precision]}, agreement ≥ {MIN_AGREEMENT[precision]})"
                return row

            rows.append(guarded(f"(a) {name}", f"{device} {precision}", lambda: on_gpu(device, body)))
    return rows


def guarded(check: str, setting: str, run: Callable[[], Row]) -> Row:
    try:
        return run()
    except Exception as err:  # a crash is a result here: report it and go on
        traceback.print_exc()
        return Row(check, setting, status=f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:120]}")


def bench_row(device: str, timeout: int) -> Row:
    """(b) the quick text suite end to end on CUDA (packaged MiniLM), or the tiny offline suite when it is absent."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "symerge.cli", "bench", "text", "--quick", "--device", device,
                   "--out", str(Path(tmp) / "run"), "--no-progress", "--threads", "4"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Row("(b) bench text --quick", device, status=f"FAILED: over {timeout} s")
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
            return Row("(b) bench text --quick", f"{device} fp32 (wall {seconds:.0f} s)",
                       status="ok: " + (proc.stdout.strip().splitlines() or [""])[-1][:80])
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
    print(f"bench text --quick did not run ({tail}); running the tiny offline suite instead", flush=True)
    return guarded("(b) text suite, tiny BERT (assets offline)", device, lambda: tiny_suite_row(device))


def tiny_suite_row(device: str) -> Row:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_text_suite import synthetic_task, tiny_bert_dir

    from symerge.suites.runner import AdaptSettings
    from symerge.suites.text import TextSuiteConfig, run_text_suite

    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["SYMERGE_CACHE"] = str(Path(tmp) / "cache")
        model_dir = tiny_bert_dir(Path(tmp) / "tiny-bert")
        tasks = [synthetic_task("alpha", 3, 1), synthetic_task("beta", 2, 2), synthetic_task("gamma", 4, 3)]
        reports = {}
        start = time.perf_counter()
        for where in (device, "cpu"):
            cfg = TextSuiteConfig(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12, device=where,
                                  expert={"steps": 30, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2},
                                  freeze_word_embeddings=False, adapt=AdaptSettings(steps=6, batch_size=8, curve=[3, 6]),
                                  cross_task_samples=20)
            reports[where] = run_text_suite(cfg, Path(tmp) / where, model_dir=model_dir, tasks=tasks, progress=False,
                                            log=lambda _: None)
        seconds = time.perf_counter() - start
        gaps = [abs(reports[device]["methods"][m]["normalized_average"] - reports["cpu"]["methods"][m]["normalized_average"])
                for m in reports["cpu"]["methods"]]
    row = Row("(b) text suite, tiny BERT (assets offline)", f"{device} fp32 (wall {seconds:.0f} s)",
              agreement=1.0 - max(gaps))
    if max(gaps) > 0.05:
        row.status = f"FAILED: normalized accuracy differs from the CPU run by {max(gaps):.3f}"
    return row


def adapt_cost_rows(device: str) -> list[Row]:
    """(c) adapt_cost's measurement on CUDA, one row per K and precision."""
    adapt_cost = load_module(ROOT / "benchmarks" / "adapt_cost.py", "adapt_cost")
    rows = []
    for precision in ("fp32", "bf16"):
        for k in (2, 4, 8):
            def body() -> Row:
                figures = adapt_cost.measure(k, 5, 4, "symerge", device, precision)
                return Row(f"(c) adapt_cost K={k}", f"{device} {precision}", figures["iteration_s"])

            rows.append(guarded(f"(c) adapt_cost K={k}", f"{device} {precision}", lambda: on_gpu(device, body)))
    return rows


def print_table(rows: list[Row]) -> None:
    print("| check | device / precision | s / iteration | peak GPU (MB) | max abs Δλ vs CPU | agreement vs CPU | status |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.check} | {r.setting} | {r.seconds_per_iteration:.4f} | {r.peak_gpu_mb:.0f} | {r.lambda_diff:.2e} | "
              f"{r.agreement:.3f} | {r.status} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-bench", action="store_true", help="skip (b), the end-to-end suite run")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed for (b)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}); nothing to check. Run it on a GPU machine.")
        return 0
    print(f"gpu_check on {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    rows = scenario_rows(args.device)
    if not args.skip_bench:
        rows.append(bench_row(args.device, args.timeout))
    rows += adapt_cost_rows(args.device)
    print()
    print_table(rows)
    failed = [r for r in rows if r.status.startswith("FAILED")]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
