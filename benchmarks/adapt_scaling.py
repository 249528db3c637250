"""How SyMerge adaptation cost grows with K, and how far a task step is from the compute lower bound.

Model: a random BERT with MiniLM-L6's shape (6 layers, hidden 384, 22.7 M params; τ over the 11 M non-embedding
params, as in benchmarks/adapt_cost.py) on random token ids (length 48), batch 16 per task, one thread per
process, each configuration in a fresh subprocess (so peak RSS is per configuration). Per K it reports seconds per
iteration (every task once), seconds per task step (forward + backward + sequential Adam step), peak RSS, τ storage,
and — measured in the same process on the same batches — the compute lower bound: forward + backward of the plain
model (θ materialised once, no merge; encoder weights requiring grad, so the backward is as deep as SyMerge's)
with the same trainable head and loss. "merge build" is the share of the SyMerge step spent rebuilding
θ = θ_pre + Σ λ τ. Figures, not asserts.

    python benchmarks/adapt_scaling.py [--tasks 2,4,8,16,20] [--steps 3] [--storage float32] [--processes 1]

`--processes 1,2` (1 vs 2 processes under torchrun at K = 8): each extra count runs
the child under `python -m torch.distributed.run --nproc_per_node N` at the K of `--distributed-tasks` and reports
rank 0's timing. It measures a speed-up only once the trainer shards batches across ranks (symerge.adaptive
.distributed); the child says which mode it ran in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def build(num_tasks: int, storage: str, samples: int, length: int, hidden: int, layers: int, vocab: int):
    """Encoder, heads, τ and inputs of the random pool (seeded)."""
    import torch
    from transformers import BertConfig, BertModel

    from symerge.models.text import MeanPooledEncoder
    from symerge.taskvectors import TaskVectors

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=12 if hidden % 12 == 0 else 4, intermediate_size=4 * hidden,
                        max_position_embeddings=512)
    encoder = MeanPooledEncoder(BertModel(config, add_pooling_layer=False)).eval()
    base = encoder.state_dict()
    keys = [k for k, _ in encoder.named_parameters() if "word_embeddings" not in k]
    experts = {f"t{k}": {n: base[n] + 0.01 * torch.randn_like(base[n]) for n in keys} for k in range(num_tasks)}
    tv = TaskVectors.from_state_dicts(base, experts, keys=keys, dtype=storage)
    del experts
    heads = {t: torch.nn.Linear(hidden, 4) for t in tv.tasks}
    low = min(1000, vocab // 2)
    inputs = {t: {"input_ids": torch.randint(low, vocab, (samples, length)),
                  "attention_mask": torch.ones(samples, length, dtype=torch.long)} for t in tv.tasks}
    return encoder, heads, tv, inputs


def lower_bound_step(trainer, task: str, plain: dict, batch: dict, target) -> None:
    """Forward + backward of the plain model (no merge) with the task's trainable head, the same loss shape."""
    import torch.nn.functional as F

    from symerge.adaptive.inputs import call_module

    method = trainer.method
    features = call_module(method.merged.encoder, batch, plain)
    logits = method.head(task)(features)
    F.cross_entropy(logits, target.argmax(-1)).backward()


def measure(num_tasks: int, steps: int, storage: str, samples: int, length: int, tiny: bool,
            profile: bool = False) -> dict[str, float]:
    import resource

    import torch

    from adapt_cost import timed_run  # benchmarks/ is on sys.path when run as a script
    from symerge.adaptive import TrainerConfig, build_trainer
    from symerge.adaptive.inputs import take

    torch.set_num_threads(1)
    hidden, layers, vocab = (48, 2, 2000) if tiny else (384, 6, 30522)
    encoder, heads, tv, inputs = build(num_tasks, storage, samples, length, hidden, layers, vocab)
    world = distributed_world()
    trainer = build_trainer("symerge", encoder, heads, tv, inputs,
                            config=TrainerConfig(regime="nlp", steps=steps + 1 + int(profile), batch_size=16, progress=False,
                                                 lr=1e-2, layer_lr=1e-2))
    trainer.run(stop_after=1)  # warm-up iteration (allocator, kernels)
    merged = trainer.method.merged
    seconds, build_seconds = timed_run(trainer, steps)
    if profile:  # where a SyMerge iteration's time goes (one more iteration, by operator)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.run(stop_after=1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)

    # compute lower bound, same process, same batches: θ materialised once, plain weights requiring grad
    with torch.no_grad():
        theta = merged.params()
    plain = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    batches = []
    for step in range(1, steps + 1):
        for k, task in enumerate(trainer.method.tasks):
            index = trainer.samplers[k].batch(step)
            batches.append((task, take(inputs[task], index, "cpu"), trainer.cache.batch("outputs", task, index, "cpu")))
    first_task, first_batch, first_target = batches[0]
    lower_bound_step(trainer, first_task, plain, first_batch, first_target)  # warm-up
    start = time.perf_counter()
    for task, batch, target in batches:
        lower_bound_step(trainer, task, plain, batch, target)
        for p in plain.values():
            p.grad = None
        trainer.method.head(task).zero_grad(set_to_none=True)
    lower = (time.perf_counter() - start) / len(batches)
    task_step = seconds / (steps * num_tasks)
    return {
        "K": num_tasks, "storage": storage, "iteration_s": seconds / steps, "task_step_s": task_step,
        "lower_bound_s": lower, "ratio": task_step / lower, "merge_build_share": build_seconds / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tau_mb": sum(v.numel() * v.element_size() for v in tv.vectors.values()) / 2**20,
        "processes": world[1], "mode": world[2],
    }


