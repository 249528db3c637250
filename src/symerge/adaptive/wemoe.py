"""WEMoE (Tang et al., ICML 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture of Experts"): the
encoder is task arithmetic at `init_lambda`, except its MLP-like units, whose weights are mixed per input,
W(x) = W_pre + Σ_k r_k(x) τ_k, by a router per unit (`wemoe_model.py`). Routers alone are trained, by AdaMerging's
entropy minimisation on the unlabeled inputs; the experts' heads stay fixed.

Routing is per sample (the paper's description: a sample's prediction never depends on the rest of its batch);
`batch_reduce=True` averages the routing weights over the batch as FusionBench's configuration does. Routers are
initialised as FusionBench does (Linear weights N(0, 0.01²), output bias init_lambda), so at step 0 the routing
weights are init_lambda up to that small noise (exactly init_lambda with `router_hidden_layers=0`).

The result's encoder is the WEMoE model itself (a `WEMoEEncoder`: merged encoder, routers and the MLP task vectors
as buffers), so `result.predict` works as for every method; it cannot be written as one static encoder by
`symerge merge` / `symerge.export` (its weights depend on the input): keep it with `torch.save(result, path)` and
`torch.load(path, weights_only=False)`. Its cost is in `provenance["inference_cost"]`: trainable router
parameters, the task-vector entries kept at inference (K × the units' size) relative to the encoder, and the
measured seconds per sample against the plain merged encoder.

The suites run it as FusionBench configures it (lr 1e-4, `batch_reduce=True`, the task losses summed into one update
per iteration; `suites/text.py`, `suites/vision.py`), with the same iterations and batch as every test-time method.
On the 8-task text suite that holds task arithmetic's level (`symerge study tuning`, docs/studies/text/wemoe-tuning:
92.0 / 91.4 % normalized at 50 / 200 iterations, task arithmetic 91.1 %), while per-sample routing updated after each
task at lr 1e-3 drifted to 83.0 %. The routing weights are unbounded, so where entropy can be lowered by scaling
task vectors up (the toy problem) or by leaving the frozen BatchNorm statistics' range (the vision suite's
MobileNetV2), they drift below task arithmetic, as AdaMerging does there. Where routing is what matters
(tests/toy.py `build_routing_problem`: tasks in separate input regions, conflicting experts, LayerNorm'd features so
scaling cannot buy confidence) it beats task arithmetic at its best λ by about 0.2 accuracy, while AdaMerging does
not.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.objectives import LossTerm, entropy_loss
from symerge.adaptive.registry import get_adaptive, register_adaptive
from symerge.adaptive.wemoe_model import UnitTensors, WEMoEEncoder, build_wemoe, discover_units, explicit_units
from symerge.batching import Inputs, call_module, num_samples, take
from symerge.devices import module_on
from symerge.result import MergeResult

TIMED_SAMPLES = 16  # at most this many samples of the first task time the inference cost (3 runs each way)


# --- option checks (the config runs them before loading anything; the constructor runs them again) ----------------
def finite_number(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")


def router_depth(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("must be an integer ≥ 0 (0: one free weight vector per unit, 1: Linear, 2: Linear-ReLU-"
                         f"Linear, ...), got {value!r}")


def unit_paths(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"must be a non-empty list of module paths (or null for the default units), got {value!r}")
    for path in value:
        if not isinstance(path, str) or not path:
            raise ValueError(f"every unit must be a non-empty module path, got {path!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"a module is given twice in {list(value)}")


CHECKS: dict[str, Callable[[Any], None]] = {"init_lambda": finite_number, "router_hidden_layers": router_depth,
                                            "units": unit_paths}


# --- building -------------------------------------------------------------------------------------------------------
class StoredTau(Mapping[str, Tensor]):
    """τ [K, *shape] per merged tensor, read from the MergedEncoder's buffers when asked (a view when τ is stored in
    the compute dtype; an upcast copy of the few unit tensors when it is stored narrower)."""

    def __init__(self, merged: MergedEncoder):
        self.merged = merged
        self.index = {key: i for i, key in enumerate(merged.keys)}

    def __getitem__(self, key: str) -> Tensor:
        i = self.index[key]
        pre: Tensor = getattr(self.merged, f"pre_{i}")
        tau: Tensor = getattr(self.merged, f"tau_{i}")
        return tau.view(len(self.merged.tasks), *self.merged.shapes[key]).to(pre.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def wemoe_model(merged: MergedEncoder, units: Sequence[str] | None, init_lambda: float, router_hidden_layers: int,
                batch_reduce: bool) -> tuple[str, WEMoEEncoder]:
    """(how the units were chosen, the WEMoE model) on the merged encoder's device, in eval mode."""
    rule, specs = ("units option", explicit_units(merged.encoder, units)) if units is not None else \
        discover_units(merged.encoder)
    with torch.no_grad():
        ta = merged.scaled_params(torch.full((len(merged.tasks),), float(init_lambda)))
    encoder = module_on(merged.encoder, replace=ta)  # every tensor task-arithmetic merged; units replaced below
    pre = {key: getattr(merged, f"pre_{i}") for i, key in enumerate(merged.keys)}
    tensors = UnitTensors(pre, StoredTau(merged), len(merged.tasks))
    model = build_wemoe(encoder, specs, tensors, merged.tasks, init_lambda, router_hidden_layers, batch_reduce)
    return rule, model.eval().requires_grad_(False)


