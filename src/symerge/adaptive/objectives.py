"""Adaptation objectives. Class dimension is dim 1, so [B, C] logits and [B, C, H, W] dense maps both work.

- `entropy_loss`: AdaMerging's Shannon entropy of the merged prediction.
- `confidence_keep_mask`: SyMerge's relative confidence filter; rules
  * "code"  (default, official code `crosspseudoconf`): drop a sample only when merged and expert DISAGREE and the
    merged model is more confident;
  * "paper" (App. A.1 literal): drop whenever the merged model's top-1 confidence exceeds the expert's;
  * "none": keep everything.
- `self_label_loss`: one of the `SELF_LABEL_LOSSES` (paper Fig. C) between the merged output and the cached teacher
  output, over the samples the filter keeps; returns None when nothing is kept, so the caller makes no update
  (instead of the official code's NaN). "ce" (hard label, the paper's and the default) and "kl" (soft) are the
  distributional ones; "js" (Jensen–Shannon of the softmaxes), "l1" / "smooth_l1" / "l2" (on the logits, mean over
  logit entries) and "cosine" (1 − cos of the logit vectors) follow Fig. C; "entropy" is AdaMerging's and ignores
  the teacher. The confidence filter is a sample selection, so it applies to every loss that uses the teacher
  (the same samples for every distance); "entropy" has no teacher and always uses every sample. `temperature`
  softens "kl" and "js" (scaled by T² as usual) and is ignored by the others.
- `l1_loss`: L1 to the expert output (regression / dense maps / Surgery features).

Each objective returns a `LossTerm`: the mean and the number of units it averages (samples, kept samples, pixels,
elements), so data-parallel ranks can weight their means into the exact global mean (`distributed.py`).

Both arguments of every objective must be on one device: the caller moves the cached expert batch
(`ExpertCache.batch`), so a device bug fails here instead of being hidden by an implicit copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from symerge.errors import ValidationError

FILTER_RULES = ("code", "paper", "none")
LABEL_TYPES = ("hard", "soft")
LABELS_AS_LOSS = {"hard": "ce", "soft": "kl"}  # the older `labels` option, as a loss name


class LossTerm(NamedTuple):
    value: Tensor  # a mean over `units`
    units: int


def entropy_loss(logits: Tensor) -> LossTerm:
    """Mean Shannon entropy of softmax(logits) over samples (and pixels)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return LossTerm(-(log_p.exp() * log_p).sum(dim=1).mean(), logits.numel() // max(logits.shape[1], 1))


def confidence_keep_mask(merged_logits: Tensor, expert_logits: Tensor, rule: str = "code") -> Tensor:
    """Boolean mask (per sample / pixel) of self-labels to learn from."""
    if rule not in FILTER_RULES:
        raise ValidationError(f"filter rule must be one of {FILTER_RULES}, got '{rule}'")
    merged_conf, merged_label = F.softmax(merged_logits.detach().float(), dim=1).max(dim=1)
    expert_conf, expert_label = F.softmax(expert_logits.float(), dim=1).max(dim=1)
    if rule == "none":
        return torch.ones_like(expert_label, dtype=torch.bool)
    if rule == "paper":
        return merged_conf <= expert_conf
    return (merged_label == expert_label) | (expert_conf >= merged_conf)


# --- self-supervised objectives against the teacher: rows [R, C] of merged and teacher logits -------------------
def _ce(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return LossTerm(F.cross_entropy(merged, teacher.argmax(dim=-1)), len(merged))


def _kl(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    log_p = F.log_softmax(merged / temperature, dim=-1)
    target = F.log_softmax(teacher / temperature, dim=-1)
    return LossTerm(F.kl_div(log_p, target, log_target=True, reduction="batchmean") * temperature**2, len(merged))


def _js(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    log_p = F.log_softmax(merged / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)  # log of the mixture (p + q) / 2
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(dim=-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(dim=-1)
    return LossTerm((0.5 * (kl_pm + kl_qm)).mean() * temperature**2, len(merged))


def _entropy(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return entropy_loss(merged)


def _l1(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return LossTerm(F.l1_loss(merged, teacher), merged.numel())


def _smooth_l1(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return LossTerm(F.smooth_l1_loss(merged, teacher, beta=1.0), merged.numel())


def _l2(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return LossTerm(F.mse_loss(merged, teacher), merged.numel())


def _cosine(merged: Tensor, teacher: Tensor, temperature: float) -> LossTerm:
    return LossTerm((1.0 - F.cosine_similarity(merged, teacher, dim=-1)).mean(), len(merged))


@dataclass(frozen=True)
class SelfLabelLoss:
    """One objective of the registry: `fn(merged_rows, teacher_rows, temperature)` and whether it reads the teacher
    (only those are confidence-filtered)."""

    fn: Callable[[Tensor, Tensor, float], LossTerm]
    uses_teacher: bool = True


SELF_LABEL_LOSSES: dict[str, SelfLabelLoss] = {
    "ce": SelfLabelLoss(_ce),
    "kl": SelfLabelLoss(_kl),
    "js": SelfLabelLoss(_js),
    "entropy": SelfLabelLoss(_entropy, uses_teacher=False),
    "l1": SelfLabelLoss(_l1),
    "smooth_l1": SelfLabelLoss(_smooth_l1),
    "l2": SelfLabelLoss(_l2),
    "cosine": SelfLabelLoss(_cosine),
}
LOSSES = tuple(SELF_LABEL_LOSSES)


def resolve_loss(loss: str | None, labels: str | None) -> str:
    """The loss name from `loss` and the older alias `labels` ("hard" = "ce", "soft" = "kl"); default "ce"."""
    if loss is not None and loss not in SELF_LABEL_LOSSES:
        raise ValidationError(f"loss must be one of {list(LOSSES)}, got '{loss}'")
    if labels is None:
        return loss or "ce"
    if labels not in LABELS_AS_LOSS:
        raise ValidationError(f"labels must be one of {list(LABEL_TYPES)}, got '{labels}'")
    implied = LABELS_AS_LOSS[labels]
    if loss is not None and loss != implied:
        raise ValidationError(f"labels='{labels}' means loss='{implied}', which contradicts loss='{loss}'; "
                              "give only `loss`")
    return implied


def self_label_loss(
    merged_logits: Tensor, expert_logits: Tensor, rule: str = "code", labels: str | None = None,
    temperature: float = 1.0, loss: str | None = None,
) -> LossTerm | None:
    """`loss` (default "ce"; `labels` is its older alias) between the merged prediction and the teacher's, on the
    samples the confidence filter keeps (every sample for "entropy", which does not read the teacher)."""
    spec = SELF_LABEL_LOSSES[resolve_loss(loss, labels)]
    merged = move_class_last(merged_logits.float())
    expert = move_class_last(expert_logits.float())
    if spec.uses_teacher:
        keep = confidence_keep_mask(merged_logits, expert_logits, rule)
        if not bool(keep.any()):
            return None
        merged, expert = merged[keep], expert[keep]
    else:
        merged, expert = merged.reshape(-1, merged.shape[-1]), expert.reshape(-1, expert.shape[-1])
    return spec.fn(merged, expert, temperature)


def l1_loss(merged_output: Tensor, expert_output: Tensor) -> LossTerm:
    """Mean absolute error to the expert's output."""
    return LossTerm((merged_output.float() - expert_output.float()).abs().mean(), merged_output.numel())


def move_class_last(logits: Tensor) -> Tensor:
    """[B, C, ...] -> [B, ..., C] so boolean masks of shape [B, ...] select rows of classes."""
    return logits if logits.dim() == 2 else logits.movedim(1, -1)
