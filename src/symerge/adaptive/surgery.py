"""Representation Surgery (Yang et al., ICML 2024): λ fixed (task arithmetic or AdaMerging); per task a low-rank
adapter removes the "representation bias" of the merged features, f' = f − W_up ReLU(W_down f), trained with L1 to
the expert's features. W_up starts at zero, so training starts from the plain merged model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.inputs import Inputs, encode_all
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.objectives import LossTerm, l1_loss


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


class Surgery(AdaptiveMethod):
    name = "surgery"
    needs_features = True

    def __init__(self, merged: MergedEncoder, heads: dict[str, nn.Module], feature_dim: int, rank: int = 16, **kwargs: Any):
        super().__init__(merged, heads, **kwargs)
        merged.lambdas.requires_grad_(False)
        self.rank = rank
        self.surgery = nn.ModuleDict({self.slot(t): SurgeryAdapter(feature_dim, rank) for t in self.tasks})
        self.frozen_features: dict[str, Tensor] = {}

    def prepare(self, inputs: Mapping[str, Inputs], batch_size: int, device: str | torch.device) -> None:
        """λ is fixed, so the merged encoder's features never change: compute them once, train adapters on them."""
        self.merged.encoder.eval()
        with torch.no_grad():
            params = self.merged.params()
            self.frozen_features = {
                t: encode_all(self.merged.encoder, inputs[t], params, batch_size, device) for t in self.tasks
            }

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.surgery.parameters()), "lr": layer_lr}]

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
