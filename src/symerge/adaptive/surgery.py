"""Representation Surgery (Yang et al., ICML 2024): λ fixed (task arithmetic or AdaMerging); per task a low-rank
adapter removes the "representation bias" of the merged features, f' = f − W_up ReLU(W_down f), trained with L1 to
the expert's features. W_up starts at zero, so training starts from the plain merged model. The feature size is
read from the merged encoder's own features (computed once in `prepare`), unless `feature_dim` is given.

The adapters train at `adapter_lr`, the official code's 1e-3, not at the trainer's task-layer rate (the vision regime's
1e-2 for SyMerge's heads): on non-negative pooled CNN features (MobileNetV2) one Adam step at 1e-2 moves every
W_down row by ~1e-2 per feature, which pushes all pre-activations below zero at once and leaves ReLU units dead, so
the adapters stop training (measured: Surgery equal to task arithmetic on 5 of 6 vision tasks). `adapter_lr=None`
uses the trainer's `layer_lr`. "Surgery w/ Ada" is the same method started from AdaMerging's λ (`init` and
`granularity` of `build_trainer`; the suites' `surgery_ada` row)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.batching import Inputs, encode_all
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.objectives import LossTerm, l1_loss
from symerge.adaptive.registry import get_adaptive, positive, register_adaptive

OFFICIAL_ADAPTER_LR = 1e-3  # Representation Surgery's official code: Adam, lr 1e-3


def positive_or_none(value: Any) -> None:
    if value is not None:
        positive(value)


class SurgeryAdapter(nn.Module):
    """f − up(relu(down(f))) over the feature dimension (dim 1 of [B, C, H, W] maps, else the last dim)."""

    def __init__(self, dim: int, rank: int = 16):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() == 4:
            moved = features.movedim(1, -1)
            return (moved - self.up(self.down(moved).relu())).movedim(-1, 1)
        return features - self.up(self.down(features).relu())


def feature_size(features: Tensor) -> int:
    """The feature dimension of encoder outputs: dim 1 of [B, C, H, W] maps, else the last dim."""
    return int(features.shape[1] if features.dim() == 4 else features.shape[-1])


@register_adaptive("surgery", granularity="task", learns_lambdas=False,
                   checks={"rank": positive, "adapter_lr": positive_or_none})
class Surgery(AdaptiveMethod):
    needs_features = True

    def __init__(self, merged: MergedEncoder, heads: dict[str, nn.Module], feature_dim: int | None = None,
                 rank: int = 16, adapter_lr: float | None = OFFICIAL_ADAPTER_LR, **kwargs: Any):
        get_adaptive("surgery").check_options({"rank": rank, "adapter_lr": adapter_lr})
        super().__init__(merged, heads, **kwargs)
        merged.lambdas.requires_grad_(False)
        self.rank = rank
        self.adapter_lr = adapter_lr
        self.surgery = nn.ModuleDict()
        self.frozen_features: dict[str, Tensor] = {}
        if feature_dim is not None:
            self.build_adapters(feature_dim)

    def build_adapters(self, feature_dim: int) -> None:
        self.surgery = nn.ModuleDict({self.slot(t): SurgeryAdapter(feature_dim, self.rank) for t in self.tasks})

    def prepare(self, inputs: Mapping[str, Inputs], batch_size: int, device: str | torch.device) -> None:
        """λ is fixed, so the merged encoder's features never change: compute them once, train adapters on them."""
        self.merged.encoder.eval()
        with torch.no_grad():
            params = self.merged.params()
            self.frozen_features = {
                t: encode_all(self.merged.encoder, inputs[t], params, batch_size, device) for t in self.tasks
            }
        if not len(self.surgery):  # the feature size, from the merged encoder's own features
            self.build_adapters(feature_size(self.frozen_features[self.tasks[0]]))
            self.surgery.to(self.merged.lambdas.device)

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.surgery.parameters()),
                 "lr": layer_lr if self.adapter_lr is None else self.adapter_lr}]

    def step_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.surgery[self.slot(task)].parameters())

    def task_features(self, task: str, inputs: Inputs) -> Tensor:
        return self.surgery[self.slot(task)](super().task_features(task, inputs))

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        device = self.merged.lambdas.device
        merged = self.frozen_features[task][index].to(device, non_blocking=True)
        return l1_loss(self.surgery[self.slot(task)](merged), cache.batch("features", task, index, device))

    def adapters(self) -> dict[str, nn.Module]:
        return {t: self.surgery[self.slot(t)] for t in self.tasks}
