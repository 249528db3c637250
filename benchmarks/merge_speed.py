"""Time and peak memory of every registered static merge method on a ViT-B/32-sized random pool.

    .venv/bin/python benchmarks/merge_speed.py                      # full size (≈88 M params × 8 tasks), 1 thread
    .venv/bin/python benchmarks/merge_speed.py --params-scale 0.05  # quick small run
    .venv/bin/python benchmarks/merge_speed.py --methods ties,dare --threads 2

The pool mimics the CLIP ViT-B/32 image encoder (patch-embedding conv, class / positional embeddings, 12 residual
blocks of 768-wide attention + 3072-wide MLP with LayerNorms, projection; plus an int64 `position_ids` buffer):
pretrained weights ~ N(0, 0.02²), experts = pretrained + task vectors ~ N(0, 0.001²), all float32.

Every measurement runs in a fresh subprocess that builds the same pool (fixed seed), returns freed heap memory to
the OS (`malloc_trim`, so the baseline RSS is live memory only), resets the RSS high-water mark
(`/proc/self/clear_refs`), runs ONE merge and reports wall time and peak RSS (`VmHWM`) above the pre-merge RSS:
the merge's working memory, merged output included (the pool itself is printed separately). The high-water mark
catches short-lived peaks too, so a streaming merge (separable methods: one tensor's τ at a time) is measured as
fairly as one that materialises the stacked task vectors. Figures, not asserts.

Where PEFT and mergekit are importable, their task arithmetic / TIES / DARE run on the same state dicts in the same
run (PEFT's per-tensor functions in `peft.utils.merge_utils`, looped over the state dict with τ = θ_k − θ_pre;
mergekit's `merge_state_dicts` with its registered merge methods) and the table gives peer_time / our_time. Both
peers trim per tensor, so their TIES is compared with our `trim_scope="per_tensor"` (our default trims the whole
task vector, as in the TIES paper).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

SEED = 0
NUM_TASKS = 8
SCALING = 0.3  # λ everywhere
DENSITY = 0.2  # TIES keep-share
DROP_RATE = 0.9  # DARE p; the peers take density = 1 − p


# --------------------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------------------

def vit_b32_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the CLIP ViT-B/32 visual encoder (≈87.8 M params at scale 1); widths scale by √scale."""
    root = math.sqrt(scale)
    width = max(8, int(round(768 * root / 8)) * 8)
    out_dim = max(8, int(round(512 * root / 8)) * 8)
    patch, tokens, layers = 32, 50, 12
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (width, 3, patch, patch),
        "class_embedding": (width,),
        "positional_embedding": (tokens, width),
        "ln_pre.weight": (width,),
        "ln_pre.bias": (width,),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        shapes.update({
            b + "ln_1.weight": (width,),
            b + "ln_1.bias": (width,),
            b + "attn.in_proj_weight": (3 * width, width),
            b + "attn.in_proj_bias": (3 * width,),
            b + "attn.out_proj.weight": (width, width),
            b + "attn.out_proj.bias": (width,),
            b + "ln_2.weight": (width,),
            b + "ln_2.bias": (width,),
            b + "mlp.c_fc.weight": (4 * width, width),
            b + "mlp.c_fc.bias": (4 * width,),
            b + "mlp.c_proj.weight": (width, 4 * width),
            b + "mlp.c_proj.bias": (width,),
        })
    shapes.update({"ln_post.weight": (width,), "ln_post.bias": (width,), "proj": (width, out_dim)})
    return shapes


