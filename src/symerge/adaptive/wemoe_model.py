"""The WEMoE model (Tang et al., ICML 2024): a task-arithmetic merged encoder whose MLP-like units mix their
weights per input, W(x) = W_pre + Σ_k r_k(x) τ_k, with r from a small router reading the unit's input.

Pieces (all plain `nn.Module`s, so the model pickles, deep-copies and moves like any module):
- `Router`: free vector (0 hidden layers), Linear(D, K) (1), or (h − 1) × [Linear(D, D), ReLU] then Linear(D, K);
  Linear weights N(0, 0.01²), hidden biases 0, output bias = init_lambda (FusionBench's initialisation). Applied per
  token, then averaged over the sample's tokens, ignoring padding (the attention mask of the encoder call).
- `RoutedInput`: wraps the module whose input the router reads; stores the routing weights for its unit.
- `MoELinear` / `MoEConv`: a unit's Linear / Conv layers. Per-sample weights W_b = W_pre + Σ_k r_bk τ_k are built
  once per sample (K·|W| work) and applied with a batched matmul (Linear; `_PerSampleLinear` recomputes W_b in
  backward instead of keeping it, so training holds one layer's W_b at a time) or a grouped convolution with the
  batch folded into the groups (Conv). Exact: the same as running each sample with its own merged weights.
- `WEMoEEncoder`: the whole model; its forward opens the routing context (routing weights of this call + the
  attention mask taken from the call's inputs) that the pieces above read.

Which modules are units (`discover_units`, or the `units` option: module paths, each one unit whose router reads
that module's input):
1. transformer blocks `layer.N` / `layers.N` / `resblocks.N` / `blocks.N`: the MLP — child `mlp` (HF CLIP, open_clip),
   `ffn` (DistilBERT), or `intermediate` + `output` (HF BERT / RoBERTa / ViT; the router reads `intermediate`'s
   input, `output.dense` is mixed with the same weights; its LayerNorm stays merged);
2. CNN blocks: the innermost numbered blocks (`features.N`, `layers.N`, `stages.N`, ...) with at least two Linear /
   Conv layers — MobileNetV2's inverted residuals `features.1`–`17` (1×1 expand, depthwise, 1×1 project: the MLP
   analogue, per-position channel mixing around a residual), ResNet bottlenecks, ConvNeXt blocks. MobileNetV2's
   stem `features.0` (one 3×3 conv on the pixels, the analogue of a patch embedding) and last 1×1 conv
   `features.18` (one projection before pooling, like the final projection) are single convolutions outside the
   residual stream, so they stay task-arithmetic merged, as every non-MLP tensor does in WEMoE;
3. otherwise the innermost numbered blocks that hold Linear / Conv layers (a small CNN whose blocks have one
   convolution each: every block is a unit);
4. otherwise the encoder's direct Linear / Conv children (e.g. a two-layer MLP encoder).
BatchNorm, LayerNorm, attention and every other tensor keep the task-arithmetic merge at init_lambda.
"""

from __future__ import annotations

import contextvars
import difflib
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symerge.devices import full_precision
from symerge.errors import ValidationError

MIXABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BLOCK = re.compile(r"(?:^|\.)(?:layers?|resblocks|blocks?)\.\d+$")
FEATURES = re.compile(r"(?:^|\.)features\.\d+$")
NUMBERED = re.compile(r"(?:^|\.)(?:layers?|resblocks|blocks?|features|stages?)\.\d+$")


# --- routing context ---------------------------------------------------------------------------------------------
@dataclass
class Routing:
    """What one forward of a `WEMoEEncoder` shares between its routers and its mixed layers."""

    mask: Tensor | None  # [B, T] attention mask of the call, if it had one
    weights: dict[int, Tensor] = field(default_factory=dict)  # unit -> [B, K] per sample, or [K] shared


_ROUTING: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("wemoe_routing", default=None)


def current_routing(what: str) -> Routing:
    state = _ROUTING.get()
    if state is None:
        raise RuntimeError(f"WEMoE {what} called outside a WEMoEEncoder forward (the routing context is not open)")
    return state


