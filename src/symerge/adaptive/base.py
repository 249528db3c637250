"""What every adaptive method shares: the merged encoder, per-task heads, and the hooks the trainer calls.

A method is an `nn.Module` whose state_dict is exactly its trainable state (λ, task-specific layers, adapters),
so checkpoints are `method.state_dict()` plus the optimizer state.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.experts import ExpertCache
from symerge.batching import Inputs
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.objectives import LossTerm
from symerge.errors import ValidationError
from symerge.result import MergeResult

TASK_KINDS = ("classification", "regression")


class AdaptiveMethod(nn.Module):
    """Base class: subclasses set which parameters train and define `task_loss`."""

    name = "adaptive"
    needs_features = False  # whether the expert cache must keep encoder features (Surgery)

    def __init__(self, merged: MergedEncoder, heads: Mapping[str, nn.Module], task_kinds: Mapping[str, str] | None = None):
        super().__init__()
        missing = [t for t in merged.tasks if t not in heads]
        if missing:
            raise ValidationError(f"no head given for task '{missing[0]}'")
        self.merged = merged
        self.tasks = list(merged.tasks)
        kinds = dict(task_kinds or {})
        for task, kind in kinds.items():
            if task not in self.tasks:
                raise ValidationError(f"task kind given for unknown task '{task}'")
            if kind not in TASK_KINDS:
                raise ValidationError(f"task '{task}': kind must be one of {TASK_KINDS}, got '{kind}'")
        self.task_kinds = {t: kinds.get(t, "classification") for t in self.tasks}
        # ModuleDict keys cannot contain '.', so heads are stored by task index.
        self.heads = nn.ModuleDict({self.slot(t): copy.deepcopy(heads[t]) for t in self.tasks})
        for head in self.heads.values():
            head.requires_grad_(False)

    def slot(self, task: str) -> str:
        return f"task{self.tasks.index(task)}"

    def head(self, task: str) -> nn.Module:
        return self.heads[self.slot(task)]

    # --- hooks -------------------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Inputs], batch_size: int, device: str | torch.device) -> None:
        """Called once by the trainer before the loop (e.g. to cache what does not change during training)."""

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (λ at `lr`, task-specific layers at `layer_lr`)."""
        raise NotImplementedError

    def step_parameters(self, task: str) -> list[nn.Parameter]:
        """The trainable tensors one task's loss can reach (their gradients are summed over data-parallel ranks)."""
        return [p for p in self.parameters() if p.requires_grad]

    def encoder_overrides(self, task: str) -> dict[str, Tensor]:
        """Per-task encoder tensors that replace the merged ones (block-as-task-layer option)."""
        return {}

    def task_features(self, task: str, inputs: Inputs) -> Tensor:
        return self.merged(inputs, self.encoder_overrides(task) or None)

    def task_output(self, task: str, inputs: Inputs) -> Tensor:
        return self.head(task)(self.task_features(task, inputs))

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        """Loss of one task's batch; None means 'no usable sample, make no update'."""
        raise NotImplementedError

    # --- export --------------------------------------------------------------------------------------------
    def adapters(self) -> dict[str, nn.Module]:
        return {}

    def to_result(self, history: list[dict[str, float]], provenance: dict[str, Any]) -> MergeResult:
        """Detached, self-contained result (the encoder architecture is shared, weights are copies)."""
        return MergeResult(
            method=self.name,
            tasks=list(self.tasks),
            encoder=self.merged.architecture,
            encoder_state=self.merged.merged_state(),
            heads={t: copy.deepcopy(self.head(t)).requires_grad_(False).cpu() for t in self.tasks},
            task_overrides={t: {k: v.detach().cpu().clone() for k, v in self.encoder_overrides(t).items()} for t in self.tasks
                            if self.encoder_overrides(t)},
            adapters={t: copy.deepcopy(a).requires_grad_(False).cpu() for t, a in self.adapters().items()},
            lambdas=self.merged.lambdas.detach().clamp(*self.merged.clamp_range).cpu().clone()
            if self.merged.clamp_range else self.merged.lambdas.detach().cpu().clone(),
            lambda_rows=list(self.merged.group_names),
            loss_history=list(history),
            provenance=provenance,
        )
