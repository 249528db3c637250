"""Adaptation objectives. Class dimension is dim 1, so [B, C] logits and [B, C, H, W] dense maps both work.

- `entropy_loss`: AdaMerging's Shannon entropy of the merged prediction.
- `confidence_keep_mask`: SyMerge's relative confidence filter; rules
  * "code"  (default, official code `crosspseudoconf`): drop a sample only when merged and expert DISAGREE and the
    merged model is more confident;
  * "paper" (App. A.1 literal): drop whenever the merged model's top-1 confidence exceeds the expert's;
  * "none": keep everything.
- `self_label_loss`: CE to the expert's hard label (or KL to its soft prediction) over the kept samples; returns
  None when nothing is kept, so the caller makes no update (instead of the official code's NaN).
- `l1_loss`: L1 to the expert output (regression / dense maps / Surgery features).

Each objective returns a `LossTerm`: the mean and the number of units it averages (samples, kept samples, pixels,
elements), so data-parallel ranks can weight their means into the exact global mean (`distributed.py`).

Both arguments of every objective must be on one device: the caller moves the cached expert batch
(`ExpertCache.batch`), so a device bug fails here instead of being hidden by an implicit copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from symerge.errors import ValidationError

FILTER_RULES = ("code", "paper", "none")
LABEL_TYPES = ("hard", "soft")


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


def self_label_loss(
    merged_logits: Tensor, expert_logits: Tensor, rule: str = "code", labels: str = "hard", temperature: float = 1.0
) -> LossTerm | None:
    """CE (hard) or KL (soft) between the merged prediction and the expert's, on the samples the filter keeps."""
    if labels not in LABEL_TYPES:
        raise ValidationError(f"labels must be one of {LABEL_TYPES}, got '{labels}'")
    keep = confidence_keep_mask(merged_logits, expert_logits, rule)
    kept = int(keep.sum())
    if kept == 0:
        return None
    merged = move_class_last(merged_logits.float())[keep]
    expert = move_class_last(expert_logits.float())[keep]
    if labels == "hard":
        return LossTerm(F.cross_entropy(merged, expert.argmax(dim=-1)), kept)
    log_p = F.log_softmax(merged / temperature, dim=-1)
    target = F.log_softmax(expert / temperature, dim=-1)
    return LossTerm(F.kl_div(log_p, target, log_target=True, reduction="batchmean") * temperature**2, kept)


def l1_loss(merged_output: Tensor, expert_output: Tensor) -> LossTerm:
    """Mean absolute error to the expert's output."""
    return LossTerm((merged_output.float() - expert_output.float()).abs().mean(), merged_output.numel())


def move_class_last(logits: Tensor) -> Tensor:
    """[B, C, ...] -> [B, ..., C] so boolean masks of shape [B, ...] select rows of classes."""
    return logits if logits.dim() == 2 else logits.movedim(1, -1)
