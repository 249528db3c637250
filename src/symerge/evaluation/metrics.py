"""Classification metrics, computed with torchmetrics (accuracy, expected calibration error), and the per-task score
every suite reports (`TaskScore`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1] (micro-averaged)."""
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


def expected_calibration_error(logits: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (L1), as in Guo et al. 2017."""
    probs = torch.softmax(logits.float(), dim=1)
    return float(multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=bins, norm="l1"))


def normalized(scores: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per-task score divided by the reference's (the individual experts): the paper's normalized accuracy."""
    return {t: scores[t] / reference[t] if reference[t] > 0 else float("nan") for t in scores}


def mean(values: Mapping[str, float]) -> float:
    return float(sum(values.values()) / len(values)) if values else float("nan")


@dataclass(frozen=True)
class TaskScore:
    """One task's evaluation: `primary` (higher is better; what normalized scores divide), every metric, and
    the calibration error where the task has one (classification)."""

    primary: float
    metrics: dict[str, float]
    ece: float | None = None


def classification_score(logits: Tensor, labels: Tensor) -> TaskScore:
    """Primary = top-1 accuracy; ECE from the softmax confidences."""
    acc = accuracy(logits, labels)
    return TaskScore(acc, {"accuracy": acc}, expected_calibration_error(logits, labels))