def seconds_per_sample(run: Callable[[], Any], samples: int, device: torch.device) -> float:
    """Best of two timed runs after a warm-up, per sample."""
    def once() -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    return min(once(), once()) / samples


@register_adaptive("wemoe", granularity="task", coefficients_only=True, learns_lambdas=False, checks=CHECKS)
class WEMoE(AdaptiveMethod):
    exportable = False  # `symerge merge` refuses it up front: the weights depend on the input (module docstring)

    def __init__(
        self,
        merged: MergedEncoder,
        heads: dict[str, nn.Module],
        init_lambda: float = 0.3,
        router_hidden_layers: int = 2,
        batch_reduce: bool = False,
        units: list[str] | None = None,
        **kwargs: Any,
    ):
        get_adaptive("wemoe").check_options({"init_lambda": init_lambda, "router_hidden_layers": router_hidden_layers,
                                             "units": units})
        super().__init__(merged, heads, **kwargs)
        merged.lambdas.requires_grad_(False)
        self.options = {"init_lambda": float(init_lambda), "router_hidden_layers": int(router_hidden_layers),
                        "batch_reduce": bool(batch_reduce)}
        self.unit_rule, model = wemoe_model(merged, None if units is None else list(units), init_lambda,
                                            router_hidden_layers, batch_reduce)
        # The model is not a registered submodule: the method's state (checkpoints) is its routers, registered here
        # (the same modules), and `train()` never reaches the model's encoder (no dropout while adapting).
        object.__setattr__(self, "model", model)
        self.routers = nn.ModuleList(model.routers())
        for router in self.routers:
            router.requires_grad_(True)
        extra = sum(layer.stored_params() for layer in model.mixed_layers())
        encoder_params = sum(p.numel() for p in merged.architecture.parameters())
        self.cost: dict[str, Any] = {
            "units": len(model.units),
            "router_params": sum(p.numel() for p in self.routers.parameters()),
            "extra_stored_params": extra,
            "encoder_params": encoder_params,
            "extra_params_ratio": extra / max(encoder_params, 1),
        }

    # --- hooks ----------------------------------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, Inputs], batch_size: int, device: str | torch.device) -> None:
        """Time the WEMoE model against the plain task-arithmetic encoder on the first task's first samples."""
        task = self.tasks[0]
        samples = min(num_samples(inputs[task]), batch_size, TIMED_SAMPLES)
        batch = take(inputs[task], slice(0, samples), device)
        with torch.no_grad():
            ta = self.merged.scaled_params(torch.full((len(self.tasks),), self.options["init_lambda"]))
            plain = module_on(self.merged.encoder, replace=ta).eval()
            merged_s = seconds_per_sample(lambda: call_module(plain, batch), samples, torch.device(device))
            wemoe_s = seconds_per_sample(lambda: call_module(self.model, batch), samples, torch.device(device))
        self.cost.update({"timed_samples": samples, "seconds_per_sample": wemoe_s,
                          "merged_seconds_per_sample": merged_s, "slowdown": wemoe_s / max(merged_s, 1e-12)})

    def param_groups(self, lr: float, layer_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.routers.parameters()), "lr": lr}]

    def step_parameters(self, task: str) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def task_features(self, task: str, inputs: Inputs) -> Tensor:
        return call_module(self.model, inputs)

    def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
        if self.task_kinds[task] != "classification":
            return None  # entropy is undefined for regression outputs: such tasks do not drive the routers
        return entropy_loss(self.task_output(task, inputs))

    # --- export ---------------------------------------------------------------------------------------------------
    def to_result(self, history: list[dict[str, float]], provenance: dict[str, Any]) -> MergeResult:
        """The WEMoE model as the result's encoder: a detached CPU copy (training may continue after this)."""
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        model = module_on(self.model, "cpu", replace=state).requires_grad_(False).eval()
        return MergeResult(
            method=self.name,
            tasks=list(self.tasks),
            encoder=model,
            encoder_state=dict(model.state_dict()),
            heads={t: copy.deepcopy(self.head(t)).requires_grad_(False).cpu() for t in self.tasks},
            loss_history=list(history),
            provenance={**provenance, "inference_cost": dict(self.cost),
                        "wemoe": {**self.options, "units": list(self.model.units), "unit_rule": self.unit_rule}},
        )
