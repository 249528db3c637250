"""ModelPool: one pretrained model, K experts fine-tuned from it, and which tensors are encoder vs task head.

The pool validates everything once, up front, and every error names the task and the tensor. It keeps the
encoder weights (what gets merged) apart from each task's head (what stays task-specific).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from symerge.errors import ValidationError, subject
from symerge.taskvectors import TaskVectors
from symerge.validation import (StateDict, check_finite, check_same_layout, check_task_names, is_lazy,
                               validate_state_dicts)

KeySelector = Sequence[str] | Callable[[str], bool]


def as_state_dict(model: nn.Module | StateDict, owner: str) -> dict[str, Tensor]:
    """Accept an `nn.Module` or a state dict; return a detached state dict."""
    if isinstance(model, nn.Module):
        return {k: v.detach() for k, v in model.state_dict().items()}
    if is_lazy(model):
        return model  # tensors stay in their files (`tensorio.LazyStateDict`); read one at a time when used
    if isinstance(model, Mapping):
        return dict(model)
    raise ValidationError(f"{owner}: expected an nn.Module or a state dict, got {type(model).__name__}")


def subset(state: StateDict, keys: Iterable[str]) -> StateDict:
    """The tensors of `state` under `keys` (a lazy view for a lazy state dict: nothing is read)."""
    if is_lazy(state):
        return state.select(keys)  # type: ignore[attr-defined]
    return {k: state[k] for k in keys}


def is_head_key(key: str, head_prefixes: Sequence[str]) -> bool:
    return any(key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".") for p in head_prefixes)


def head_width(head: StateDict) -> int | None:
    """Output width of a head: first dimension of its last tensor (the output layer's weight or bias)."""
    tensors = [t for t in head.values() if t.dim() >= 1]
    return int(tensors[-1].shape[0]) if tensors else None


@dataclass
class ModelPool:
    """Pretrained encoder, experts' encoders and per-task heads, validated.

    Build it with `ModelPool.from_models(...)` (full models / state dicts + head prefixes) or
    `ModelPool.from_parts(...)` (encoder state dicts + head modules / state dicts).
    """

    tasks: list[str]
    pretrained: dict[str, Tensor]  # or a lazy state dict (`tensorio.LazyStateDict`): read tensor by tensor
    experts: dict[str, dict[str, Tensor]]  # likewise
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    num_classes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_models(
        cls,
        pretrained: nn.Module | StateDict,
        experts: Mapping[str, nn.Module | StateDict] | Sequence[tuple[str, nn.Module | StateDict]],
        head_prefixes: Sequence[str] = (),
        num_classes: Mapping[str, int] | None = None,
    ) -> "ModelPool":
        """Full models: tensors under `head_prefixes` are each task's head, the rest is the shared encoder."""
        pairs = list(experts.items()) if isinstance(experts, Mapping) else list(experts)
        check_task_names(name for name, _ in pairs)  # validates: unique, non-empty names
        base = as_state_dict(pretrained, "pretrained")
        enc_keys = [k for k in base if not is_head_key(k, head_prefixes)]
        encoders: dict[str, dict[str, Tensor]] = {}
        heads: dict[str, dict[str, Tensor]] = {}
        for task, model in pairs:
            with subject("expert", task):
                state = as_state_dict(model, f"expert '{task}'")
                extra = [k for k in state if k not in base and not is_head_key(k, head_prefixes)]
                if extra:
                    raise ValidationError(f"expert '{task}': unexpected tensor '{extra[0]}' not in the pretrained model")
                encoders[task] = subset(state, [k for k in enc_keys if k in state])
                heads[task] = {k: state[k] for k in state if is_head_key(k, head_prefixes)}
                if head_prefixes and not heads[task]:
                    raise ValidationError(f"expert '{task}': no head tensor under prefixes {list(head_prefixes)}")
        return cls.from_parts(subset(base, enc_keys), encoders, heads, num_classes)

    @classmethod
    def from_parts(
        cls,
        pretrained_encoder: nn.Module | StateDict,
        expert_encoders: Mapping[str, nn.Module | StateDict],
        heads: Mapping[str, nn.Module | StateDict] | None = None,
        num_classes: Mapping[str, int] | None = None,
    ) -> "ModelPool":
        """Encoder weights per expert, plus optional per-task heads (modules or state dicts)."""
        tasks = check_task_names(expert_encoders.keys())
        base = as_state_dict(pretrained_encoder, "pretrained")
        encoders = {t: as_state_dict(m, f"expert '{t}'") for t, m in expert_encoders.items()}
        head_states = {t: as_state_dict(h, f"head of task '{t}'") for t, h in (heads or {}).items()}
        pool = cls(tasks=tasks, pretrained=base, experts=encoders, heads=head_states, num_classes=dict(num_classes or {}))
        pool.validate()
        return pool

    def validate(self) -> None:
        """All checks, up front: layouts, finiteness, ≥ 2 experts, heads present and of the declared width."""
        if len(self.tasks) < 2:
            raise ValidationError(f"a pool needs at least two experts, got {len(self.tasks)} ({self.tasks})")
        validate_state_dicts(self.pretrained, self.experts, min_experts=2)
        for task in self.heads:
            if task not in self.experts:
                raise ValidationError(f"head given for unknown task '{task}'; tasks: {self.tasks}")
        for task, head in self.heads.items():
            with subject("expert", task):
                check_finite(head, f"head of task '{task}'")
        for task, classes in self.num_classes.items():
            if task not in self.experts:
                raise ValidationError(f"num_classes given for unknown task '{task}'; tasks: {self.tasks}")
            if task not in self.heads:
                raise ValidationError(f"task '{task}': num_classes declared but the task has no head")
            width = head_width(self.heads[task])
            if width != classes:
                last = [k for k, t in self.heads[task].items() if t.dim() >= 1][-1]
                err = ValidationError(
                    f"task '{task}': head tensor '{last}' has output width {width}, but {classes} classes are declared"
                )
                err.about, err.task = "class_names", task
                raise err

    def task_vectors(self, dtype: torch.dtype | str = torch.float32, keys: Iterable[str] | None = None) -> TaskVectors:
        """Stacked τ over the encoder (already validated, so no second check)."""
        return TaskVectors.from_state_dicts(self.pretrained, self.experts, keys=keys, dtype=dtype, validate=False)

    def check_heads_match(self, other: Mapping[str, StateDict]) -> None:
        """Heads from elsewhere (e.g. a saved result) must match this pool's head layouts."""
        for task, head in other.items():
            if task not in self.heads:
                raise ValidationError(f"head for unknown task '{task}'")
            check_same_layout(self.heads[task], head, f"head of task '{task}'")