def distributed_world() -> tuple[int, int, str]:
    """(rank, size, mode): joins the process group when launched by torchrun."""
    from symerge.adaptive.distributed import ensure_process_group

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, "single process"
    world = ensure_process_group("cpu")
    return world.rank, world.size, "torchrun (gloo)"


def run_child(args: argparse.Namespace, num_tasks: int, processes: int) -> dict[str, float]:
    child = ["--child", str(num_tasks), "--steps", str(args.steps), "--storage", args.storage,
             "--samples", str(args.samples), "--length", str(args.length)] + (["--tiny"] if args.tiny else []) + (
             ["--profile", str(num_tasks)] if args.profile == num_tasks and processes == 1 else [])
    if processes == 1:
        command = [sys.executable, __file__, *child]
    else:  # N ranks under torchrun, rank 0 prints its figures
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, *child]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"K={num_tasks}, {processes} process(es) failed:\n{out.stderr[-3000:]}")
    if args.profile == num_tasks and processes == 1:
        print(f"profile of one SyMerge iteration at K={num_tasks} (self CPU time):\n{out.stderr.strip()}\n")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="2,4,8,16,20")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--storage", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--samples", type=int, default=64, help="adaptation inputs per task")
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--processes", default="1", help="e.g. 1,2: torchrun ranks at --distributed-tasks")
    parser.add_argument("--distributed-tasks", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="2-layer hidden-48 model (smoke test)")
    parser.add_argument("--profile", type=int, default=0, help="print a torch.profiler table for this K")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.steps, args.storage, args.samples, args.length, args.tiny,
                         bool(args.profile))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    rows = [run_child(args, int(k), 1) for k in args.tasks.split(",")]
    counts = [int(p) for p in args.processes.split(",")]
    multi = [run_child(args, args.distributed_tasks, p) for p in counts if p > 1]
    print(f"symerge (task_layer head), {'tiny' if args.tiny else 'MiniLM-shaped'} random BERT, batch 16/task, "
          f"length {args.length}, 1 thread/process, {args.steps} timed iterations, τ {args.storage}")
    print("| K | s / iteration | s / task step | lower bound (s) | step / lower bound | merge-build share "
          "| peak RSS (MB) | τ storage (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['K']} | {r['iteration_s']:.2f} | {r['task_step_s']:.3f} | {r['lower_bound_s']:.3f} | "
              f"{r['ratio']:.2f}× | {100 * r['merge_build_share']:.1f}% | {r['peak_rss_mb']:.0f} | {r['tau_mb']:.0f} |")
    if rows:
        print(f"\ntask step at K={rows[-1]['K']} / K={rows[0]['K']}: {rows[-1]['task_step_s'] / rows[0]['task_step_s']:.2f}×")
    if multi:
        single = next((r for r in rows if r["K"] == args.distributed_tasks), None)
        print(f"\n| processes (K={args.distributed_tasks}) | mode | s / iteration | speed-up |")
        print("|---|---|---:|---:|")
        for r in multi:
            speed = f"{single['iteration_s'] / r['iteration_s']:.2f}×" if single else "n/a"
            print(f"| {r['processes']} | {r['mode']} | {r['iteration_s']:.2f} | {speed} |")


if __name__ == "__main__":
    main()
