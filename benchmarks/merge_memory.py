"""Peak memory (max RSS) of a static `symerge merge` (the CLI path, `pipeline.run_merge`) next to `merging.merge()`.

Pool: a randomly initialised BERT classifier with MiniLM-L6's shape (6 layers, hidden 384, vocab 30522: 22.7 M
params, 91 MB in float32) as the pretrained model and K experts (pretrained + small noise, 2 labels each), written
with `save_pretrained` into a temp dir. Each measurement runs in a fresh Python process, which reports its own
peak RSS (`VmHWM`); the baseline row is the same process after importing torch + transformers + symerge only.

    python benchmarks/merge_memory.py                 # K = 8, task_arithmetic and ties
    python benchmarks/merge_memory.py --src /tmp/before/src   # the same against another checkout's sources

Prints a Markdown table: peak RSS, and the increase over the baseline in units of one model (91 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch, transformers  # noqa: F401
kind, root, method = sys.argv[1], sys.argv[2], sys.argv[3]
import symerge  # noqa: F401
sys.stderr.write(symerge.__file__ + "\n")
start = time.perf_counter()
if kind == "cli":
    from symerge.pipeline import run_merge
    cfg = json.loads(open(f"{root}/config.json").read())
    cfg["method"] = {"name": method}
    cfg["output_dir"] = f"{root}/out-{method}"
    run_merge(cfg, overwrite=True, progress=False)
elif kind == "merge":
    from safetensors.torch import load_file
    from symerge.merging import merge
    cfg = json.loads(open(f"{root}/config.json").read())
    strip = lambda sd: {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}
    pre = strip(load_file(cfg["model"]["pretrained"] + "/model.safetensors"))
    experts = {t: strip(load_file(p + "/model.safetensors")) for t, p in cfg["model"]["experts"].items()}
    merge(method, pre, experts)
seconds = time.perf_counter() - start
# VmHWM: this process's own peak. ru_maxrss survives exec on Linux, so it would report the parent's RSS at the
# fork (the parent held the pool it just built) whenever this process peaks lower.
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) / 1024 if "VmHWM" in status else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"maxrss_mb": peak, "seconds": seconds}))
"""


def build_pool(root: Path, num_tasks: int) -> dict:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    pre = BertForSequenceClassification(config).eval()
    pre.save_pretrained(root / "pre")
    experts = {}
    for k in range(num_tasks):
        with torch.no_grad():
            expert = BertForSequenceClassification(config).eval()
            expert.load_state_dict(pre.state_dict())
            for p in expert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        expert.save_pretrained(root / f"task{k}")
        experts[f"task{k}"] = str(root / f"task{k}")
        del expert
    params = sum(p.numel() for p in pre.bert.parameters())
    cfg = {"model": {"family": "hf_text", "pretrained": str(root / "pre"), "experts": experts},
           "method": {"name": "task_arithmetic"}, "output_dir": str(root / "out")}
    (root / "config.json").write_text(json.dumps(cfg))
    return {"params": params}


def run_child(kind: str, root: Path, method: str, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "4")
    proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(root), method], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--methods", default="task_arithmetic,ties")
    parser.add_argument("--src", default=None, help="prepend this source dir to PYTHONPATH (another checkout)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        info = build_pool(root, args.tasks)
        model_mb = info["params"] * 4 / 2**20
        rows = [("baseline (imports only)", "-", run_child("none", root, "-", args.src))]
        for method in args.methods.split(","):
            rows.append(("symerge merge (run_merge)", method, run_child("cli", root, method, args.src)))
            rows.append(("merging.merge() on loaded state dicts", method, run_child("merge", root, method, args.src)))
    base = rows[0][2]["maxrss_mb"]
    print(f"K = {args.tasks}, encoder {info['params'] / 1e6:.1f} M params = {model_mb:.0f} MB float32; "
          f"src = {args.src or 'installed'}; load average {os.getloadavg()[0]:.2f}")
    print("| path | method | peak RSS (MB) | over baseline (MB) | over baseline (models) | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for path, method, row in rows:
        extra = row["maxrss_mb"] - base
        print(f"| {path} | {method} | {row['maxrss_mb']:.0f} | {extra:.0f} | {extra / model_mb:.1f} | "
              f"{row['seconds']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps([{"path": p, "method": m, **r} for p, m, r in rows], indent=2))


if __name__ == "__main__":
    main()
