"""θ^l = θ_pre^l + Σ_k λ_k^l τ_k^l, rebuilt functionally at every step so gradients reach λ.

λ is a trainable [G, K] tensor: G = number of merged tensors (granularity "tensor", the official code's
"layer-wise"), of encoder blocks ("block"), or 1 ("task", task-wise AdaMerging). Clamping to [0, 1] is applied
in the forward pass (zero gradient outside), as in the official SyMerge code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from symerge.batching import Inputs, call_module
from symerge.devices import at_least_fp32, floating_dtype, full_precision, module_on
from symerge.errors import ValidationError
from symerge.merging.stream import BLOCK_ELEMENTS
from symerge.taskvectors import TaskVectors

GRANULARITIES = ("tensor", "block", "task")
BLOCK_PATTERNS = (
    r"(?:^|\.)layers?\.(\d+)\.",  # BERT/RoBERTa encoder.layer.N, HF CLIP/ViT encoder.layers.N
    r"(?:^|\.)resblocks\.(\d+)\.",  # open_clip transformer.resblocks.N
    r"(?:^|\.)blocks?\.(\d+)\.",  # timm-style blocks.N
    r"^features\.(\d+)\.",  # torchvision CNNs
)


def default_init(num_tasks: int) -> float:
    """Paper App. A.1: λ init 0.3 for up to 8 tasks, 0.1 for more (14 / 20 tasks)."""
    return 0.3 if num_tasks <= 8 else 0.1


def numbered_block(key: str) -> str | None:
    """The numbered block a tensor belongs to ("encoder.layer.3."), or None when its name has no block number."""
    for pattern in BLOCK_PATTERNS:
        match = re.search(pattern, key)
        if match:
            return key[: match.end()]
    return None


def block_of(key: str) -> str:
    """Group name of a tensor: its numbered block if the name has one, else the tensor's module path."""
    block = numbered_block(key)
    if block is not None:
        return block
    return key.rsplit(".", 1)[0] if "." in key else key


def group_index(keys: list[str], granularity: str) -> tuple[list[str], Tensor]:
    """Names of λ's rows and, per merged tensor, the row it uses."""
    if granularity == "tensor":
        return list(keys), torch.arange(len(keys))
    if granularity == "task":
        return ["all"], torch.zeros(len(keys), dtype=torch.long)
    if granularity == "block":
        names: list[str] = []
        rows = []
        for key in keys:
            name = block_of(key)
            if name not in names:
                names.append(name)
            rows.append(names.index(name))
        return names, torch.tensor(rows, dtype=torch.long)
    raise ValidationError(f"granularity must be one of {GRANULARITIES}, got '{granularity}'")


