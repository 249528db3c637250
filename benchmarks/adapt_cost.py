"""Cost of test-time adaptation: expert-output pass, per-step time, merge-build share, peak memory vs K.

Model: a randomly initialised BERT with MiniLM-L6's shape (6 layers, hidden 384, 22.7 M params) on random
token ids (length 48, batch 16 per task) — the shape of the text suite, without needing the packaged weights.
Each K runs in a fresh subprocess so peak RSS is per configuration. Figures, not asserts.

    python benchmarks/adapt_cost.py [--tasks 2,4,8] [--steps 5] [--threads 2] [--device cuda] [--precision bf16]

On CUDA the table adds the peak GPU memory (`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_run(trainer: Any, steps: int, device: str = "cpu") -> tuple[float, float]:
    """(seconds for `steps` iterations, seconds of them spent rebuilding θ = θ_pre + Σ λ τ)."""
    merged = trainer.method.merged
    build_times: list[float] = []
    original = merged.params

    def timed_params() -> Any:
        start = time.perf_counter()
        out = original()
        build_times.append(time.perf_counter() - start)
        return out

    merged.params = timed_params
    synchronize(device)
    start = time.perf_counter()
    trainer.run(stop_after=steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    merged.params = original
    return seconds, sum(build_times)


def measure(num_tasks: int, steps: int, threads: int, method: str, device: str = "cpu",
            precision: str = "fp32") -> dict[str, float]:
    import resource

    import torch
    from transformers import BertConfig, BertModel

    from symerge.adaptive import TrainerConfig, build_trainer
    from symerge.models.text import MeanPooledEncoder
    from symerge.taskvectors import TaskVectors

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    encoder = MeanPooledEncoder(BertModel(config, add_pooling_layer=False)).eval()
    base = encoder.state_dict()
    keys = [k for k, _ in encoder.named_parameters() if "word_embeddings" not in k]
    experts = {f"t{k}": {n: base[n] + 0.01 * torch.randn_like(base[n]) for n in keys} for k in range(num_tasks)}
    tv = TaskVectors.from_state_dicts(base, experts, keys=keys)
    heads = {t: torch.nn.Linear(384, 4) for t in experts}
    n, length = 256, 48
    inputs = {t: {"input_ids": torch.randint(1000, 30000, (n, length)), "attention_mask": torch.ones(n, length, dtype=torch.long)}
              for t in experts}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = build_trainer(method, encoder, heads, tv, inputs,
                            config=TrainerConfig(regime="nlp", steps=steps + 1, batch_size=16, progress=False, lr=1e-2,
                                                 layer_lr=1e-2, device=device, precision=precision))
    expert_seconds = trainer.cache.seconds
    trainer.run(stop_after=1)  # warm-up iteration
    seconds, build_seconds = timed_run(trainer, steps, device)
    return {
        "K": num_tasks, "expert_pass_s": expert_seconds, "expert_runs_per_sample": max(trainer.cache.runs_per_sample().values()),
        "iteration_s": seconds / steps, "task_step_s": seconds / (steps * num_tasks),
        "merge_build_share": build_seconds / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss0, "task_vector_mb": sum(v.numel() * v.element_size() for v in tv.vectors.values()) / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="2,4,8")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="symerge")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.threads, args.method, args.device, args.precision)))
        return
    rows = []
    for k in [int(x) for x in args.tasks.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--child", str(k), "--steps", str(args.steps), "--threads",
                              str(args.threads), "--method", args.method, "--device", args.device,
                              "--precision", args.precision], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.method}, MiniLM-shaped BERT (22.7 M params, τ over 11 M non-embedding params), batch 16/task, "
          f"len 48, {args.threads} thread(s), {args.steps} timed iterations, {args.device} {args.precision}")
    print("| K | expert pass (s) | expert runs / sample | s / iteration | s / task step | merge-build share | τ storage (MB) "
          "| peak RSS (MB) | peak GPU (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['expert_pass_s']:.1f} | {r['expert_runs_per_sample']:.2f} | {r['iteration_s']:.2f} | "
              f"{r['task_step_s']:.3f} | {100 * r['merge_build_share']:.1f}% | {r['task_vector_mb']:.0f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_gpu_mb']:.0f} |")


if __name__ == "__main__":
    main()