# --- router ------------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Routing weights [B, K] (or [K] for the input-independent 0-layer router) from a unit's input tokens."""

    def __init__(self, dim: int, num_experts: int, init_lambda: float, hidden_layers: int):
        super().__init__()
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.weights = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
            return
        layers: list[nn.Module] = []
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(dim, dim), nn.ReLU()]
        layers.append(nn.Linear(dim, num_experts))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, 0.01)
                    layer.bias.zero_()
            self.net[-1].bias.fill_(float(init_lambda))

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """tokens [B, N, D], mask [B, N] or None -> [B, K]: per-token weights averaged over the sample's tokens."""
        if self.hidden_layers == 0:
            return self.weights
        per_token = self.net(tokens)
        if mask is None:
            return per_token.mean(dim=1)
        keep = mask.to(per_token.dtype).unsqueeze(-1)
        return (per_token * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


def as_tokens(x: Tensor, channel_first: bool) -> Tensor:
    """A unit's input as [B, N, D] tokens: [B, D] -> one token; [B, T, D] as is; conv maps [B, C, *S] -> pixels."""
    if channel_first:
        return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class RoutedInput(nn.Module):
    """Runs the unit's router on the wrapped module's input, then the module itself."""

    def __init__(self, inner: nn.Module, router: Router, unit: int, name: str, dim: int, channel_first: bool,
                 batch_reduce: bool):
        super().__init__()
        self.inner = inner
        self.router = router
        self.unit, self.name, self.dim = unit, name, dim
        self.channel_first, self.batch_reduce = channel_first, batch_reduce

    def forward(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        state = current_routing(f"unit '{self.name}'")
        feature = x.shape[1] if self.channel_first else x.shape[-1]
        if feature != self.dim:
            raise ValidationError(f"WEMoE unit '{self.name}': its router reads {self.dim} features, but the unit's "
                                  f"input has shape {tuple(x.shape)}; choose other `units`")
        mask = None
        if state.mask is not None and not self.channel_first and x.dim() == 3:
            if tuple(state.mask.shape) != tuple(x.shape[:2]):
                raise ValidationError(f"WEMoE unit '{self.name}': attention mask {tuple(state.mask.shape)} does not "
                                      f"match the unit's tokens {tuple(x.shape[:2])}, so padding cannot be ignored")
            mask = state.mask
        weights = self.router(as_tokens(x, self.channel_first), mask)
        if self.batch_reduce and weights.dim() == 2:
            weights = weights.mean(dim=0)
        state.weights[self.unit] = weights
        return self.inner(*args, **kwargs)


# --- mixed layers --------------------------------------------------------------------------------------------------
def mix(pre: Tensor, tau: Tensor, weights: Tensor) -> Tensor:
    """W_pre + Σ_k w_k τ_k for shared weights [K], or per sample [B, K] -> [B, *W], in W_pre's dtype (fp32).

    Per sample it is one addmm writing [B, |W|] once (a tensordot and an add measured 2× slower: two passes over
    the B copies of W, which dominate the cost)."""
    w = weights.to(pre.dtype)
    if w.dim() == 1:
        return pre + torch.tensordot(w, tau, dims=1)
    flat = torch.addmm(pre.reshape(1, -1), w, tau.reshape(tau.shape[0], -1))
    return flat.view(w.shape[0], *pre.shape)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: the autocast dtype when autocast is on for x's device, else x's."""
    kind = x.device.type
    if kind in ("cpu", "cuda", "mps", "xpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _PerSampleLinear(torch.autograd.Function):
    """y_b = x_b W_bᵀ with W_b = W_pre + Σ_k r_bk τ_k, x [B, N, I], r [B, K] -> [B, N, O].

    Backward rebuilds W_b instead of saving it (saving would hold B·|W| per layer until backward):
    ∂L/∂x_b = ∂L/∂y_b W_b, and ∂L/∂r_bk = ⟨τ_k, ∂L/∂y_bᵀ x_b⟩.
    """

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, pre: Tensor, tau: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, r, pre, tau)
        return torch.bmm(x, mix(pre, tau, r).to(x.dtype).transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        x, r, pre, tau = ctx.saved_tensors
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad, mix(pre, tau, r).to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            outer = torch.bmm(grad.transpose(1, 2), x.to(grad.dtype)).to(tau.dtype)  # [B, O, I]
            grad_r = (outer.reshape(outer.shape[0], -1) @ tau.reshape(tau.shape[0], -1).t()).to(r.dtype)
        return grad_x, grad_r, None, None


class MixedLayer(nn.Module):
    """Shared part of `MoELinear` / `MoEConv`: pretrained weight / bias (frozen) and their τ [K, ...] as buffers."""

    def __init__(self, pre_weight: Tensor, tau_weight: Tensor, pre_bias: Tensor | None, tau_bias: Tensor | None,
                 unit: int):
        super().__init__()
        self.unit = unit
        self.weight = nn.Parameter(pre_weight, requires_grad=False)
        self.bias = nn.Parameter(pre_bias, requires_grad=False) if pre_bias is not None else None
        self.register_buffer("tau_weight", tau_weight)
        self.register_buffer("tau_bias", tau_bias)

    def routing(self, batch: int) -> Tensor:
        state = current_routing("mixed layer")
        if self.unit not in state.weights:
            raise RuntimeError(f"WEMoE unit {self.unit}: a mixed layer ran before its router")
        weights = state.weights[self.unit]
        if weights.dim() == 2 and weights.shape[0] != batch:
            raise RuntimeError(f"WEMoE unit {self.unit}: routing for {weights.shape[0]} samples, input has {batch}")
        return weights

    def mixed_bias(self, weights: Tensor) -> Tensor | None:
        if self.bias is None:
            return None
        return mix(self.bias, self.tau_bias, weights)

    def stored_params(self) -> int:
        """Task-vector entries kept at inference by this layer (K × its weight and bias)."""
        return self.tau_weight.numel() + (self.tau_bias.numel() if self.tau_bias is not None else 0)


class MoELinear(MixedLayer):
    def forward(self, x: Tensor) -> Tensor:
        weights = self.routing(x.shape[0])
        if weights.dim() == 1:  # one weight for the whole batch (0-layer router, batch_reduce)
            with full_precision(x.device):
                weight, bias = mix(self.weight, self.tau_weight, weights), self.mixed_bias(weights)
            return F.linear(x, weight, bias)
        dtype = compute_dtype(x)
        with full_precision(x.device):
            bias = self.mixed_bias(weights)
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(dtype)
            out = _PerSampleLinear.apply(flat, weights, self.weight, self.tau_weight)
            if bias is not None:
                out = out + bias.to(dtype).unsqueeze(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])


class MoEConv(MixedLayer):
    """A Conv1d / 2d / 3d with per-sample weights: the batch is folded into the channel groups, so one grouped
    convolution applies sample b's own weights to sample b only."""

    def __init__(self, conv: nn.Module, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.weight.dim() - 2]

    def forward(self, x: Tensor) -> Tensor:
        weights = self.routing(x.shape[0])
        with full_precision(x.device):
            weight = mix(self.weight, self.tau_weight, weights)
            bias = self.mixed_bias(weights)
        if weights.dim() == 1:
            return self.op(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        batch, channels = x.shape[:2]
        folded = x.reshape(1, batch * channels, *x.shape[2:])
        out = self.op(folded, weight.reshape(-1, *weight.shape[2:]), None, self.stride, self.padding, self.dilation,
                      self.groups * batch)
        out = out.reshape(batch, -1, *out.shape[2:])
        if bias is not None:
            out = out + bias.reshape(*bias.shape, *([1] * (out.dim() - 2))).to(out.dtype)
        return out


# --- the model -------------------------------------------------------------------------------------------------------
class WEMoEEncoder(nn.Module):
    """The merged encoder with weight-ensembling MoE units; called like the original encoder."""

    input_dependent_weights = True  # read by export: these weights cannot be written as one static encoder

    def __init__(self, encoder: nn.Module, units: Sequence[str], tasks: Sequence[str]):
        super().__init__()
        self.encoder = encoder
        self.units = list(units)
        self.tasks = list(tasks)

    def forward(self, *args, **kwargs):
        return self.forward_with_routing(*args, **kwargs)[0]

    def forward_with_routing(self, *args, **kwargs) -> tuple[Any, dict[str, Tensor]]:
        """The output and each unit's routing weights ([B, K], or [K] when shared by the batch), by unit path."""
        state = Routing(attention_mask(self.encoder, args, kwargs))
        token = _ROUTING.set(state)
        try:
            out = self.encoder(*args, **kwargs)
        finally:
            _ROUTING.reset(token)
        return out, {self.units[i]: w for i, w in sorted(state.weights.items())}

    def routers(self) -> list[Router]:
        return [m.router for m in self.modules() if isinstance(m, RoutedInput)]

    def mixed_layers(self) -> list[MixedLayer]:
        return [m for m in self.modules() if isinstance(m, MixedLayer)]


def attention_mask(encoder: nn.Module, args: tuple, kwargs: Mapping) -> Tensor | None:
    """The call's `attention_mask` (keyword or positional), so routers average over real tokens only."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    if not args:
        return None
    try:
        bound = inspect.signature(encoder.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return bound.arguments.get("attention_mask")


# --- which modules are units ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitSpec:
    router: str  # the module whose input the router reads
    members: tuple[str, ...]  # modules whose Linear / Conv layers are mixed with this unit's routing weights


def mixable_under(modules: Mapping[str, nn.Module], path: str) -> list[str]:
    """Paths of the Linear / Conv layers at or under `path`, in module order."""
    prefix = f"{path}."
    return [name for name, m in modules.items() if isinstance(m, MIXABLE) and (name == path or name.startswith(prefix))]


def has_mixable(modules: Mapping[str, nn.Module], path: str) -> bool:
    return bool(mixable_under(modules, path))


def transformer_units(modules: Mapping[str, nn.Module]) -> list[UnitSpec]:
    units = []
    for name, module in modules.items():
        if not BLOCK.search(name):
            continue
        children = dict(module.named_children())
        for child in ("mlp", "ffn"):
            if child in children and has_mixable(modules, f"{name}.{child}"):
                units.append(UnitSpec(f"{name}.{child}", (f"{name}.{child}",)))
                break
        else:
            if "intermediate" in children and "output" in children and has_mixable(modules, f"{name}.intermediate"):
                units.append(UnitSpec(f"{name}.intermediate", (f"{name}.intermediate", f"{name}.output")))
    return units


def innermost(blocks: list[str]) -> list[str]:
    return [b for b in blocks if not any(o != b and o.startswith(f"{b}.") for o in blocks)]


def cnn_units(modules: Mapping[str, nn.Module]) -> list[UnitSpec]:
    blocks = [name for name in modules if NUMBERED.search(name) and len(mixable_under(modules, name)) >= 2]
    return [UnitSpec(name, (name,)) for name in innermost(blocks)]


def numbered_units(modules: Mapping[str, nn.Module]) -> list[UnitSpec]:
    blocks = [name for name in modules if NUMBERED.search(name) and has_mixable(modules, name)]
    return [UnitSpec(name, (name,)) for name in innermost(blocks)]


def direct_units(modules: Mapping[str, nn.Module]) -> list[UnitSpec]:
    return [UnitSpec(name, (name,)) for name, m in modules.items()
            if name and "." not in name and isinstance(m, MIXABLE)]


DISCOVERY = (("transformer MLP", transformer_units), ("blocks of two or more Linear/Conv layers", cnn_units),
             ("numbered blocks", numbered_units), ("direct Linear/Conv children", direct_units))


def discover_units(encoder: nn.Module) -> tuple[str, list[UnitSpec]]:
    """The first discovery rule (module docstring) that finds units; a clear error when none does."""
    modules = dict(encoder.named_modules())
    for rule, find in DISCOVERY:
        units = find(modules)
        if units:
            return rule, units
    raise ValidationError(f"WEMoE found no MLP-like unit in {type(encoder).__name__} (no transformer MLP, "
                          "`features.N` block or Linear/Conv layer); name them with the `units` option "
                          "(module paths, e.g. units=['encoder.layer.0.intermediate'])")


def explicit_units(encoder: nn.Module, paths: Sequence[str]) -> list[UnitSpec]:
    """The `units` option: each path must name a module holding Linear / Conv layers; units may not overlap."""
    modules = dict(encoder.named_modules())
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ValidationError(f"units: every unit must be a non-empty module path, got {path!r}")
        if path not in modules:
            close = difflib.get_close_matches(path, [n for n in modules if n and has_mixable(modules, n)], n=3)
            raise ValidationError(f"units: {type(encoder).__name__} has no module '{path}'"
                                  + (f"; did you mean {close}?" if close else ""))
        if not has_mixable(modules, path):
            raise ValidationError(f"units: module '{path}' ({type(modules[path]).__name__}) holds no Linear/Conv layer")
    for a in paths:
        for b in paths:
            if a != b and b.startswith(f"{a}."):
                raise ValidationError(f"units: '{b}' lies inside '{a}'; units may not overlap")
    if len(set(paths)) != len(paths):
        raise ValidationError(f"units: a module is given twice in {list(paths)}")
    return [UnitSpec(path, (path,)) for path in paths]


# --- building -------------------------------------------------------------------------------------------------
def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def router_input(layer: nn.Module) -> tuple[int, bool]:
    """(features the router reads, channel-first?) from a unit's first layer."""
    if isinstance(layer, CONVS):
        return int(layer.in_channels), True
    return int(layer.in_features), False


@dataclass
class UnitTensors:
    """Per merged tensor name: its pretrained value and its τ [K, *shape] (compute dtype; may be a lazy mapping)."""

    pre: Mapping[str, Tensor]
    tau: Mapping[str, Tensor]
    num_experts: int


def mixed_layer(layer: nn.Module, path: str, tensors: UnitTensors, unit: int) -> MixedLayer | None:
    """The MoE replacement of one Linear / Conv, or None when neither its weight nor its bias was fine-tuned."""
    names = {"weight": f"{path}.weight", "bias": f"{path}.bias"}
    known = [key for key in names.values() if key in tensors.pre]
    if not known:
        return None
    if isinstance(layer, CONVS) and layer.padding_mode != "zeros":
        raise ValidationError(f"WEMoE unit layer '{path}': padding_mode '{layer.padding_mode}' is not supported")
    like = tensors.pre[known[0]]

    def pair(part: str) -> tuple[Tensor | None, Tensor | None]:
        current = getattr(layer, part)
        if current is None:
            return None, None
        if names[part] in tensors.pre:
            return tensors.pre[names[part]], tensors.tau[names[part]]
        base = current.detach().to(like.device, like.dtype)  # not fine-tuned: a zero task vector
        return base, torch.zeros((tensors.num_experts, *base.shape), dtype=base.dtype, device=base.device)

    (pre_w, tau_w), (pre_b, tau_b) = pair("weight"), pair("bias")
    if isinstance(layer, CONVS):
        return MoEConv(layer, pre_w, tau_w, pre_b, tau_b, unit=unit)
    return MoELinear(pre_w, tau_w, pre_b, tau_b, unit=unit)


def build_wemoe(encoder: nn.Module, units: Sequence[UnitSpec], tensors: UnitTensors, tasks: Sequence[str],
                init_lambda: float, hidden_layers: int, batch_reduce: bool) -> WEMoEEncoder:
    """Turn `encoder` (already task-arithmetic merged; modified in place) into a `WEMoEEncoder`."""
    modules = dict(encoder.named_modules())
    kept: list[str] = []
    for index, spec in enumerate(units):
        layers = [p for member in spec.members for p in mixable_under(modules, member)]
        replaced = 0
        for path in layers:
            new = mixed_layer(modules[path], path, tensors, len(kept))
            if new is not None:
                replace_module(encoder, path, new)
                replaced += 1
        if not replaced:
            continue  # nothing fine-tuned in this unit: it stays as merged
        dim, channel_first = router_input(modules[layers[0]])
        like = encoder.get_submodule(layers[0]).weight  # the mixed layer's: the merged tensors' device and dtype
        router = Router(dim, len(tasks), init_lambda, hidden_layers).to(like.device, like.dtype)  # fp32, fp64
        wrapped = RoutedInput(encoder.get_submodule(spec.router), router, len(kept), spec.router, dim, channel_first,
                              batch_reduce)
        replace_module(encoder, spec.router, wrapped)
        kept.append(spec.router)
    if not kept:
        raise ValidationError(f"WEMoE: no unit of {type(encoder).__name__} has a fine-tuned Linear/Conv tensor "
                              f"(units {[u.router for u in units]}); choose other `units`")
    return WEMoEEncoder(encoder, kept, tasks)
