"""What determines an adaptive run's result, so a checkpoint is only ever resumed by the same run.

A fingerprint is a flat JSON-able dict: readable settings (method, options, trainer config, tasks) as values,
large data (adaptation inputs, pretrained weights, task vectors, heads, λ init) as sha256 digests.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.config import TrainerConfig
from symerge.batching import Inputs

# Trainer fields that change how (or where) a run executes, not what it computes.
EXECUTION_ONLY = {"device", "progress", "log_every", "checkpoint_every", "checkpoint_path", "resume", "expert_batch_size"}


def update_digest(digest: Any, tensors: Iterable[tuple[str, Tensor]]) -> None:
    for name, tensor in tensors:
        value = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{value.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")


def tensors_digest(tensors: Iterable[tuple[str, Tensor]]) -> str:
    digest = hashlib.sha256()
    update_digest(digest, tensors)
    return digest.hexdigest()


def inputs_digest(inputs: Inputs) -> str:
    items = [("", inputs)] if isinstance(inputs, Tensor) else sorted(inputs.items())
    return tensors_digest(items)


def module_digest(module: nn.Module) -> str:
    return tensors_digest(sorted(module.state_dict().items()))


def jsonable(value: Any) -> Any:
    """Options as stable JSON values (tensors and other objects by digest / repr)."""
    if isinstance(value, Tensor):
        return "sha256:" + tensors_digest([("", value)])
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def run_fingerprint(
    *, method: str, options: Mapping[str, Any], config: TrainerConfig, tasks: list[str], task_kinds: Mapping[str, str],
    granularity: str, clamp: Any, init: Any, inputs: Mapping[str, Inputs], pretrained: Mapping[str, Tensor],
    task_vectors: Mapping[str, Tensor], heads: Mapping[str, nn.Module], teacher_scale: float = 1.0,
) -> dict[str, Any]:
    """Flat {field: value or digest} of everything the result depends on."""
    trainer = {k: v for k, v in config.model_dump(mode="json").items() if k not in EXECUTION_ONLY}
    flat: dict[str, Any] = {
        "method": method,
        **{f"options.{k}": v for k, v in jsonable(dict(options)).items()},
        **{f"trainer.{k}": v for k, v in trainer.items()},
        "tasks": list(tasks),
        "task_kinds": jsonable(dict(task_kinds)),
        "granularity": granularity,
        "clamp": jsonable(clamp),
        "init": jsonable(init),
        "pretrained": tensors_digest(sorted(pretrained.items())),
        "task_vectors": tensors_digest(sorted(task_vectors.items())),
    }
    if teacher_scale != 1.0:  # teachers θ_pre + scale · τ_k; absent at 1.0 so earlier checkpoints still resume
        flat["teacher_scale"] = float(teacher_scale)
    for task in tasks:
        flat[f"data.{task}"] = inputs_digest(inputs[task])
        flat[f"heads.{task}"] = module_digest(heads[task])
    return flat


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'field: saved → current' for every field that differs (digests shortened)."""

    def show(value: Any) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text[:12] + "…" if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text

    keys = sorted(set(saved) | set(current))
    return [f"{k}: {show(saved.get(k, '(absent)'))} → {show(current.get(k, '(absent)'))}"
            for k in keys if saved.get(k) != current.get(k)]
