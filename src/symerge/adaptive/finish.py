"""Turn a trained method into a MergeResult with provenance (kept for old imports: the trainer builds it itself,
`Trainer.result()`)."""

from __future__ import annotations

from symerge.adaptive.trainer import Trainer
from symerge.result import MergeResult


def finish(trainer: Trainer) -> MergeResult:
    """Package a trained method as a MergeResult with provenance: `trainer.result()`."""
    return trainer.result()
