"""AdaMerging (Yang et al., ICLR 2024): learn λ (task-wise or layer-wise) by minimising the entropy of the
merged model's predictions on unlabeled test inputs; the experts' heads stay fixed."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.batching import Inputs
from symerge.adaptive.objectives import LossTerm, entropy_loss
from symerge.adaptive.registry import register_adaptive


@register_adaptive("adamerging", granularity="tensor", coefficients_only=True)
class AdaMerging(AdaptiveMethod):

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        return [{"params": [self.merged.lambdas], "lr": lr}]

    def step_parameters(self, task: str) -> list:
        return [self.merged.lambdas]

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        if self.task_kinds[task] != "classification":
            return None  # entropy is undefined for regression outputs: such tasks do not drive λ
        return entropy_loss(self.task_output(task, inputs))
