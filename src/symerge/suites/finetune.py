"""Expert fine-tuning (encoder + linear head per task), cached on disk by a content hash.

The cache key hashes the pretrained weights, the training data, the hyper-parameters and the seed, so changing
any of them retrains and re-running with the same ones reuses the experts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from symerge.batching import Inputs, num_samples, take
from symerge.sampling import TaskSampler, token_lengths
from symerge.atomic import atomic_directory


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    frozen_prefixes: tuple[str, ...] = ()
    freeze_batchnorm: bool = True  # BN layers stay in eval mode (frozen running statistics) while fine-tuning
    seed: int = 0
    loss: str = "cross_entropy"  # or "l1" (regression / dense maps)

    def as_dict(self) -> dict[str, Any]:
        out = {**self.__dict__, "frozen_prefixes": list(self.frozen_prefixes)}
        if self.loss == "cross_entropy":  # the original default: keep the cache keys of existing experts valid
            out.pop("loss")
        return out


LOSSES = {
    "cross_entropy": nn.functional.cross_entropy,
    "l1": nn.functional.l1_loss,
}


@dataclass
class Expert:
    encoder_state: dict[str, Tensor]  # the fine-tuned (trainable) encoder tensors only
    head: nn.Module
    seconds: float
    cached: bool


def hash_tensors(state: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        # reshape(-1): 0-dim buffers (BatchNorm's num_batches_tracked) cannot be viewed as bytes; same bytes otherwise
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hash_inputs(inputs: Inputs, labels: Tensor) -> str:
    digest = hashlib.sha256()
    items = [("x", inputs)] if isinstance(inputs, Tensor) else sorted(inputs.items())
    for key, tensor in items:
        digest.update(key.encode())
        digest.update(tensor.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(labels.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def head_signature(head: nn.Module) -> list[Any]:
    """What the cache key records of a head: a linear head's weight shape (the original key, kept so cached
    experts stay valid), else every tensor's name and shape."""
    if isinstance(head, nn.Linear):
        return list(head.weight.shape)
    return [[name, list(t.shape)] for name, t in head.state_dict().items()]


def expert_key(model_hash: str, data_hash: str, head_shape: Sequence[Any], config: FinetuneConfig) -> str:
    blob = json.dumps({"model": model_hash, "data": data_hash, "head": list(head_shape), "cfg": config.as_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def trainable_keys(encoder: nn.Module, frozen_prefixes: Sequence[str]) -> list[str]:
    return [k for k, _ in encoder.named_parameters() if not any(k.startswith(p) for p in frozen_prefixes)]


def finetune(encoder: nn.Module, head: nn.Module, inputs: Inputs, labels: Tensor, config: FinetuneConfig,
             device: str = "cpu", desc: str = "expert", progress: bool = True) -> tuple[nn.Module, nn.Module]:
    """Fine-tune a copy of `encoder` with `head` by `config.loss` (AdamW, linear warm-up then decay)."""
    from tqdm.auto import tqdm

    if config.loss not in LOSSES:
        raise ValueError(f"fine-tuning loss must be one of {sorted(LOSSES)}, got '{config.loss}'")
    loss_fn = LOSSES[config.loss]
    torch.manual_seed(config.seed)
    model_enc = copy.deepcopy(encoder).to(device).train()
    if config.freeze_batchnorm:
        for module in model_enc.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    model_head = copy.deepcopy(head).to(device).train()
    keys = set(trainable_keys(model_enc, config.frozen_prefixes))
    for name, param in model_enc.named_parameters():
        param.requires_grad_(name in keys)
    optimizer = torch.optim.AdamW([
        {"params": [p for p in model_enc.parameters() if p.requires_grad], "lr": config.lr},
        {"params": list(model_head.parameters()), "lr": config.head_lr},
    ], weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_linear_decay(s, warmup, config.steps))
    sampler = TaskSampler(config.seed, 0, num_samples(inputs), config.batch_size, token_lengths(inputs))
    bar = tqdm(range(config.steps), desc=desc, leave=False, disable=not progress)
    for step in bar:
        index = sampler.batch(step)
        outputs = model_head(call(model_enc, take(inputs, index, device)))
        loss = loss_fn(outputs, labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    optimizer.zero_grad(set_to_none=True)  # the expert leaves like a loaded one: no last step's gradients on it
    return model_enc.eval(), model_head.eval()


def warmup_then_linear_decay(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then linear decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def call(module: nn.Module, inputs: Inputs) -> Tensor:
    return module(inputs) if isinstance(inputs, Tensor) else module(**inputs)


def expert_folder(cache_dir: Path, model_hash: str, head: nn.Module, inputs: Inputs, labels: Tensor,
                  config: FinetuneConfig) -> Path:
    """Where the expert of this pretrained model, data, head shape and recipe is cached."""
    return cache_dir / expert_key(model_hash, hash_inputs(inputs, labels), head_signature(head), config)


def load_cached_expert(folder: Path, head: nn.Module) -> Expert | None:
    """The expert stored in `folder` (`head` gives the module to load its head into), or None if none is."""
    if not (folder / "done.json").exists():
        return None
    new_head = copy.deepcopy(head)
    new_head.load_state_dict(load_file(str(folder / "head.safetensors")))
    meta = json.loads((folder / "done.json").read_text())
    return Expert(load_file(str(folder / "encoder.safetensors")), new_head.eval(), float(meta["seconds"]), True)


def train_and_store_expert(
    folder: Path, encoder: nn.Module, head: nn.Module, inputs: Inputs, labels: Tensor, config: FinetuneConfig,
    device: str = "cpu", desc: str = "expert", progress: bool = True,
) -> Expert:
    """Fine-tune and store the expert atomically in `folder`."""
    start = time.perf_counter()
    enc, new_head = finetune(encoder, head, inputs, labels, config, device, desc, progress)
    seconds = time.perf_counter() - start
    keys = trainable_keys(enc, config.frozen_prefixes)
    state = {k: v.detach().cpu().contiguous() for k, v in enc.state_dict().items() if k in keys}
    new_head = new_head.cpu()
    with atomic_directory(folder) as tmp:
        save_file(state, str(tmp / "encoder.safetensors"))
        save_file({k: v.contiguous() for k, v in new_head.state_dict().items()}, str(tmp / "head.safetensors"))
        (tmp / "done.json").write_text(json.dumps({"seconds": seconds, "config": config.as_dict()}))
    return Expert(state, new_head, seconds, False)
