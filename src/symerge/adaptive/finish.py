"""Turn a trained method into a MergeResult with provenance."""

from __future__ import annotations

from symerge.adaptive.trainer import Trainer
from symerge.result import MergeResult


def finish(trainer: Trainer) -> MergeResult:
    """Package a trained method as a MergeResult with provenance."""
    cfg = trainer.config
    provenance = {
        "method": trainer.method.name,
        "options": {k: v for k, v in trainer.method_options.items() if k != "feature_dim"},
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"),
        "granularity": trainer.method.merged.granularity,
        "expert_runs_per_sample": trainer.cache.runs_per_sample(),
        "expert_seconds": trainer.cache.seconds,
        "adapt_seconds": trainer.seconds,
        "skipped_steps": trainer.skipped_steps,
    }
    return trainer.method.to_result(trainer.history, provenance)