def build_pool(scale: float, num_tasks: int, seed: int = SEED):
    """Pretrained + `num_tasks` experts as float32 state dicts (built in place: no transient copies)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pre: dict[str, torch.Tensor] = {}
    for key, shape in vit_b32_shapes(scale).items():
        pre[key] = torch.empty(shape).normal_(0.0, 0.02, generator=g)
        if key == "class_embedding":
            pre["position_ids"] = torch.arange(50, dtype=torch.int64).unsqueeze(0)  # an integer buffer
    experts = {}
    for t in range(num_tasks):
        state = {}
        for key, value in pre.items():
            if value.is_floating_point():
                state[key] = torch.empty_like(value).normal_(0.0, 1e-3, generator=g).add_(value)
            else:
                state[key] = value.clone()
        experts[f"task{t}"] = state
    return pre, experts


def num_params(scale: float) -> int:
    return sum(math.prod(s) for s in vit_b32_shapes(scale).values())


# --------------------------------------------------------------------------------------------------------------
# What gets measured: ("ours", method, storage, options) or ("peft" | "mergekit", op)
# --------------------------------------------------------------------------------------------------------------

PEER_OPS: dict[str, dict[str, Any]] = {
    # label: peer call + the symerge configuration computing the same thing (float32 storage)
    "peft task_arithmetic": {
        "peer": ("peft", "task_arithmetic", {}),
        "ours": ("task_arithmetic", {"scaling_coef": SCALING}),
    },
    "peft ties": {
        "peer": ("peft", "ties", {"density": DENSITY}),
        "ours": ("ties", {"density": DENSITY, "scaling_coef": SCALING, "trim_scope": "per_tensor"}),
    },
    "peft dare_linear": {
        "peer": ("peft", "dare_linear", {"density": 1 - DROP_RATE}),
        "ours": ("dare", {"drop_rate": DROP_RATE, "scaling_coef": SCALING, "base": "task_arithmetic"}),
    },
    "peft dare_ties": {  # PEFT's dare_ties: random drop + sign election, no magnitude trim (= our density 1)
        "peer": ("peft", "dare_ties", {"density": 1 - DROP_RATE}),
        "ours": ("dare", {"drop_rate": DROP_RATE, "scaling_coef": SCALING, "base": "ties", "density": 1.0,
                          "trim_scope": "per_tensor"}),
    },
    "mergekit task_arithmetic": {
        "peer": ("mergekit", "task_arithmetic", {"weight": SCALING}),
        "ours": ("task_arithmetic", {"scaling_coef": SCALING}),
    },
    "mergekit ties": {  # normalize=True (mean of agreeing entries), λ applied after
        "peer": ("mergekit", "ties", {"density": DENSITY, "weight": 1.0, "lambda": SCALING}),
        "ours": ("ties", {"density": DENSITY, "scaling_coef": SCALING, "trim_scope": "per_tensor"}),
    },
    "mergekit dare_linear": {  # mergekit rescales survivors to the task vector's L1 norm, not by 1/(1-p)
        "peer": ("mergekit", "dare_linear", {"density": 1 - DROP_RATE, "weight": SCALING}),
        "ours": ("dare", {"drop_rate": DROP_RATE, "scaling_coef": SCALING, "base": "task_arithmetic"}),
    },
    "mergekit dare_ties": {  # normalize=False: SUM of agreeing entries
        "peer": ("mergekit", "dare_ties", {"density": 1 - DROP_RATE, "weight": 1.0, "lambda": SCALING}),
        "ours": ("dare", {"drop_rate": DROP_RATE, "scaling_coef": SCALING, "base": "ties", "density": 1.0,
                          "trim_scope": "per_tensor", "disjoint_merge": "sum"}),
    },
}


def run_ours(pre, experts, method: str, storage: str, options: dict[str, Any]):
    import symerge.merging as merging

    return merging.merge(method, pre, experts, storage_dtype=storage, **options)


def run_peft(pre, experts, op: str, options: dict[str, Any]):
    import torch
    from peft.utils import merge_utils

    fn: Callable = getattr(merge_utils, op)
    tasks = list(experts)
    weights = torch.full((len(tasks),), SCALING)
    merged = {}
    for key, base in pre.items():
        if not base.is_floating_point():
            merged[key] = base.clone()
            continue
        task_tensors = [experts[t][key] - base for t in tasks]
        merged[key] = base + fn(task_tensors, weights, **options)
        del task_tensors
    return merged


def run_mergekit(pre, experts, op: str, options: dict[str, Any]):
    from mergekit.merge_methods.api import merge_state_dicts

    return merge_state_dicts({"__base__": pre, **experts}, op, base="__base__", parameters=options)


# --------------------------------------------------------------------------------------------------------------
# Worker: one measurement in a fresh process
# --------------------------------------------------------------------------------------------------------------

def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux ≥ 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """RSS high-water mark since the last reset: VmHWM (what clear_refs resets); ru_maxrss where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc), so RSS counts live memory only: a merge
    must not look leaner because it reuses pages an earlier allocation left resident."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(job["threads"])
    pre, experts = build_pool(job["scale"], job["tasks"])
    gc.collect()
    result: dict[str, Any] = {"pool_bytes": sum(v.numel() * v.element_size() for v in pre.values()) * (1 + len(experts))}
    kind = job["kind"]
    try:
        # import the library before measuring: its import cost is neither time nor merge memory
        if kind == "ours":
            import symerge.merging  # noqa: F401
        elif kind == "peft":
            import peft.utils.merge_utils  # noqa: F401
        else:
            import mergekit.merge_methods.api  # noqa: F401
        times, peaks, exact_peak = [], [], True
        for _ in range(job.get("repeat", 1)):
            release_free_memory()
            exact_peak = reset_peak_rss() and exact_peak
            before = current_rss()
            start = time.perf_counter()
            if kind == "ours":
                out = run_ours(pre, experts, job["method"], job["storage"], job["options"])
            elif kind == "peft":
                out = run_peft(pre, experts, job["op"], job["options"])
            else:
                out = run_mergekit(pre, experts, job["op"], job["options"])
            times.append(time.perf_counter() - start)
            peaks.append(max(0, peak_rss() - before))
            del out
        result["time_s"] = min(times)  # the least disturbed run
        result["peak_bytes"] = max(peaks)
        result["exact_peak"] = exact_peak
    except Exception as exc:  # report, don't crash the table
        result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def measure(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(job["threads"])
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"worker exited {proc.returncode}: {tail}"}


