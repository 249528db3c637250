"""SyMerge (Jung et al., arXiv 2412.19098): jointly learn λ and ONE task-specific layer per task from the experts'
own predictions on unlabeled data.

Task-specific layer (`task_layer`): "head" (default: each task's classifier, as in the paper's main results) or
"block:<prefix>" — the encoder tensors under <prefix> (e.g. "encoder.layer.5.") become one trainable copy per
task, initialised from the task-arithmetic merge (λ = 0.3) of that block (paper Table B); heads then stay fixed.
Objective per task: CE to the expert's hard label with the relative confidence filter (`filter_rule`:
"code" default, "paper", "none"), or KL to its soft prediction (`labels="soft"`); L1 to the expert output for
regression / dense tasks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.batching import Inputs
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.objectives import FILTER_RULES, LABEL_TYPES, LossTerm, l1_loss, self_label_loss
from symerge.adaptive.registry import one_of, positive, register_adaptive
from symerge.errors import ValidationError


def parse_task_layer(task_layer: str) -> str | None:
    """None for the head, else the encoder prefix of the block to make task-specific."""
    if task_layer == "head":
        return None
    if task_layer.startswith("block:") and len(task_layer) > len("block:"):
        return task_layer[len("block:") :]
    raise ValidationError(f"task_layer must be 'head' or 'block:<parameter prefix>', got '{task_layer}'")


@register_adaptive("symerge", granularity="tensor", checks={
    "filter_rule": one_of(FILTER_RULES), "labels": one_of(LABEL_TYPES), "temperature": positive,
    "task_layer": lambda value: parse_task_layer(value) and None,
})
class SyMerge(AdaptiveMethod):

    def __init__(
        self,
        merged: MergedEncoder,
        heads: dict[str, nn.Module],
        task_layer: str = "head",
        filter_rule: str = "code",
        labels: str = "hard",
        temperature: float = 1.0,
        block_init_coef: float = 0.3,
        train_coefficients: bool = True,
        **kwargs: Any,
    ):
        super().__init__(merged, heads, **kwargs)
        self.filter_rule, self.labels, self.temperature = filter_rule, labels, temperature
        self.block_prefix = parse_task_layer(task_layer)
        merged.lambdas.requires_grad_(train_coefficients)
        self.block_keys: list[str] = []
        self.blocks = nn.ModuleDict()
        if self.block_prefix is None:
            for head in self.heads.values():
                head.requires_grad_(True)
        else:
            self.block_keys = [k for k in merged.keys if k.startswith(self.block_prefix)]
            if not self.block_keys:
                raise ValidationError(f"task_layer '{task_layer}': no encoder tensor starts with '{self.block_prefix}'")
            with torch.no_grad():
                ta = merged.scaled_params(torch.full((len(self.tasks),), block_init_coef))
            for task in self.tasks:
                self.blocks[self.slot(task)] = nn.ParameterList(
                    [nn.Parameter(ta[k].detach().clone()) for k in self.block_keys]
                )

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        groups = []
        if self.merged.lambdas.requires_grad:
            groups.append({"params": [self.merged.lambdas], "lr": lr})
        layers = self.blocks.parameters() if self.block_prefix is not None else self.heads.parameters()
        groups.append({"params": list(layers), "lr": layer_lr})
        return groups

    def step_parameters(self, task: str) -> list[nn.Parameter]:
        own = self.blocks[self.slot(task)] if self.block_prefix is not None else self.head(task)
        shared = [self.merged.lambdas] if self.merged.lambdas.requires_grad else []
        return shared + list(own.parameters())

    def encoder_overrides(self, task: str) -> dict[str, Tensor]:
        if self.block_prefix is None:
            return {}
        return dict(zip(self.block_keys, self.blocks[self.slot(task)]))

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        output = self.task_output(task, inputs)
        target = cache.batch("outputs", task, index, output.device)
        if self.task_kinds[task] == "regression":
            return l1_loss(output, target)
        return self_label_loss(output, target, self.filter_rule, self.labels, self.temperature)
