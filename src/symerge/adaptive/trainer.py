"""One loop for every adaptive method (paper App. A.1).

Per iteration the tasks are visited in a seeded random order; for each task one batch of its unlabeled inputs,
the loss, and — in the default "sequential" mode — an immediate optimizer step with one shared Adam state.
"summed" accumulates every task's gradient (backward per task, so still one graph at a time) and steps once.
A non-finite loss or gradient skips the step with a warning. Checkpoints are written atomically, hold CPU tensors
only, carry the run's fingerprint (`fingerprint.py`) and are resumed once, when the trainer is built.
Under torchrun each rank takes its slice of every task batch and the task's gradients are summed over ranks before
its optimizer step (`distributed.py`), so N processes give the single-process result; only rank 0 writes.
Under `precision` bf16 / fp16 the task losses run in autocast (fp16 with a GradScaler); λ, the task-specific
layers and the optimizer state stay fp32.
"""

from __future__ import annotations

import math
import pickle
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from symerge.adaptive.base import AdaptiveMethod
from symerge.atomic import atomic_save
from symerge.adaptive.config import TrainerConfig
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.distributed import current_world, shard, sum_gradients, sum_scalars
from symerge.adaptive.fingerprint import differences
from symerge.batching import Inputs, num_samples, take
from symerge.devices import autocast, grad_scaler
from symerge.errors import ValidationError
from symerge.result import MergeResult
from symerge.sampling import make_samplers, task_order

StepCallback = Callable[[int, str, "Tensor | None"], None]


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