# --------------------------------------------------------------------------------------------------------------
# Numerical agreement with the peers on one tensor
# --------------------------------------------------------------------------------------------------------------

def agreement_check(num_tasks: int) -> list[str]:
    """Our per-tensor TIES (and TA) vs PEFT / mergekit on one ViT-shaped tensor, max |Δ|."""
    import torch

    import symerge.merging as merging

    lines = []
    g = torch.Generator().manual_seed(1)
    shape = (2304, 768)  # a block's attention in_proj weight
    pre = {"w": torch.empty(shape).normal_(0, 0.02, generator=g)}
    experts = {f"task{t}": {"w": torch.empty(shape).normal_(0, 1e-3, generator=g).add_(pre["w"])}
               for t in range(num_tasks)}
    # tie-free variant: θ_pre = 0 and τ ~ N(0, 1) drawn directly, so |τ| has (almost) no repeated values
    pre0 = {"w": torch.zeros(shape)}
    experts0 = {t: {"w": torch.empty(shape).normal_(0, 1.0, generator=g)} for t in experts}
    taus = [e["w"] - pre["w"] for e in experts.values()]
    k = int(DENSITY * taus[0].numel())
    ties_at_threshold = []
    for tau in taus:
        a = tau.abs().reshape(-1)
        kth = a.kthvalue(a.numel() - k + 1).values
        ties_at_threshold.append(int((a == kth).sum()) - 1)
    distinct = taus[0].abs().unique().numel()
    lines.append(f"Agreement on one {shape[0]}x{shape[1]} tensor, {num_tasks} tasks "
                 f"(τ = θ_k − θ_pre in float32 has only {distinct:,} distinct |τ| of {taus[0].numel():,} in task 0; "
                 f"extra entries tied with the k-th largest |τ| per task: {ties_at_threshold}):")
    ours = {}
    for label, (p, e) in {"pool": (pre, experts), "tie-free": (pre0, experts0)}.items():
        ours[label] = {
            "ties": merging.merge("ties", p, e, density=DENSITY, scaling_coef=SCALING, trim_scope="per_tensor")["w"],
            "ta": merging.merge("task_arithmetic", p, e, scaling_coef=SCALING)["w"],
        }
    try:
        from peft.utils import merge_utils

        weights = torch.full((num_tasks,), SCALING)
        for label, (p, e) in {"pool": (pre, experts), "tie-free": (pre0, experts0)}.items():
            tt = [x["w"] - p["w"] for x in e.values()]
            ties = p["w"] + merge_utils.ties(tt, weights, DENSITY)
            ta = p["w"] + merge_utils.task_arithmetic(tt, weights)
            d = (ties - ours[label]["ties"]).abs()
            lines.append(f"- PEFT ties vs symerge ties(per_tensor), {label}: max |Δ| = {float(d.max()):.3g} "
                         f"({int((d > 1e-6).sum())} entries > 1e-6); task_arithmetic: max |Δ| = "
                         f"{float((ta - ours[label]['ta']).abs().max()):.3g}")
    except ImportError as exc:
        lines.append(f"- PEFT not importable ({exc})")
    try:
        from mergekit.merge_methods.api import merge_state_dicts

        for label, (p, e) in {"pool": (pre, experts), "tie-free": (pre0, experts0)}.items():
            ties = merge_state_dicts({"__base__": p, **e}, "ties", base="__base__",
                                     parameters={"density": DENSITY, "weight": 1.0, "lambda": SCALING})["w"]
            ta = merge_state_dicts({"__base__": p, **e}, "task_arithmetic", base="__base__",
                                   parameters={"weight": SCALING})["w"]
            d = (ties - ours[label]["ties"]).abs()
            lines.append(f"- mergekit ties vs symerge ties(per_tensor), {label}: max |Δ| = {float(d.max()):.3g} "
                         f"({int((d > 1e-6).sum())} entries > 1e-6); task_arithmetic: max |Δ| = "
                         f"{float((ta - ours[label]['ta']).abs().max()):.3g}")
    except ImportError as exc:
        lines.append(f"- mergekit not importable ({exc})")
    lines.append("  Any TIES difference on the pool comes from magnitudes tied with the k-th largest: symerge keeps "
                 "every tied entry (the TIES code's `|τ| >= kthvalue` rule), PEFT (`topk`) and mergekit (`argsort`) "
                 "keep exactly k and break ties arbitrarily. On tie-free data all three agree to float rounding.")
    return lines


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------

