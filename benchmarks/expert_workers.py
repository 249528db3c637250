"""Fine-tuning experts on CPU: one process (1 or 2 torch threads) against 2 worker processes of 1 thread each.

Fine-tunes the same experts of the text suite (packaged MiniLM-L6, the first `--tasks` of text8, the suite's
recipe at `--steps` steps) three ways, each into a fresh empty cache, and prints the wall seconds and the speed-up
against one 2-thread process, measured in one run. Figures, not asserts; run it on an otherwise idle machine.

    python benchmarks/expert_workers.py [--tasks 4] [--steps 40] [--skip-one-thread]
                                        [--out docs/benchmarks/expert_workers.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {  # name: (expert workers, torch threads of the main process)
    "1 process, 1 thread": (1, 1),
    "1 process, 2 threads": (1, 2),
    "2 worker processes, 1 thread each": (2, 1),
}


def fine_tune(tasks: int, steps: int, workers: int, threads: int) -> float:
    """Seconds to build the text benchmark (tokenize + fine-tune every expert) from an empty cache."""
    import torch

    from symerge.data.text_tasks import DEFAULT_TASKS
    from symerge.suites.text import TextSuiteConfig, text_benchmark

    torch.set_num_threads(threads)
    cfg = TextSuiteConfig(tasks=list(DEFAULT_TASKS[:tasks]), expert_workers=workers,
                          expert={**TextSuiteConfig().expert, "steps": steps})
    start = time.perf_counter()
    text_benchmark(cfg, progress=False, log=lambda _: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=None, help="append the figures as one JSON line to this file")
    parser.add_argument("--skip-one-thread", action="store_true", help="leave out the 1-process, 1-thread way")
    parser.add_argument("--one", nargs=2, type=int, metavar=("WORKERS", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one way, in a fresh process, into the SYMERGE_CACHE it was given
        print(json.dumps({"seconds": fine_tune(args.tasks, args.steps, *args.one)}))
        return
    from symerge.data.fetch import cache_root

    model_cache = cache_root() / "pypi"  # the packaged model is read from the user's cache, not downloaded again
    seconds = {}
    ways = {n: w for n, w in WAYS.items() if not (args.skip_one_thread and n == "1 process, 1 thread")}
    for name, (workers, threads) in ways.items():
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SYMERGE_CACHE": cache, "OMP_NUM_THREADS": str(threads)}
            if model_cache.is_dir():
                os.symlink(model_cache, Path(cache) / "pypi")
            out = subprocess.run([sys.executable, __file__, "--tasks", str(args.tasks), "--steps", str(args.steps),
                                  "--one", str(workers), str(threads)], env=env, check=True, capture_output=True,
                                 text=True).stdout
            seconds[name] = json.loads(out.strip().splitlines()[-1])["seconds"]
        print(f"{name:>36s}: {seconds[name]:7.1f} s")
    reference = seconds["1 process, 2 threads"]
    for name, value in seconds.items():
        print(f"{name:>36s}: {reference / value:.2f}× the speed of 1 process with 2 threads")
    record = {"date": time.strftime("%Y-%m-%d"), "tasks": args.tasks, "steps": args.steps, "cpus": os.cpu_count(),
              "seconds": seconds}
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