class Trainer:
    """Runs an `AdaptiveMethod` over cached expert outputs."""

    def __init__(self, method: AdaptiveMethod, inputs: dict[str, Inputs], cache: ExpertCache, config: TrainerConfig,
                 method_options: dict[str, Any] | None = None, fingerprint: dict[str, Any] | None = None):
        for task in method.tasks:
            if task not in inputs:
                raise ValidationError(f"no adaptation inputs for task '{task}'")
            if num_samples(inputs[task]) == 0:
                raise ValidationError(f"task '{task}' has no adaptation inputs")
        self.method = method
        self.method_options = dict(method_options or {})  # recorded in the result's provenance
        self.inputs = inputs
        self.fingerprint = dict(fingerprint or {})
        self.world = current_world()
        start = time.perf_counter()
        with autocast(config.device, config.precision):
            method.prepare(inputs, config.expert_batch_size, config.device)
        self.cache = cache
        self.config = config
        self.scaler = grad_scaler(config.device, config.precision)
        self.optimizer = torch.optim.Adam(method.param_groups(config.lr, config.layer_lr), betas=(0.9, 0.999))
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.samplers = make_samplers(config.seed, [inputs[t] for t in method.tasks], config.batch_size)
        self.history: list[dict[str, float]] = []
        self.start_step = 0
        self.skipped_steps = 0
        self.seconds = time.perf_counter() - start  # adaptation wall time (prepare + loop), evaluation excluded
        self.resumed_from: int | None = None
        path = config.checkpoint_path
        if config.resume and path is not None and Path(path).exists():
            self.load_checkpoint(Path(path))  # once, here: later run() calls continue, they never rewind
            self.resumed_from = self.start_step

    def result(self) -> "MergeResult":
        """The trained method as a self-contained `MergeResult` with provenance (callable at any step: the suites
        evaluate on the way)."""
        cfg = self.config
        provenance = {
            "method": self.method.name,
            "options": dict(self.method_options),
            "seed": cfg.seed,
            "config": cfg.model_dump(mode="json"),
            "granularity": self.method.merged.granularity,
            "expert_runs_per_sample": self.cache.runs_per_sample(),
            "expert_seconds": self.cache.seconds,
            "adapt_seconds": self.seconds,
            "skipped_steps": self.skipped_steps,
        }
        return self.method.to_result(self.history, provenance)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        """Everything needed to continue, as CPU tensors (readable on a machine without the training device)."""
        state = {
            "step": step, "method": self.method.name, "tasks": self.method.tasks,
            "method_state": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history, "skipped_steps": self.skipped_steps, "torch_rng": torch.get_rng_state(),
            "seed": self.config.seed, "fingerprint": self.fingerprint,
        }
        return tree_map(lambda v: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v, state)

    def save_checkpoint(self, step: int) -> None:
        assert self.config.checkpoint_path is not None
        if self.world.is_main:  # every rank holds the same state; one writer
            atomic_save(self.state(step), Path(self.config.checkpoint_path))

    def load_checkpoint(self, path: Path) -> None:
        state = read_checkpoint(path)
        if state["method"] != self.method.name or state["tasks"] != self.method.tasks:
            raise ValidationError(
                f"checkpoint '{path}' is for method '{state['method']}' on tasks {state['tasks']}, "
                f"not '{self.method.name}' on {self.method.tasks}"
            )
        if state["seed"] != self.config.seed:
            raise ValidationError(f"checkpoint '{path}' was made with seed {state['seed']}, not {self.config.seed}")
        changed = differences(state.get("fingerprint") or {}, self.fingerprint)
        if changed:
            raise ValidationError(
                f"checkpoint '{path}' was made by a different run; refusing to resume it. What differs "
                f"(checkpoint → now): {'; '.join(changed[:8])}{' …' if len(changed) > 8 else ''}. "
                "Restore those settings, or delete the checkpoint to start over."
            )
        self.method.load_state_dict(state["method_state"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.skipped_steps = int(state["skipped_steps"])
        torch.set_rng_state(state["torch_rng"])
        self.start_step = int(state["step"])

    # --- the loop -------------------------------------------------------------------------------------------
    def task_step(self, step: int, task: str, callback: StepCallback | None) -> float | None:
        """Forward + backward of one task's batch (this rank's slice); returns the global loss or None if skipped."""
        cfg = self.config
        task_index = self.method.tasks.index(task)
        index = shard(self.samplers[task_index].batch(step), self.world)
        term = None
        if len(index):
            batch = take(self.inputs[task], index, cfg.device)
            with autocast(cfg.device, cfg.precision):
                term = self.method.task_loss(task, batch, index, self.cache)
        local = float(term.value.detach()) if term is not None else 0.0
        local_units = term.units if term is not None else 0
        finite = math.isfinite(local)
        units, total, bad = sum_scalars([local_units, local * local_units if finite else 0.0, 0.0 if finite else 1.0],
                                        self.world)
        value: float | None = None
        if bad:
            warnings.warn(f"step {step}, task '{task}': non-finite loss; update skipped", stacklevel=2)
        elif units > 0:
            value = total / units if self.world.active else local
            if term is not None:  # each rank's mean weighted by its share of the units: the global mean's gradient
                loss = term.value * (local_units / units) if self.world.active else term.value
                self.scaler.scale(loss).backward()
        del term
        if callback is not None:
            callback(step, task, None if value is None else torch.tensor(value))
        return value

    def apply_update(self, step: int, what: str, task: str | None = None) -> bool:
        """Optimizer step if the accumulated gradients are finite; always clears gradients.

        Gradients of `task`'s trainable tensors (all of them for the summed update) are first summed over ranks.
        Under fp16 the gradients are unscaled first; an overflow then only lowers the loss scale (no warning).
        """
        sum_gradients(self.method.step_parameters(task) if task is not None else self.params, self.world)
        scaled = self.scaler.is_enabled()
        if scaled:
            self.scaler.unscale_(self.optimizer)
        ok = grads_finite(self.params)
        if scaled:
            self.scaler.step(self.optimizer)  # skips the step itself when a gradient overflowed
            self.scaler.update()
        elif ok:
            self.optimizer.step()
        else:
            warnings.warn(f"step {step} ({what}): non-finite gradient; update skipped", stacklevel=2)
        self.optimizer.zero_grad(set_to_none=True)
        return ok

    def run(self, stop_after: int | None = None, callback: StepCallback | None = None) -> list[dict[str, float]]:
        """Train from `start_step` to `steps` (or stop early after `stop_after` iterations, for tests / budgets)."""
        from tqdm.auto import tqdm

        cfg = self.config
        end = cfg.steps if stop_after is None else min(cfg.steps, self.start_step + stop_after)
        self.method.train()
        self.method.merged.encoder.eval()  # no dropout / BN updates in the shared encoder
        for head in self.method.heads.values():
            head.eval()
        start_time = time.perf_counter()
        bar = tqdm(range(self.start_step, end), desc=f"{self.method.name}", disable=not (cfg.progress and self.world.is_main),
                   leave=False)
        for step in bar:
            losses: dict[str, float] = {}
            for k in task_order(cfg.seed, step, len(self.method.tasks)):
                task = self.method.tasks[k]
                value = self.task_step(step, task, callback)
                if cfg.update == "sequential":
                    if value is None or not self.apply_update(step, f"task '{task}'", task):
                        self.skipped_steps += 1
                        self.optimizer.zero_grad(set_to_none=True)
                if value is not None:
                    losses[task] = value
            if cfg.update == "summed" and not self.apply_update(step, "summed"):
                self.skipped_steps += 1
            mean = sum(losses.values()) / len(losses) if losses else float("nan")
            self.history.append({"step": step + 1, "loss": mean, **{f"loss/{t}": v for t, v in losses.items()}})
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{mean:.4f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                self.save_checkpoint(step + 1)
        self.start_step = end
        self.seconds += time.perf_counter() - start_time
        return self.history


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's state (tensors only, never arbitrary objects), or one clear error if it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValidationError(f"checkpoint '{path}' cannot be read (truncated or corrupt: {reason[:160]}); "
                              "delete it to start over") from None
    if not isinstance(state, dict) or "method_state" not in state:
        raise ValidationError(f"checkpoint '{path}' is not a symerge adaptation checkpoint")
    return state