def fmt_cell(res: dict[str, Any] | None) -> tuple[str, str]:
    if res is None:
        return "–", "–"
    if "error" in res:
        return f"error: {res['error'][:90]}", ""
    return f"{res['time_s']:.2f}", f"{res['peak_bytes'] / 2**30:.2f}"


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default 1)")
    parser.add_argument("--params-scale", type=float, default=1.0,
                        help="fraction of ViT-B/32's ≈88 M params per model (e.g. 0.05 for a quick run)")
    parser.add_argument("--methods", default="", help="comma-separated registry names (default: all registered)")
    parser.add_argument("--tasks", type=int, default=NUM_TASKS, help="number of experts (default 8)")
    parser.add_argument("--storage", default="float32,bfloat16", help="task-vector storage dtypes to measure")
    parser.add_argument("--repeat", type=int, default=1, help="merges per measurement; the fastest is reported")
    parser.add_argument("--no-peers", action="store_true", help="skip PEFT / mergekit")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement before giving up")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    torch.set_num_threads(args.threads)
    import symerge.merging as merging

    registered = merging.available_methods()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or registered
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    common = {"threads": args.threads, "scale": args.params_scale, "tasks": args.tasks, "repeat": args.repeat}
    n = num_params(args.params_scale)
    print(f"# merge_speed: ViT-B/32-shaped random pool, {n / 1e6:.1f} M params per model × {args.tasks} experts "
          f"(+ pretrained), float32 weights; torch {torch.__version__}, {args.threads} thread(s), "
          f"best of {args.repeat} run(s) per measurement\n", flush=True)

    cache: dict[str, dict[str, Any]] = {}

    def run_job(job: dict[str, Any], label: str) -> dict[str, Any]:
        key = json.dumps(job, sort_keys=True)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = measure({**common, **job}, args.timeout)
            status = cache[key].get("error", f"{cache[key].get('time_s', 0):.2f} s")
            print(f"  [{time.perf_counter() - t0:6.1f} s wall] {label}: {status}", file=sys.stderr, flush=True)
        return cache[key]

    rows = []
    pool_bytes = None
    for method in methods:
        cells = []
        for storage in storages:
            if method not in registered:
                res = {"error": f"unknown method '{method}'"}
            else:
                res = run_job({"kind": "ours", "method": method, "storage": storage, "options": {}},
                              f"{method} [{storage}]")
            pool_bytes = pool_bytes or res.get("pool_bytes")
            cells.append(res)
        rows.append((method, cells))

    peer_rows = []
    if not args.no_peers:
        for label, spec in PEER_OPS.items():
            peer, op, peer_options = spec["peer"]
            our_method, our_options = spec["ours"]
            if args.methods and our_method not in methods:
                continue
            if not importable(peer):
                peer_rows.append((label, {"error": f"{peer} not installed"}, our_method, our_options, None))
                continue
            peer_res = run_job({"kind": peer, "op": op, "options": peer_options}, label)
            ours = run_job({"kind": "ours", "method": our_method, "storage": "float32", "options": our_options},
                           f"{our_method} {our_options}")
            peer_rows.append((label, peer_res, our_method, our_options, ours))

    print("## symerge methods (default options)\n")
    header = "| method | " + " | ".join(f"{s}: time (s) | {s}: peak extra RSS (GiB)" for s in storages) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(storages)))
    for method, cells in rows:
        print(f"| {method} | " + " | ".join(" | ".join(fmt_cell(c)) for c in cells) + " |")
    if pool_bytes:
        print(f"\nThe pool itself (pretrained + {args.tasks} experts, float32) holds {pool_bytes / 2**30:.2f} GiB; "
              "peak extra RSS is the merge's working memory above it, the merged output included (the output "
              f"alone is {pool_bytes / (1 + args.tasks) / 2**30:.2f} GiB).")
    streamed = [m for m in registered if merging.get_method(m).separable]
    print(f"Separable methods merge as a stream, one tensor's τ at a time ({', '.join(streamed)}); the others "
          "build the stacked task vectors [K, *shape] of every tensor first.")

    if peer_rows:
        print("\n## Peers on the same state dicts (float32 storage; peers trim per tensor, so TIES is compared with "
              "symerge `trim_scope=\"per_tensor\"`)\n")
        print("| peer operation | peer time (s) | peer peak extra RSS (GiB) | symerge equivalent | symerge time (s) | "
              "symerge peak extra RSS (GiB) | peer time / symerge time |")
        print("|---|---|---|---|---|---|---|")
        for label, peer_res, our_method, our_options, ours in peer_rows:
            opts = ", ".join(f"{k}={v}" for k, v in our_options.items() if k != "scaling_coef")
            p_time, p_mem = fmt_cell(peer_res)
            o_time, o_mem = fmt_cell(ours)
            ratio = "–"
            if ours and "error" not in ours and "error" not in peer_res and ours["time_s"] > 0:
                ratio = f"{peer_res['time_s'] / ours['time_s']:.1f}×"
            print(f"| {label} | {p_time} | {p_mem} | {our_method}({opts}) | {o_time} | {o_mem} | {ratio} |")
        print("\nNotes: λ = 0.3 everywhere (PEFT weights = 0.3; mergekit TA/dare_linear weight = 0.3, ties/dare_ties "
              "weight 1 and lambda 0.3). PEFT/mergekit dare_ties elect signs without a magnitude trim, so they are "
              "compared with symerge dare(base='ties', density=1). mergekit's DARE rescales survivors to the "
              "task vector's L1 norm instead of 1/(1−p), and its dare_ties sums agreeing entries (normalize=False). "
              "symerge times include input validation (layouts, and finiteness of every tensor, before any work) "
              "and computing τ; peer times include computing τ per tensor (they validate nothing).")

    exact = all(c.get("exact_peak", True) for c in cache.values() if "error" not in c)
    if not exact:
        print("\n(peak RSS could not be reset in the workers; peaks include building the pool)")
    if not args.no_peers:
        print()
        for line in agreement_check(args.tasks):
            print(line)


if __name__ == "__main__":
    main()
