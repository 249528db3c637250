"""`symerge plan` against the measured peak RSS of `symerge merge`, on a MiniLM-shaped random BERT pool.

The pool (written once to --workdir): a random BERT with MiniLM-L6's shape (6 layers, hidden 384, vocab 30,522,
22.7 M params, as in benchmarks/adapt_cost.py) saved as the pretrained model and as K sequence classifiers, a
30,522-token vocabulary, and per task an unlabeled CSV of texts long enough to fill data.max_len. Each config runs
`run_merge` in a fresh subprocess and reports `resource.getrusage` peak RSS; the plan is computed in another
process from the config alone (config.json files and data row counts: no weights).

    python benchmarks/memory_plan_check.py [--tasks 2,8] [--samples 128] [--steps 3] [--storage float32,bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 384, 6, 12, 1536, 30522


def build_pool(root: Path, num_tasks: int, samples: int, hidden: int, layers: int, vocab: int) -> None:
    """Random pretrained model + experts + data under `root` (skipped when already there)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    marker = root / f"pool-{num_tasks}-{samples}-{hidden}-{layers}-{vocab}.done"
    if marker.exists():
        return
    root.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(vocab - 5)]
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    tokenizer = BertTokenizerFast(str(root / "vocab.txt"))
    heads = HEADS if hidden % HEADS == 0 else 4
    size = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden)
    torch.manual_seed(0)
    BertModel(BertConfig(**size)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    rng = random.Random(0)
    for k in range(num_tasks):
        BertForSequenceClassification(BertConfig(**size, num_labels=2 + k % 3)).save_pretrained(root / f"t{k}")
        rows = ["text"] + [" ".join(rng.choice(words) for _ in range(80)) for _ in range(samples)]
        (root / f"t{k}.csv").write_text("\n".join(rows) + "\n")
    marker.write_text("ok")


def write_config(root: Path, num_tasks: int, steps: int, storage: str, max_len: int) -> Path:
    import yaml

    config = {
        "model": {"family": "hf_text", "pretrained": "base", "experts": {f"t{k}": f"t{k}" for k in range(num_tasks)}},
        "method": {"name": "symerge", "options": {"task_layer": "head"}, "storage_dtype": storage,
                   "trainer": {"steps": steps, "batch_size": 16}},
        "data": {"adapt": {f"t{k}": f"t{k}.csv" for k in range(num_tasks)}, "max_len": max_len},
        "output_dir": f"out-{num_tasks}-{storage}", "overwrite": True,
    }
    path = root / f"config-{num_tasks}-{storage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child_plan(config: Path) -> dict[str, float]:
    from symerge.config import load_config
    from symerge.memory_plan import MiB, plan_config

    plan, _, _ = plan_config(load_config(config, overwrite=True))
    return {"plan_mb": plan.peak / MiB, "tau_mb": next(v for k, v in plan.resident.items() if k.startswith("τ")) / MiB}


def child_measure(config: Path, threads: int) -> dict[str, float]:
    import resource

    import torch

    from symerge.pipeline import run_merge

    torch.set_num_threads(threads)
    run_merge(config, overwrite=True, progress=False)
    return {"measured_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(*args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="2,8")
    parser.add_argument("--samples", type=int, default=128, help="adaptation texts per task")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=48)
    parser.add_argument("--storage", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the pool is written (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64, 1,000-token model (smoke test)")
    parser.add_argument("--child", choices=["plan", "measure"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "plan":
        print(json.dumps(child_plan(Path(args.config))))
        return
    if args.child == "measure":
        print(json.dumps(child_measure(Path(args.config), args.threads)))
        return
    tasks = [int(x) for x in args.tasks.split(",")]
    hidden, layers, vocab = (64, 2, 1000) if args.tiny else (HIDDEN, LAYERS, VOCAB)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        build_pool(root, max(tasks), args.samples, hidden, layers, vocab)
        rows = []
        for k in tasks:
            for storage in args.storage.split(","):
                config = write_config(root, k, args.steps, storage, args.max_len)
                row = {"K": k, "storage": storage, **run_child("--child", "plan", "--config", str(config)),
                       **run_child("--child", "measure", "--config", str(config), "--threads", str(args.threads))}
                rows.append(row)
    print(f"symerge merge (symerge, task_layer head), {'tiny' if args.tiny else 'MiniLM-shaped'} random BERT "
          f"(hidden {hidden}, {layers} layers, vocab {vocab}), {args.samples} texts/task at max_len {args.max_len}, "
          f"batch 16, {args.steps} steps, {args.threads} thread(s)")
    print("| K | τ storage | τ (MB, plan) | plan peak (MB) | measured peak RSS (MB) | plan / measured |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['K']} | {r['storage']} | {r['tau_mb']:.0f} | {r['plan_mb']:.0f} | {r['measured_mb']:.0f} | "
              f"{r['plan_mb'] / r['measured_mb']:.2f} |")


if __name__ == "__main__":
    main()
