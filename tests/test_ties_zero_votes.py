"""TIES exact cancellation (Σ_k τ̂_k = 0 with agreeing mass of both signs).

`trim_scope="per_tensor"` follows mergekit and PEFT (README): such entries take γ = +1 (mergekit
`sign[sign == 0] = 1`, PEFT `sign_magnitude >= 0`), whatever the tensor's majority sign.
`trim_scope="global"` follows the official TIES code: the majority sign of the elected entries over the scope.
"""

from __future__ import annotations

import pytest
import torch

from symerge.merging import merge, merge_delta
from symerge.taskvectors import TaskVectors

PRE = {"w": torch.zeros(4)}
# entry 0 cancels exactly (1 − 1); entries 1-3 elect −, so the tensor's majority sign is −
EXPERTS = {"a": {"w": torch.tensor([1.0, -1.0, -1.0, -1.0])}, "b": {"w": torch.tensor([-1.0, 0.0, 0.0, 0.0])}}


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_per_tensor_cancelled_entries_take_plus_one_like_mergekit_and_peft(disjoint):
    got = merge("ties", PRE, EXPERTS, density=1.0, scaling_coef=1.0, trim_scope="per_tensor", disjoint_merge=disjoint)
    assert got["w"].tolist() == [1.0, -1.0, -1.0, -1.0]  # γ = +1 on the cancelled entry: a's +1 is kept
    delta = merge_delta("ties", TaskVectors.from_state_dicts(PRE, EXPERTS), density=1.0, scaling_coef=1.0,
                        trim_scope="per_tensor", disjoint_merge=disjoint)
    assert delta["w"].tolist() == [1.0, -1.0, -1.0, -1.0]


def test_per_tensor_dare_ties_cancelled_entries_take_plus_one():
    got = merge("dare", PRE, EXPERTS, base="ties", drop_rate=0.0, density=1.0, scaling_coef=1.0,
                trim_scope="per_tensor")
    assert got["w"].tolist() == [1.0, -1.0, -1.0, -1.0]


def test_global_cancelled_entries_keep_the_official_majority_sign():
    got = merge("ties", PRE, EXPERTS, density=1.0, scaling_coef=1.0, trim_scope="global")
    assert got["w"].tolist() == [-1.0, -1.0, -1.0, -1.0]  # majority − : b's −1 is kept


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_fused_ties_kernel_matches_the_pure_ops(reduce, density):
    """`ties.ties_block` (fused, in place, workspace buffers) against the readable spec in `merging.ops`:
    trim by `magnitude_threshold`, `elect_sign` (+1 on zero votes), `disjoint_merge`. Values on a coarse grid,
    so exact cancellations occur."""
    from symerge.merging.ops import disjoint_merge, elect_sign, magnitude_threshold
    from symerge.merging.stream import Workspace
    from symerge.merging.ties import ties_block

    g = torch.Generator().manual_seed(0)
    tau = torch.randint(-3, 4, (4, 500), generator=g).float()
    thresholds = [magnitude_threshold(row.abs(), density) for row in tau]
    trimmed = torch.stack([row * (row.abs() >= t) if t is not None else row for row, t in zip(tau, thresholds)])
    want = disjoint_merge(trimmed, elect_sign(trimmed, 1.0), reduce) * 0.7
    column = None if all(t is None for t in thresholds) else torch.stack(
        [t if t is not None else torch.tensor(0.0) for t in thresholds]).unsqueeze(1)
    out = torch.empty(tau.shape[1])
    ties_block(tau.clone(), column, out, reduce, 0.7, Workspace())
    torch.testing.assert_close(out, want, atol=0, rtol=0)
