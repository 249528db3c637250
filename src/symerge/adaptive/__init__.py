"""Test-time adaptive merging on one trainer: SyMerge, AdaMerging, Representation Surgery.

    result = adapt("symerge", encoder, heads, task_vectors, unlabeled_inputs, config=TrainerConfig(regime="nlp"))
    logits = result.predict("task_a", inputs)

The methods register themselves (`registry.register_adaptive`); importing this package imports the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.adamerging import AdaMerging
from symerge.adaptive.config import REGIMES, TrainerConfig
from symerge.adaptive.distributed import ensure_process_group, rank_device
from symerge.adaptive.experts import ExpertCache, compute_expert_cache
from symerge.adaptive.fingerprint import run_fingerprint
from symerge.adaptive.merged_encoder import MergedEncoder, default_init
from symerge.adaptive.registry import adaptive_methods, get_adaptive, register_adaptive
from symerge.adaptive.surgery import Surgery
from symerge.adaptive.symerge_method import SyMerge
from symerge.adaptive.trainer import Trainer
from symerge.adaptive.wemoe import WEMoE
from symerge.batching import Inputs
from symerge.devices import at_least_fp32, floating_dtype, module_on
from symerge.errors import ValidationError
from symerge.result import MergeResult
from symerge.taskvectors import TaskVectors

__all__ = [
    "adapt", "build_trainer", "adaptive_methods", "register_adaptive", "TrainerConfig", "REGIMES", "ExpertCache",
    "MergedEncoder", "compute_expert_cache", "Trainer", "AdaMerging", "Surgery", "SyMerge", "WEMoE",
]

LambdaInit = float | Tensor | MergeResult | str | None


def resolve_init(init: LambdaInit, num_tasks: int) -> float | Tensor:
    """λ init: a number, a tensor, another result's λ, or a static method's coefficient by name."""
    if init is None or init == "task_arithmetic":
        return default_init(num_tasks)
    if init == "weight_averaging":
        return 1.0 / num_tasks
    if isinstance(init, MergeResult):
        if init.lambdas is None:
            raise ValidationError(f"cannot initialise λ from a '{init.method}' result: it has no coefficients")
        return init.lambdas
    if isinstance(init, str):
        raise ValidationError(f"λ init '{init}' unknown; use a number, a tensor, a MergeResult, "
                              "'task_arithmetic' or 'weight_averaging'")
    return init


def build_trainer(
    method: str,
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    task_vectors: TaskVectors,
    inputs: Mapping[str, Inputs],
    *,
    config: TrainerConfig | dict[str, Any] | None = None,
    task_kinds: Mapping[str, str] | None = None,
    granularity: str | None = None,
    init: LambdaInit = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    cache: ExpertCache | None = None,
    **method_options: Any,
) -> Trainer:
    """Set up an adaptive method (expert outputs computed once here, unless `cache` is given) and its trainer."""
    spec = get_adaptive(method)
    cfg = config if isinstance(config, TrainerConfig) else TrainerConfig(**(config or {}))
    cfg = cfg.resolved(coefficients_only=spec.trains_coefficients_only(method_options))
    cfg = cfg.model_copy(update={"device": rank_device(cfg.device)})
    ensure_process_group(cfg.device)  # under torchrun: join the group (data-parallel adaptation)
    missing = [t for t in task_vectors.tasks if t not in inputs]
    if missing:
        raise ValidationError(f"no adaptation inputs for task '{missing[0]}'")
    torch.manual_seed(cfg.seed)
    lambda_init = resolve_init(init, task_vectors.num_tasks)
    chosen_granularity = granularity or spec.granularity
    merged = MergedEncoder(encoder, task_vectors, granularity=chosen_granularity, init=lambda_init, clamp=clamp).to(cfg.device)
    # Copies on the device (the caller's heads stay where they are), in fp32 at least: heads are the trained layer.
    heads_on_device = {t: module_on(h, cfg.device, dtype=at_least_fp32(floating_dtype(h))) for t, h in heads.items()}
    options = spec.options_for(cfg.regime, method_options)  # the regime's defaults (e.g. SyMerge's filter) + given
    try:  # before the expert pass: an option that does not fit the model fails without that work
        adaptive = spec.cls(merged, heads_on_device, task_kinds=task_kinds, **options).to(cfg.device)
    except TypeError as err:
        raise ValidationError(f"adaptive method '{method}': {err}") from None
    if cache is None:
        cache = compute_expert_cache(merged, heads_on_device, dict(inputs), cfg.expert_batch_size, cfg.device, cfg.progress,
                                     cfg.precision)
    fingerprint = None
    if cfg.checkpoint_path is not None:  # only a checkpointed run needs one (it hashes every weight once)
        fingerprint = run_fingerprint(
            method=method, options=options, config=cfg,
            tasks=list(task_vectors.tasks), task_kinds=adaptive.task_kinds, granularity=chosen_granularity, clamp=clamp,
            init=lambda_init, inputs=inputs, pretrained=task_vectors.pretrained, task_vectors=task_vectors.vectors,
            heads=heads, teacher_scale=cache.scale,
        )
    return Trainer(adaptive, dict(inputs), cache, cfg, method_options=options, fingerprint=fingerprint)


def adapt(
    method: str,
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    task_vectors: TaskVectors,
    inputs: Mapping[str, Inputs],
    **kwargs: Any,
) -> MergeResult:
    """Run an adaptive method end to end and return its `MergeResult` (see `build_trainer` for options)."""
    trainer = build_trainer(method, encoder, heads, task_vectors, inputs, **kwargs)
    trainer.run()
    return trainer.result()
