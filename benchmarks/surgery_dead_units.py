"""Why Surgery's adapters stopped training on the vision suite: the share of each adapter's ReLU units that are ever
active on the adaptation features after training, and the L1 objective before / after, per adapter learning rate.

MobileNetV2's pooled ReLU6 features are all ≥ 0; too high an adapter rate pushes every ReLU pre-activation below
zero within the first Adam steps, and a dead adapter never changes the features again. Uses the vision suite's
benchmark (data and experts from the cache, fine-tuned if missing) and settings. Figures, not asserts.

    python benchmarks/surgery_dead_units.py [--lrs 1e-2,1e-3,1e-4] [--threads 1] [--out docs/benchmarks/surgery_dead_units.txt]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-2,1e-3,1e-4", help="adapter learning rates, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from symerge.adaptive import build_trainer
    from symerge.atomic import atomic_file
    from symerge.suites.runner import expert_cache_for
    from symerge.suites.vision import VisionSuiteConfig, vision_benchmark

    cfg = VisionSuiteConfig()
    bench, _info = vision_benchmark(cfg, progress=False, log=lambda _line: None)
    settings = cfg.adapt_settings().model_copy(update={"progress": False})
    tv = bench.task_vectors()
    inputs = bench.tasks.adapt_inputs(cfg.protocol)
    cache = expert_cache_for(bench, tv, inputs, settings, False)
    tasks = bench.task_names
    lines = [f"Surgery (w/ TA) on the vision suite, {settings.steps} iterations, batch {settings.batch_size}: share "
             "(%) of each adapter's ReLU units ever active on its task's adaptation features after training, and "
             "the mean L1 objective.", "",
             "| adapter lr | " + " | ".join(tasks) + " | L1 before | L1 after |", "|" + "---|" * (len(tasks) + 3)]
    for lr in (float(v) for v in args.lrs.split(",")):
        trainer = build_trainer("surgery", bench.encoder, bench.heads, tv, inputs,
                                config=settings.trainer_config("surgery", False), cache=cache, adapter_lr=lr)
        method = trainer.method
        method.prepare(inputs, settings.batch_size, settings.device)
        features = dict(method.frozen_features)

        def objective() -> float:
            with torch.no_grad():
                return sum(float((method.surgery[method.slot(t)](features[t]) - cache.features[t]).abs().mean())
                           for t in tasks) / len(tasks)

        before = objective()
        trainer.run()
        after = objective()
        with torch.no_grad():
            active = [float((method.surgery[method.slot(t)].down(features[t]) > 0).any(dim=0).float().mean())
                      for t in tasks]
        lines.append(f"| {lr:g} | " + " | ".join(f"{100 * a:.0f}" for a in active) + f" | {before:.4f} | {after:.4f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        with atomic_file(args.out) as tmp:
            tmp.write_text(text)


if __name__ == "__main__":
    main()
