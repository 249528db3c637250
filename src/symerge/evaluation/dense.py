"""Dense-prediction metrics (the NYUv2 set): mIoU and pixel accuracy, absolute and relative depth error, surface
normal angular error. Library implementations (torchmetrics) where they exist; the angular error is a few lines
of torch.

Each task's `primary` score is higher-is-better so normalized scores divide the same way as accuracies: mIoU for
segmentation, and the inverse of the error (1 / abs. error, 1 / mean angle) for depth and normals, which makes a
normalized score the expert's error divided by the method's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional import mean_absolute_error, mean_absolute_percentage_error
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

from symerge.evaluation.metrics import TaskScore, expected_calibration_error

PRIMARY_METRIC = {"segmentation": "miou", "depth": "abs_err", "normals": "mean_angle"}
HIGHER_IS_BETTER = {"miou": True, "pixel_acc": True, "abs_err": False, "rel_err": False, "mean_angle": False,
                    "median_angle": False, "within_11.25": True}


def segmentation_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """mIoU (macro over classes) and pixel accuracy of [N, C, H, W] logits against [N, H, W] labels."""
    preds = logits.argmax(dim=1)
    classes = logits.shape[1]
    return {"miou": float(multiclass_jaccard_index(preds, labels, num_classes=classes, average="macro")),
            "pixel_acc": float(multiclass_accuracy(preds, labels, num_classes=classes, average="micro"))}


def depth_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean absolute error and mean relative error |d - d*| / d* over every pixel."""
    pred, target = pred.float().reshape(-1), target.float().reshape(-1)
    return {"abs_err": float(mean_absolute_error(pred, target)),
            "rel_err": float(mean_absolute_percentage_error(pred, target))}


def angular_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Per-pixel angle in degrees between [N, 3, H, W] normal maps (predictions need not be unit length)."""
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos))


def normal_metrics(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Mean and median angular error (degrees) and the share of pixels within 11.25°."""
    angles = angular_errors(pred, target).reshape(-1)
    return {"mean_angle": float(angles.mean()), "median_angle": float(angles.median()),
            "within_11.25": float((angles < 11.25).float().mean())}


def dense_score(kind: str, outputs: Tensor, labels: Tensor) -> TaskScore:
    """The TaskScore of one dense task; ECE (pixel-level) for segmentation only."""
    if kind == "segmentation":
        metrics = segmentation_metrics(outputs, labels)
        pixels = outputs.movedim(1, -1).reshape(-1, outputs.shape[1])
        return TaskScore(metrics["miou"], metrics, expected_calibration_error(pixels, labels.reshape(-1)))
    metrics = depth_metrics(outputs, labels) if kind == "depth" else normal_metrics(outputs, labels)
    error = metrics[PRIMARY_METRIC[kind]]
    return TaskScore(1.0 / max(error, 1e-12), metrics)


def gap_closed(method: float, baseline: float, expert: float) -> float:
    """Share of the baseline→expert gap a method closes (1 = matches the expert; works for errors too)."""
    gap = expert - baseline
    return float("nan") if gap == 0 else (method - baseline) / gap