class _StoredTauProduct(torch.autograd.Function):
    """λ [K] @ τ [K, n] for τ stored in a narrower dtype (bf16 / fp16), computed in λ's dtype (fp32).

    Why not `λ @ τ.float()`: autograd would save the fp32 copy of τ for λ's gradient, so every tensor's τ would be
    held in fp32 until backward — more memory than fp32 storage. Here only the stored τ is saved, and forward and
    backward upcast it one column block (≈ BLOCK_ELEMENTS entries) at a time. The upcast is exact, so the result
    equals `λ @ τ.float()` up to the summation order of λ's gradient.
    """

    @staticmethod
    def forward(ctx, lam: Tensor, tau: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(tau)
        ctx.compute = lam.dtype
        out = torch.empty(tau.shape[1], dtype=lam.dtype, device=tau.device)
        width = max(1, BLOCK_ELEMENTS // max(1, tau.shape[0]))
        for start in range(0, tau.shape[1], width):
            torch.mv(tau[:, start:start + width].to(lam.dtype).t(), lam, out=out[start:start + width])
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (tau,) = ctx.saved_tensors
        grad_lam = torch.zeros(tau.shape[0], dtype=ctx.compute, device=tau.device)
        width = max(1, BLOCK_ELEMENTS // max(1, tau.shape[0]))
        for start in range(0, tau.shape[1], width):
            grad_lam += tau[:, start:start + width].to(ctx.compute) @ grad[start:start + width].to(ctx.compute)
        return grad_lam, None


def weighted_tau(weights: Tensor, tau: Tensor, dtype: torch.dtype) -> Tensor:
    """Σ_k w_k τ_k in `dtype` (fp32, or fp64 for a fp64 model); τ stored narrower is upcast block by block."""
    if tau.dtype == dtype:
        return weights.to(dtype) @ tau
    return _StoredTauProduct.apply(weights.to(dtype), tau)


class MergedEncoder(nn.Module):
    """Owns λ and the (frozen) task vectors; `params()` gives the merged encoder weights as a differentiable dict."""

    def __init__(
        self,
        encoder: nn.Module,
        task_vectors: TaskVectors,
        granularity: str = "tensor",
        init: float | Tensor | None = None,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        trainable: bool = True,
    ) -> None:
        super().__init__()
        own = dict(encoder.named_parameters()) | dict(encoder.named_buffers())
        unknown = [k for k in task_vectors.keys if k not in own]
        if unknown:
            raise ValidationError(f"task vector tensor '{unknown[0]}' is not a parameter or buffer of the encoder")
        # A structural copy: moving this module to a device (or freezing it) never touches the caller's encoder;
        # `architecture` keeps the caller's module (unregistered, so it never moves) for results.
        # Computation is at least fp32 (a bf16 / fp16 model adapts in fp32; `merged_state` casts back).
        self.encoder = module_on(encoder, dtype=at_least_fp32(floating_dtype(encoder)))
        object.__setattr__(self, "architecture", encoder)
        self.tasks = list(task_vectors.tasks)
        self.keys = task_vectors.keys
        self.granularity = granularity
        self.group_names, rows = group_index(self.keys, granularity)
        self.register_buffer("rows", rows, persistent=False)
        self.clamp_range = clamp
        self.shapes = {k: tuple(task_vectors.vectors[k].shape[1:]) for k in self.keys}
        for i, key in enumerate(self.keys):
            pre = task_vectors.pretrained[key]
            compute = torch.promote_types(pre.dtype, torch.float32)
            self.register_buffer(f"pre_{i}", pre.detach().to(compute), persistent=False)
            self.register_buffer(f"tau_{i}", task_vectors.vectors[key].detach().reshape(len(self.tasks), -1), persistent=False)
        # λ lives in float32 (float64 for a float64 model, so gradient checks are exact), even under bf16 storage.
        dtype = torch.promote_types(next(iter(task_vectors.pretrained.values())).dtype, torch.float32)
        self.lambdas = nn.Parameter(self.initial_lambdas(init).to(dtype), requires_grad=trainable)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def initial_lambdas(self, init: float | Tensor | None) -> Tensor:
        shape = (len(self.group_names), len(self.tasks))
        if init is None:
            init = default_init(len(self.tasks))
        if isinstance(init, Tensor):
            value = init.detach().float()
            if value.shape == (len(self.tasks),):
                value = value.expand(shape)
            if tuple(value.shape) != shape:
                raise ValidationError(f"λ init has shape {tuple(value.shape)}, expected {shape} or ({len(self.tasks)},)")
            return value.clone()
        return torch.full(shape, float(init))

    def coefficients(self) -> Tensor:
        """λ per merged tensor, [n_tensors, K], after clamping."""
        lam = self.lambdas
        if self.clamp_range is not None:
            lam = lam.clamp(*self.clamp_range)
        return lam[self.rows]

    def params(self) -> dict[str, Tensor]:
        """Merged encoder weights θ_pre + Σ_k λ_k τ_k per merged tensor (differentiable w.r.t. λ)."""
        with full_precision(self.lambdas.device):  # θ stays fp32 under autocast; the encoder's matmuls may not
            lam = self.coefficients()
            merged: dict[str, Tensor] = {}
            for i, key in enumerate(self.keys):
                pre: Tensor = getattr(self, f"pre_{i}")
                tau: Tensor = getattr(self, f"tau_{i}")
                delta = weighted_tau(lam[i], tau, pre.dtype)  # fp32 even when τ is stored in bf16
                merged[key] = pre + delta.view(self.shapes[key])
        return merged

    def merged_state(self) -> dict[str, Tensor]:
        """A plain (detached) CPU state dict of the whole encoder with λ applied, in the encoder's dtypes."""
        with torch.no_grad():
            merged = self.params()
            dtypes = {k: v.dtype for k, v in self.architecture.state_dict().items()}
            state = {k: v.detach().to("cpu", dtypes[k], copy=True) for k, v in self.encoder.state_dict().items()}
            for key, value in merged.items():
                state[key] = value.to("cpu", dtypes[key])
        return state

    def forward(self, inputs: Inputs, overrides: Mapping[str, Tensor] | None = None) -> Tensor:
        params = self.params()
        if overrides:
            params.update(overrides)
        return call_module(self.encoder, inputs, params)

    def task_params(self, task: int | str, scale: float = 1.0) -> dict[str, Tensor]:
        """θ_pre + scale · τ_k for one task (no λ): the expert's own encoder at scale 1, for caching its outputs; a
        partial expert otherwise (paper Fig. 6a composes the teacher as θ_pre + α τ_k)."""
        index = self.tasks.index(task) if isinstance(task, str) else task
        return self.scaled_params(scale * torch.nn.functional.one_hot(torch.tensor(index), len(self.tasks)).float())

    def scaled_params(self, weights: Tensor) -> dict[str, Tensor]:
        """θ_pre + Σ_k w_k τ_k for a fixed weight vector `weights` [K] (e.g. one task vector scaled)."""
        merged: dict[str, Tensor] = {}
        with full_precision(self.lambdas.device):
            for i, key in enumerate(self.keys):
                pre: Tensor = getattr(self, f"pre_{i}")
                tau: Tensor = getattr(self, f"tau_{i}")
                merged[key] = pre + weighted_tau(weights.to(pre.device), tau, pre.dtype).view(self.shapes[key])
        return merged
