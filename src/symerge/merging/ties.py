"""TIES-merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023).

Steps: (1) trim — keep the top-k% magnitudes of each task vector τ_k (`density` = k/100, paper default 0.2),
(2) elect sign — γ = sign(Σ_k τ̂_k) (summed mass), (3) disjoint merge — mean over tasks whose trimmed entry
agrees with γ, (4) θ = θ_pre + λ τ_m with λ = `scaling_coef`.

Where the peers disagree:
- `trim_scope="global"` (default, the TIES paper and its official code: top-k over the WHOLE flattened task
  vector); `"per_tensor"` trims each tensor separately (mergekit and PEFT).
- `disjoint_merge="mean"` (default, TIES paper / official code / mergekit / PEFT); `"sum"` reproduces
  FusionBench's default (sum of agreeing entries).
Entries where the summed mass is exactly zero (agreeing mass of both signs cancelling exactly): with
`trim_scope="global"` they take the majority sign, the sign of Σ γ over the whole task vector, i.e. whether more
entries elected + than − (the official code's `resolve_zero_signs(..., "majority")`; +1 on a tie); with
`"per_tensor"` they take +1, as mergekit (`sign[sign == 0] = 1`) and PEFT (`sign_magnitude >= 0`) do (issue 14:
per_tensor used to take the tensor's majority sign, which matched neither peer). Trimming keeps exactly
int(n · density) entries per task (ties at the threshold kept); the official code keeps one more.

Implementation: a separable stream (`ties_stream`). Per-tensor trimming selects each task's threshold on the
tensor's stack; global trimming first makes one pass over all tensors for the K exact global thresholds (a sampled
bracket verified by counting, `select_ops.kth_largest_abs`), then merges tensor by tensor. The majority sign for
zero votes (global scope) is only known at the end of the pass, so zero-vote entries provisionally take +1 and the
(rare) entries where that matters — agreeing mass of both signs cancelling exactly — are patched afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from symerge.errors import ValidationError
from symerge.merging.registry import Delta, register_stream
from symerge.merging.stream import TauSource, Workspace, block_ranges, stream_delta, stream_thresholds, tensor_thresholds
from symerge.taskvectors import TaskVectors


def check_ties_options(density: float, trim_scope: str, disjoint: str) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValidationError(f"ties: density must be in [0, 1], got {density}")
    if trim_scope not in ("global", "per_tensor"):
        raise ValidationError(f"ties: trim_scope must be 'global' or 'per_tensor', got '{trim_scope}'")
    if disjoint not in ("mean", "sum"):
        raise ValidationError(f"ties: disjoint_merge must be 'mean' or 'sum', got '{disjoint}'")


def ties_stream(
    source: TauSource,
    sink,
    *,
    density: float = 0.2,
    scaling_coef: float = 0.3,
    trim_scope: str = "global",
    disjoint_merge: str = "mean",
) -> None:
    """Separable TIES: writes λ · disjoint_merge(trim(τ)) of every tensor of `source` into `sink`."""
    check_ties_options(density, trim_scope, disjoint_merge)
    workspace = source.workspace
    num_tasks = source.num_tasks
    pending: list[tuple[str, object, object]] = []  # zero-vote columns whose result depends on the majority sign
    votes = 0
    thresholds = stream_thresholds(source, density) if trim_scope == "global" else None
    for key, tau in source.iterate():
        if trim_scope == "per_tensor":  # this tensor's thresholds from one pass over its blocks, then the merge
            thresholds = tensor_thresholds(tau, num_tasks, density, workspace)
        sink.open(key, source.shapes[key], tau.device)
        for start, stop in block_ranges(tau.numel, num_tasks):
            values = tau.block(start, stop)
            block_votes, ambiguous = ties_block(values, thresholds, sink.target(start, stop), disjoint_merge,
                                                scaling_coef, workspace)
            sink.commit(start, stop)
            votes += block_votes
            if ambiguous is not None:
                pending.append((key, ambiguous[0] + start, ambiguous[1]))
        sink.close()
        if trim_scope == "per_tensor":  # mergekit / PEFT: zero votes keep γ = +1, nothing to patch
            pending, votes = [], 0
    _resolve_zero_votes(sink, pending, votes, disjoint_merge, scaling_coef)


def _resolve_zero_votes(sink, pending, votes: int, disjoint: str, scaling_coef: float) -> None:
    """The majority sign of the scope is − : redo the zero-vote columns that were merged with +1."""
    if votes < 0:
        for key, index, columns in pending:
            sink.patch(key, index, ties_negative_fallback(columns, disjoint, scaling_coef))


def ties_block(tau: Tensor, thresholds: Tensor | None, out: Tensor, reduce: str, scale: float,
               workspace: Workspace) -> tuple[int, tuple[Tensor, Tensor] | None]:
    """TIES on a [K, c] block of τ (overwritten with its trimmed values); writes λ·Δ into `out` [c].

    Zero-vote columns (Σ_k τ̂_k = 0) provisionally take γ = +1. Returns the block's votes Σ sign(Σ_k τ̂_k) and, if
    some zero-vote column has entries of both signs (so γ matters), (their column indices, their τ̂ columns) for
    `ties_negative_fallback` once the majority sign over the whole trim scope is known.
    """
    rows, width = tau.shape
    device = tau.device
    if thresholds is not None:
        magnitude = torch.abs(tau, out=workspace.get("ties_abs", (rows, width), torch.float32, device))
        tau.mul_(torch.ge(magnitude, thresholds.to(device), out=magnitude))  # trim: |τ| >= t (1.0 / 0.0 mask)
    total = torch.sum(tau, dim=0, out=workspace.get("ties_total", (width,), torch.float32, device))
    sign = torch.sign(total, out=workspace.get("ties_sign", (width,), torch.float32, device))
    votes = int(sign.sum())  # exact: a sum of ±1 / 0 in float32 below 2^24 terms
    zero = torch.eq(total, 0, out=workspace.get("ties_zero", (width,), torch.float32, device))
    sign.add_(zero)
    agree = torch.mul(tau, sign, out=workspace.get("ties_agree", (rows, width), torch.float32, device))
    agree.clamp_min_(0)  # |τ̂_k| where τ̂_k agrees with γ, else 0
    torch.sum(agree, dim=0, out=out)
    if reduce == "mean":
        count = torch.sum(agree.sign_(), dim=0, out=workspace.get("ties_count", (width,), torch.float32, device))
        out.div_(count.clamp_min_(1))
    ambiguous = None
    if float(zero.mul_(out).max()) > 0:  # zero vote but agreeing mass: entries of both signs cancelled exactly
        index = torch.nonzero(zero).squeeze(1)
        ambiguous = (index, tau.index_select(1, index))
    out.mul_(sign).mul_(scale)
    return votes, ambiguous


def ties_negative_fallback(columns: Tensor, reduce: str, scale: float) -> Tensor:
    """λ·Δ of zero-vote columns (trimmed τ̂, [K, m]) with γ = −1: the same operations as `ties_block`."""
    sign = torch.full((columns.shape[1],), -1.0, device=columns.device)
    agree = torch.mul(columns, sign).clamp_min_(0)
    out = agree.sum(dim=0)
    if reduce == "mean":
        out.div_(agree.sign_().sum(dim=0).clamp_min_(1))
    return out.mul_(sign).mul_(scale)


def ties_delta(tv: TaskVectors, density: float, scaling_coef: float, trim_scope: str, disjoint: str) -> Delta:
    """The TIES update Δ = λ · disjoint_merge(trim(τ)) for every merged tensor."""
    return stream_delta(ties_stream, tv, density=density, scaling_coef=scaling_coef, trim_scope=trim_scope,
                        disjoint_merge=disjoint)


ties = register_stream("ties", ties_stream,
                       "TIES-merging; see the module docstring for the options (k = density, λ = scaling_coef).")
