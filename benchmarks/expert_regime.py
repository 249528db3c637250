"""How much of the experts' task knowledge sits in the encoder: for one expert recipe (encoder lr, head lr), the
normalized accuracy of the pretrained encoder with the experts' heads, of task arithmetic and of SyMerge (issue 17's
difficulty targets). Uses the suite's own data, splits and experts (fine-tuned and cached if missing); prints one
JSON line, with SyMerge's curve and task arithmetic per task. Figures, not asserts.

    python benchmarks/expert_regime.py --suite text --expert '{"steps": 150, "batch_size": 32, "lr": 5e-4,
        "head_lr": 5e-4}' [--config '{"freeze_word_embeddings": false}'] [--steps 100] [--threads 1]
        [--out docs/benchmarks/expert_regime.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["text", "vision"], default="text")
    parser.add_argument("--expert", required=True, help="the expert recipe as JSON (the suite config's `expert`)")
    parser.add_argument("--config", default="{}", help="other suite config fields as JSON, e.g. "
                        "'{\"freeze_word_embeddings\": false}' (validated by the suite config)")
    parser.add_argument("--methods", default="pretrained,individual,task_arithmetic,symerge")
    parser.add_argument("--steps", type=int, default=None, help="adaptation iterations (default: the suite's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also append the JSON line to this file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from symerge.evaluation.metrics import mean, normalized
    from symerge.suites.runner import run_methods

    if args.suite == "text":
        from symerge.suites.text import TextSuiteConfig as Config, text_benchmark as benchmark
    else:
        from symerge.suites.vision import VisionSuiteConfig as Config, vision_benchmark as benchmark
    methods = args.methods.split(",")
    overrides = json.loads(args.config)
    cfg = Config(**{**overrides, "expert": json.loads(args.expert), "methods": methods})
    if args.steps is not None:
        curve = sorted({c for c in (25, 50, 100, 200) if c < args.steps} | {args.steps})
        cfg = cfg.model_copy(update={"adapt": cfg.adapt.model_copy(update={"steps": args.steps, "curve": curve})})
    bench, _ = benchmark(cfg, progress=False, log=lambda _: None)
    outcomes = run_methods(bench, methods, cfg.protocol, cfg.adapt_settings(), progress=False, log=lambda _: None)
    reference = outcomes["individual"].per_task
    line = {
        "suite": args.suite, "expert": cfg.expert, **({"config": overrides} if overrides else {}),
        **{m: round(100 * mean(normalized(o.per_task, reference)), 1) for m, o in outcomes.items()},
        "individual_avg": round(100 * mean(reference), 1),
        "curves": {m: [(c["iterations"], round(100 * c["normalized_average"], 1)) for c in o.curve]
                   for m, o in outcomes.items() if o.curve},
        "task_arithmetic_per_task": {t: round(100 * v / reference[t], 1)
                                     for t, v in outcomes["task_arithmetic"].per_task.items()},
    }
    print(json.dumps(line))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
