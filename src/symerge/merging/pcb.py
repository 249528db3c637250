"""PCB-merging (Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024).

Implements `PCB_merge` of the official code (`pcb-merging.py`). Every quantity is computed per task over the
task's WHOLE flattened task vector (all merged tensors together), with K tasks and D entries per task:

1. Outlier clipping: |τ_i| is clamped to its own [q, 1−q] quantile range (q = `clamp_ratio`, official 0.0001;
   quantile = the sorted value at index ⌊D·q⌋, resp. ⌊D·(1−q) − 1⌋); τ̂_i = sgn(τ_i) · clamp(|τ_i|).
2. Intra-balancing: β_intra,i = exp(K · Norm(|τ̂_i|)²), Norm(x) = (x − min x) / (max x − min x) over the task's
   entries — the official code's form of the paper's Softmax(N · Norm(τ_i ⊙ τ_i)) (exp without the softmax
   denominator: the per-task normalisation in step 4 removes any per-task constant).
3. Inter-balancing: β_inter,i = tanh(τ_i ⊙ Σ_j τ_j) — the official code's form of the paper's
   Σ_j Softmax(Norm(τ_i ⊙ τ_j)) (raw, unclipped task vectors).
4. β_i = β_intra,i ⊙ β_inter,i. Drop: values below the task's top-`pcb_ratio` quantile (sorted index
   ⌊D·(1 − r)⌋) are raised to it, then β̂_i = Norm(·) over the task — so the kept top-r entries get weights in
   (0, 1] and everything else 0.
5. Rescale / merge: τ_m = Σ_i β̂_i ⊙ τ̂_i / max(Σ_i β̂_i, 1e-12);  θ = θ_pre + λ τ_m.

Options → symbols:
- `pcb_ratio` = r, the fraction of entries KEPT per task (the code's `pcb_ratio`: `clamp(β, 1 − r, 0)`;
  the paper calls it the mask ratio). Default 0.05 with `scaling_coef` λ = 1.2: the values of the official
  ViT-B/32 8-task scripts (`vision_source_code/pcb.py` and the ES example in `pcb-merging.py`). The paper
  chooses them on validation data (its evolutionary-search variant tunes one λ per task in [0.8, 1.3]); the
  function's own default in the official code is r = 0.1.
- `clamp_ratio` = q, default 0.0001 (official `PCB_merge`).
Quantiles are exact (`select_ops.kth_smallest`, a faster equivalent of sorting). Degenerate normalisations (max = min, where the official code divides by zero) are defined as: step 2 uses 0
(a per-task constant, removed by step 4), step 4 keeps the entries at the threshold with weight 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.merging.registry import Delta, register
from symerge.merging.select_ops import kth_smallest
from symerge.taskvectors import TaskVectors


def sorted_value(flat: Tensor, index: int) -> Tensor:
    """Per row of flat [K, D], the value at `index` of the ascending sort (exact; `select_ops.kth_smallest`)."""
    return kth_smallest(flat, index + 1)


def normalize(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """(x − low) / (high − low) per row, with 0 where high = low (x is clamped to [low, high])."""
    span = high - low
    return (x - low) / torch.where(span > 0, span, torch.ones_like(span))


@register("pcb")
def pcb(tv: TaskVectors, *, pcb_ratio: float = 0.05, scaling_coef: float = 1.2, clamp_ratio: float = 0.0001) -> Delta:
    """PCB-merging (official `PCB_merge`); r = `pcb_ratio` kept per task, λ = `scaling_coef`."""
    if not 0.0 < pcb_ratio <= 1.0:
        raise ValidationError(f"pcb: pcb_ratio must be in (0, 1], got {pcb_ratio}")
    if not 0.0 <= clamp_ratio < 0.5:
        raise ValidationError(f"pcb: clamp_ratio must be in [0, 0.5), got {clamp_ratio}")
    num_tasks = tv.num_tasks
    keys = tv.keys
    sizes = [tv.vectors[k][0].numel() for k in keys]
    total = sum(sizes)
    if total == 0:
        return {k: torch.zeros(tv.vectors[k].shape[1:]) for k in keys}

    # one [K, D] float32 buffer, reused: first |τ|, then the balancing scores β
    buffer = torch.empty(num_tasks, total)
    offset = 0
    for size, (_, vec) in zip(sizes, tv.items_float()):
        buffer[:, offset:offset + size] = vec.reshape(num_tasks, -1).abs()
        offset += size
    low = sorted_value(buffer, int(total * clamp_ratio)).unsqueeze(1)  # [K, 1]
    high = sorted_value(buffer, int(total * (1 - clamp_ratio) - 1)).unsqueeze(1)

    def clipped(vec: Tensor) -> tuple[Tensor, Tensor]:
        flat = vec.reshape(num_tasks, -1)
        magnitude = torch.minimum(torch.maximum(flat.abs(), low), high)
        return flat, magnitude

    offset = 0
    for size, (_, vec) in zip(sizes, tv.items_float()):
        flat, magnitude = clipped(vec)
        intra = torch.exp(num_tasks * normalize(magnitude, low, high) ** 2)
        inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
        buffer[:, offset:offset + size] = intra * inter
        offset += size
    threshold = sorted_value(buffer, int(total * (1 - pcb_ratio))).unsqueeze(1)
    top = buffer.max(dim=1, keepdim=True).values
    degenerate = bool((top <= threshold).any())

    out: Delta = {}
    offset = 0
    for size, (key, vec) in zip(sizes, tv.items_float()):
        flat, magnitude = clipped(vec)
        score = buffer[:, offset:offset + size]
        weight = normalize(torch.maximum(score, threshold), threshold, top)
        if degenerate:
            weight = torch.where((top <= threshold) & (score >= threshold), torch.ones_like(weight), weight)
        merged = (torch.sign(flat) * magnitude * weight).sum(dim=0) / weight.sum(dim=0).clamp(min=1e-12)
        out[key] = merged.reshape(vec.shape[1:]) * scaling_coef
        offset += size
    return out
