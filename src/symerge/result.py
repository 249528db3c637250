"""MergeResult: everything needed to run the merged multi-task model, from any method (static or adaptive)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from symerge.batching import Inputs, batch_indices, encode_all
from symerge.devices import floating_dtype, module_on
from symerge.errors import ValidationError


@dataclass
class MergeResult:
    """Merged encoder weights (λ applied), each task's head / task-specific layer, λ, history and provenance.

    `encoder` is the architecture; predictions substitute `encoder_state` (plus the task's overrides, e.g. a
    per-task block copy or an EMR task-specific state) functionally, so one module serves every task.
    """

    method: str
    tasks: list[str]
    encoder: nn.Module
    encoder_state: dict[str, Tensor]
    heads: dict[str, nn.Module]
    task_overrides: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    adapters: dict[str, nn.Module] = field(default_factory=dict)
    lambdas: Tensor | None = None
    lambda_rows: list[str] = field(default_factory=list)
    loss_history: list[dict[str, float]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None  # text models: turns raw strings given to predict / features into token inputs
    max_len: int = 128  # token limit used with `tokenizer` (the run's data.max_len)

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValidationError(f"unknown task '{task}'; this result has {self.tasks}")

    def task_specific_values(self) -> int:
        """Floating-point values kept per task beyond the one shared encoder and the heads (a block copy, Surgery's
        adapter, an expert's own encoder), summed over tasks: what serving every task costs over one merged model."""
        overrides = sum(v.numel() for state in self.task_overrides.values() for v in state.values()
                        if v.is_floating_point())
        adapters = sum(p.numel() for adapter in self.adapters.values() for p in adapter.parameters())
        return overrides + adapters

    def encoder_values(self) -> int:
        """Floating-point values in the shared encoder state (the unit `task_specific_values` is compared with)."""
        return sum(v.numel() for v in self.encoder_state.values() if v.is_floating_point())

    def encoder_params(self, task: str) -> dict[str, Tensor]:
        self.check_task(task)
        params = dict(self.encoder_state)
        params.update(self.task_overrides.get(task, {}))
        return params

    def as_inputs(self, inputs: Inputs | str | Sequence[str]) -> Inputs:
        """Raw text (one string or a list of strings) tokenised with the saved tokenizer and max_len; tensors as given."""
        if isinstance(inputs, str):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)):
            if not inputs or not all(isinstance(t, str) for t in inputs):
                raise ValidationError("inputs must be a tensor, a dict of tensors, or a non-empty list of strings")
            if self.tokenizer is None:
                raise ValidationError(f"this '{self.method}' result has no tokenizer, so it cannot take raw strings: "
                                      "set result.tokenizer (and result.max_len) or pass token tensors")
            from symerge.models.text import tokenize

            return tokenize(self.tokenizer, inputs, self.max_len)
        return inputs

    @torch.no_grad()
    def features(self, task: str, inputs: Inputs | Sequence[str], batch_size: int = 64,
                 device: str | torch.device = "cpu") -> Tensor:
        """Encoder output for `task` (after Surgery's adapter if any), on CPU; `inputs` may be raw strings."""
        inputs = self.as_inputs(inputs)
        encoder = module_on(self.encoder, device, replace=self.encoder_params(task)).eval()
        feats = encode_all(encoder, inputs, None, batch_size, device)
        adapter = self.adapters.get(task)
        if adapter is not None:
            adapter = module_on(adapter, device).eval()
            dtype = floating_dtype(adapter)
            feats = torch.cat([adapter(feats[i].to(device, dtype)).float().cpu()
                               for i in batch_indices(len(feats), batch_size)])
        return feats

    @torch.no_grad()
    def predict(self, task: str, inputs: Inputs | Sequence[str], batch_size: int = 64,
                device: str | torch.device = "cpu") -> Tensor:
        """Task output (logits / regression values / dense maps) on CPU; `inputs` may be raw strings (text models)."""
        head = module_on(self.heads[task], device).eval()  # copies: the result's own modules never move
        feats = self.features(task, inputs, batch_size, device)
        dtype = floating_dtype(head)  # features are fp32; a bf16 / fp16 head reads its own dtype
        return torch.cat([head(feats[index].to(device, dtype)).float().cpu()
                          for index in batch_indices(len(feats), batch_size)])

    def with_heads(self, heads: Mapping[str, nn.Module], method: str | None = None) -> "MergeResult":
        """Same encoder, other heads (head transfer: SyMerge heads on another method's encoder)."""
        return MergeResult(
            method=method or f"{self.method}+heads", tasks=list(self.tasks), encoder=self.encoder,
            encoder_state=self.encoder_state, heads=dict(heads), task_overrides=self.task_overrides,
            adapters=self.adapters, lambdas=self.lambdas, lambda_rows=self.lambda_rows,
            provenance={**self.provenance, "heads_from": "other"}, tokenizer=self.tokenizer, max_len=self.max_len,
        )
