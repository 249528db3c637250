"""Classification metrics (accuracy, Matthews correlation, expected calibration error) and regression metrics
(Pearson / Spearman correlation, MAE), computed with torchmetrics, and the per-task score every suite reports
(`TaskScore`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.functional import mean_absolute_error, pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_calibration_error,
                                                    multiclass_matthews_corrcoef)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1] (micro-averaged)."""
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


def matthews_correlation(logits: Tensor, labels: Tensor) -> float:
    """Matthews correlation of the top-1 predictions (multiclass R_K; 0 for a constant prediction)."""
    preds = logits.argmax(dim=1)
    return float(multiclass_matthews_corrcoef(preds, labels, num_classes=logits.shape[1]))


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
    """Primary = top-1 accuracy; Matthews correlation beside it (chance-corrected on imbalanced tasks); ECE from the
    softmax confidences."""
    acc = accuracy(logits, labels)
    return TaskScore(acc, {"accuracy": acc, "mcc": matthews_correlation(logits, labels)},
                     expected_calibration_error(logits, labels))


def correlation_or_zero(value: Tensor) -> float:
    """A correlation as a float; undefined (a constant prediction) counts as 0, no linear association, so one
    collapsed model cannot turn a suite's averages into NaN."""
    number = float(value)
    return number if number == number else 0.0


def regression_score(outputs: Tensor, targets: Tensor) -> TaskScore:
    """Primary = Pearson r of the predictions with the targets; Spearman ρ and the mean absolute error beside it.

    `outputs` and `targets` hold one value per sample ([n] or [n, 1]); no calibration error (not a classifier).
    """
    if outputs.numel() != targets.numel() or outputs.shape[0] != targets.shape[0]:
        raise ValueError(f"regression outputs {tuple(outputs.shape)} do not match targets {tuple(targets.shape)}: "
                         "expected one value per sample")
    pred, truth = outputs.detach().reshape(-1).double().cpu(), targets.detach().reshape(-1).double().cpu()
    constant = bool(pred.numel() < 2 or pred.std() == 0 or truth.std() == 0)
    pearson = 0.0 if constant else correlation_or_zero(pearson_corrcoef(pred, truth))
    spearman = 0.0 if constant else correlation_or_zero(spearman_corrcoef(pred, truth))
    mae = float(mean_absolute_error(pred, truth))
    return TaskScore(pearson, {"pearson": pearson, "spearman": spearman, "mae": mae})


def primary_of(scorer: Callable[[Tensor, Tensor], TaskScore]) -> Callable[[Tensor, Tensor], float]:
    """A task's scorer (returns a TaskScore) as a plain (outputs, labels) -> primary score function, for code that
    ranks or tabulates one number per task (cross-task matrices, studies)."""
    return lambda outputs, labels: float(scorer(outputs, labels).primary)
