"""Task vectors τ_k = θ_k − θ_pre, stacked per tensor as [K, *shape] so a merge is one reduction per tensor.

`TaskVectors` materialises every stack (what adaptive merging and the spectral methods need). The streaming engine
(`merging.stream`: τ sources that hand out one tensor, and within it one column block, at a time) computes τ
identically: in float32 (float64 for float64 tensors), rounded once to the storage dtype, handed to the merge in
float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.validation import StateDict, layout, validate_state_dicts

STORAGE_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its short name ('float32', 'bfloat16')."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in STORAGE_DTYPES:
        raise ValidationError(f"unknown storage dtype '{dtype}'; choose one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[dtype]


def mergeable_keys(pretrained: StateDict, keys: Iterable[str] | None = None) -> list[str]:
    """Floating-point tensors are merged; integer / bool buffers are always copied from the pretrained model."""
    candidates = list(keys) if keys is not None else list(pretrained.keys())
    return [k for k in candidates if layout(pretrained, k)[1].is_floating_point]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype of a tensor's τ: float32, or float64 for float64 tensors (never round a model down)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Materialised task vectors
# --------------------------------------------------------------------------------------------------------------

@dataclass
class TaskVectors:
    """Stacked task vectors of K experts over the merged (floating) tensors of one model.

    `pretrained` keeps every tensor of the base model (original dtypes); `vectors[key]` holds [K, *shape] in
    `storage_dtype`. Arithmetic runs in float32 (float64 for float64 tensors); results are cast back to each tensor's
    own dtype.
    """

    tasks: list[str]
    pretrained: dict[str, Tensor]
    vectors: dict[str, Tensor]

    @classmethod
    def from_state_dicts(
        cls,
        pretrained: StateDict,
        experts: Mapping[str, StateDict],
        keys: Iterable[str] | None = None,
        dtype: torch.dtype | str = torch.float32,
        validate: bool = True,
    ) -> "TaskVectors":
        """Build τ for `keys` (default: every floating tensor of `pretrained`)."""
        storage = resolve_dtype(dtype)
        key_list = list(keys) if keys is not None else None
        if validate:
            validate_state_dicts(pretrained, experts, key_list)
        base = {k: v.detach() for k, v in pretrained.items()}
        tasks = list(experts.keys())
        vectors: dict[str, Tensor] = {}
        for key in mergeable_keys(base, key_list):
            compute = compute_dtype(base[key].dtype)
            ref = base[key].to(compute)
            # written row by row into one preallocated stack: no per-task temporaries, no torch.stack copy
            stack = torch.empty((len(tasks), *ref.shape), dtype=storage, device=ref.device)
            for k, task in enumerate(tasks):
                # computed in the compute dtype (the inputs promote to it), rounded once to the storage dtype
                torch.sub(experts[task][key].detach(), ref, out=stack[k])
            vectors[key] = stack
        return cls(tasks=tasks, pretrained=base, vectors=vectors)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def keys(self) -> list[str]:
        return list(self.vectors.keys())

    @property
    def storage_dtype(self) -> torch.dtype:
        return next(iter(self.vectors.values())).dtype if self.vectors else torch.float32

    def numel(self) -> int:
        """Parameters per task vector."""
        return sum(v[0].numel() for v in self.vectors.values())

    def items_float(self) -> Iterator[tuple[str, Tensor]]:
        """(key, [K, *shape] float32) pairs, converting lazily one tensor at a time."""
        for key, vec in self.vectors.items():
            yield key, vec.float()

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        """τ of one task as a plain dict (float32)."""
        index = self.tasks.index(task) if isinstance(task, str) else task
        return {k: v[index].float() for k, v in self.vectors.items()}

    def map(self, fn: Callable[[str, Tensor], Tensor]) -> "TaskVectors":
        """New TaskVectors with `fn(key, stacked_float32)` applied per tensor (same pretrained, same storage)."""
        storage = self.storage_dtype
        vectors = {k: fn(k, v).to(storage) for k, v in self.items_float()}
        return TaskVectors(tasks=list(self.tasks), pretrained=self.pretrained, vectors=vectors)

    def subset(self, tasks: Iterable[str]) -> "TaskVectors":
        """Task vectors of a subset of tasks, in the given order."""
        names = list(tasks)
        index = [self.tasks.index(t) for t in names]
        return TaskVectors(tasks=names, pretrained=self.pretrained, vectors={k: v[index] for k, v in self.vectors.items()})

    def apply(self, delta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ = θ_pre + Δ for the keys in `delta`; every other tensor is a copy of the pretrained one."""
        merged: dict[str, Tensor] = {}
        for key, base in self.pretrained.items():
            if key in delta:
                compute = compute_dtype(base.dtype)  # never round a float64 model to float32
                merged[key] = (base.to(compute) + delta[key].to(compute)).to(base.dtype)
            else:
                merged[key] = base.clone()
        return merged

    def expert_state(self, task: str | int) -> dict[str, Tensor]:
        """Reconstruct an expert's state dict θ_pre + τ_k (up to storage precision)."""
        return self.apply(self.task_vector(task))
