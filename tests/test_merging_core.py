"""Static merge methods against brute-force references computed another way, plus their properties.

The references below never call symerge code: they work on numpy arrays with python loops over tasks and
elements, and re-derive TIES from the paper (flatten the whole task vector, sort to find the top-k magnitudes,
per-element sign vote, per-element mean over agreeing tasks). Only DARE's masks come from torch, because the
reference must draw the same random numbers: one int32 `random_()` tensor of shape [K, *shape] per floating tensor,
in state-dict order, from a `torch.Generator` seeded with `seed`; an entry survives iff its draw (uniform on
[0, 2^31)) is >= ceil(p · 2^31).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import symerge.merging as merging
from symerge.merging import merge

CORE_METHODS = ["weight_averaging", "task_arithmetic", "ties", "dare"]
TIES_COMBOS = [(scope, dm) for scope in ("global", "per_tensor") for dm in ("mean", "sum")]
ATOL = 1e-6


# --------------------------------------------------------------------------------------------------------------
# Tiny random "models" as plain state dicts
# --------------------------------------------------------------------------------------------------------------

def make_pool(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, scales=None):
    """A pretrained state dict (floating tensors of several shapes + integer buffers) and `num_tasks` experts.

    Task-vector scales differ per tensor (and per task) so global and per-tensor trimming select differently.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (7, 4),
        "embed.position_ids": None,  # int64 buffer
        "block.attn.weight": (4, 4),
        "block.attn.bias": (4,),
        "block.norm.weight": (4,),
        "block.norm.running_mean": (4,),
        "block.norm.num_batches_tracked": None,  # int64 scalar buffer
        "block.mlp.weight": (6, 4),
        "out.weight": (2, 3, 2),
    }
    scales = scales or {"embed.weight": 0.05, "block.attn.weight": 1.0, "block.attn.bias": 0.3,
                        "block.norm.weight": 0.01, "block.norm.running_mean": 0.2, "block.mlp.weight": 0.5,
                        "out.weight": 2.0}
    pre: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("position_ids"):
            pre[key] = torch.arange(7, dtype=torch.int64).unsqueeze(0)
        elif key.endswith("num_batches_tracked"):
            pre[key] = torch.tensor(11, dtype=torch.int64)
        else:
            pre[key] = torch.randn(shape, generator=g).to(dtype)
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for t in range(num_tasks):
        state = {}
        for key, value in pre.items():
            if value.is_floating_point():
                noise = torch.randn(value.shape, generator=g) * scales[key] * (1.0 + 0.5 * t)
                state[key] = (value.float() + noise).to(dtype)
            else:
                state[key] = value + 100 + t  # experts' integer buffers differ: must NOT be merged
        experts[f"task{t}"] = state
    return pre, experts


def to_np(state):
    return {k: v.float().numpy().astype(np.float32) if v.is_floating_point() else v.numpy() for k, v in state.items()}


def float_keys(pre):
    return [k for k, v in pre.items() if v.is_floating_point()]


def task_vectors_np(pre_np, experts_np, keys):
    """τ_k in float32, computed elementwise like any float32 subtraction (IEEE: identical to torch's)."""
    return {t: {k: (e[k].astype(np.float32) - pre_np[k].astype(np.float32)).astype(np.float32) for k in keys}
            for t, e in experts_np.items()}


def assert_state_close(got, want_np, pre, atol=ATOL, rtol=ATOL):
    assert list(got.keys()) == list(pre.keys())
    for key, value in got.items():
        assert value.dtype == pre[key].dtype, key
        assert value.shape == pre[key].shape, key
        if key in want_np:
            np.testing.assert_allclose(value.double().numpy(), np.asarray(want_np[key], dtype=np.float64),
                                       atol=atol, rtol=rtol, err_msg=key)
        else:
            assert torch.equal(value, pre[key]), key


# --------------------------------------------------------------------------------------------------------------
# Brute-force references
# --------------------------------------------------------------------------------------------------------------

def ref_weight_averaging(pre_np, experts_np, keys):
    """θ = (1/K) Σ_k θ_k, by loops over elements and tasks (float64 accumulation)."""
    out = {}
    tasks = list(experts_np)
    for key in keys:
        flat = np.zeros(pre_np[key].size, dtype=np.float64)
        for i in range(flat.size):
            total = 0.0
            for t in tasks:
                total += float(experts_np[t][key].reshape(-1)[i])
            flat[i] = total / len(tasks)
        out[key] = flat.reshape(pre_np[key].shape)
    return out


def ref_sum_of_vectors(pre_np, tau, keys, scaling):
    """θ_pre + λ Σ_k τ_k, by loops over elements and tasks."""
    out = {}
    for key in keys:
        base = pre_np[key].reshape(-1)
        flat = np.zeros(base.size, dtype=np.float64)
        for i in range(base.size):
            total = 0.0
            for t in tau:
                total += float(tau[t][key].reshape(-1)[i])
            flat[i] = float(base[i]) + scaling * total
        out[key] = flat.reshape(pre_np[key].shape)
    return out


def ref_trim(values: np.ndarray, density: float) -> np.ndarray:
    """Keep the top int(n·density) magnitudes of a 1-D vector (sort descending; ties with the k-th are kept)."""
    n = values.size
    k = int(n * density)
    if k >= n:
        return values.copy()
    if k <= 0:
        return np.zeros_like(values)
    kth = sorted((abs(float(x)) for x in values), reverse=True)[k - 1]
    return np.array([x if abs(float(x)) >= kth else 0.0 for x in values], dtype=values.dtype)


def ref_ties(pre_np, tau, keys, density, scaling, trim_scope, disjoint):
    """TIES from the paper: trim each τ_k, elect γ = sgn(Σ_k τ̂_k) per element, merge agreeing entries.

    Zero votes (exact cancellation), global scope: the official code's "majority" sign, the sign of the number of
    positive minus negative elected entries over the whole task vector (+1 on a tie); per-tensor scope: +1, like
    mergekit / PEFT.
    """
    tasks = list(tau)
    trimmed = {t: {} for t in tasks}
    for t in tasks:
        if trim_scope == "global":
            flat = np.concatenate([tau[t][k].reshape(-1) for k in keys])
            kept = ref_trim(flat, density)
            offset = 0
            for k in keys:
                n = tau[t][k].size
                trimmed[t][k] = kept[offset:offset + n]
                offset += n
        else:
            for k in keys:
                trimmed[t][k] = ref_trim(tau[t][k].reshape(-1), density)

    def vote(k, i):
        total = sum(float(trimmed[t][k][i]) for t in tasks)
        return (total > 0) - (total < 0)

    def majority(scope_keys):
        count = sum(vote(k, i) for k in scope_keys for i in range(tau[tasks[0]][k].size))
        return 1 if count >= 0 else -1

    global_majority = majority(keys) if trim_scope == "global" else None
    out = {}
    for k in keys:
        fallback = global_majority if trim_scope == "global" else 1
        base = pre_np[k].reshape(-1)
        flat = np.zeros(base.size, dtype=np.float64)
        for i in range(base.size):
            gamma = vote(k, i) or fallback
            agreeing = [float(trimmed[t][k][i]) for t in tasks
                        if float(trimmed[t][k][i]) != 0.0 and np.sign(float(trimmed[t][k][i])) == gamma]
            if not agreeing:
                merged = 0.0
            elif disjoint == "mean":
                merged = sum(agreeing) / len(agreeing)
            else:
                merged = sum(agreeing)
            flat[i] = float(base[i]) + scaling * merged
        out[k] = flat.reshape(pre_np[k].shape)
    return out


def ref_dare_vectors(tau, keys, drop_rate, seed):
    """Regenerate DARE's masks (same generator, same order) and drop / rescale by loops over elements."""
    g = torch.Generator().manual_seed(seed)
    tasks = list(tau)
    dropped = {t: {} for t in tasks}
    level = math.ceil(drop_rate * 2 ** 31)  # survive iff draw >= level
    for k in keys:
        shape = (len(tasks),) + tau[tasks[0]][k].shape
        draws = torch.empty(shape, dtype=torch.int32).random_(generator=g).numpy()
        for ti, t in enumerate(tasks):
            src = tau[t][k].reshape(-1)
            r = draws[ti].reshape(-1)
            out = np.zeros(src.size, dtype=np.float32)
            for i in range(src.size):
                if int(r[i]) >= level:
                    out[i] = np.float32(src[i]) / np.float32(1.0 - drop_rate)
            dropped[t][k] = out.reshape(tau[t][k].shape)
    return dropped


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

def test_core_methods_registered():
    assert set(CORE_METHODS) <= set(merging.available_methods())


def test_default_options_match_papers():
    assert merging.get_method("task_arithmetic").defaults == {"scaling_coef": 0.3}
    assert merging.get_method("ties").defaults == {
        "density": 0.2, "scaling_coef": 0.3, "trim_scope": "global", "disjoint_merge": "mean"}
    dare = merging.get_method("dare").defaults
    assert dare["drop_rate"] == 0.9 and dare["base"] == "task_arithmetic"
    assert merging.get_method("weight_averaging").defaults == {}


# --------------------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_weight_averaging_matches_reference(num_tasks):
    pre, experts = make_pool(num_tasks, seed=num_tasks)
    keys = float_keys(pre)
    want = ref_weight_averaging(to_np(pre), {t: to_np(e) for t, e in experts.items()}, keys)
    assert_state_close(merge("weight_averaging", pre, experts), want, pre)


@pytest.mark.parametrize("scaling", [0.3, 1.0, -0.7])
def test_task_arithmetic_matches_reference(scaling):
    pre, experts = make_pool(4, seed=1)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    want = ref_sum_of_vectors(pre_np, tau, keys, scaling)
    assert_state_close(merge("task_arithmetic", pre, experts, scaling_coef=scaling), want, pre)


def test_task_arithmetic_default_scaling_is_0_3():
    pre, experts = make_pool(3, seed=2)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    assert_state_close(merge("task_arithmetic", pre, experts), ref_sum_of_vectors(pre_np, tau, keys, 0.3), pre)


@pytest.mark.parametrize("trim_scope,disjoint", TIES_COMBOS)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(trim_scope, disjoint, density):
    pre, experts = make_pool(4, seed=3)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    want = ref_ties(pre_np, tau, keys, density, 0.4, trim_scope, disjoint)
    got = merge("ties", pre, experts, density=density, scaling_coef=0.4, trim_scope=trim_scope,
                disjoint_merge=disjoint)
    assert_state_close(got, want, pre)


def test_ties_defaults_match_reference():
    pre, experts = make_pool(3, seed=4)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    want = ref_ties(pre_np, tau, keys, 0.2, 0.3, "global", "mean")
    assert_state_close(merge("ties", pre, experts), want, pre)


def test_ties_trim_scopes_differ_on_unevenly_scaled_tensors():
    """Sanity check that the reference tests above exercise two different trims."""
    pre, experts = make_pool(3, seed=5)
    a = merge("ties", pre, experts, trim_scope="global")
    b = merge("ties", pre, experts, trim_scope="per_tensor")
    assert not torch.allclose(a["block.attn.weight"], b["block.attn.weight"])
    # global trim keeps nothing of the small-scale tensor, per-tensor trim keeps 20 % of it
    assert torch.equal(a["embed.weight"], pre["embed.weight"])
    assert not torch.equal(b["embed.weight"], pre["embed.weight"])
    # int(4 · 0.2) = 0: per-tensor trim keeps nothing of a 4-entry tensor
    assert torch.equal(b["block.norm.weight"], pre["block.norm.weight"])


@pytest.mark.parametrize("trim_scope", ["global", "per_tensor"])
def test_ties_zero_vote_takes_majority_sign(trim_scope):
    """Exact cancellation: the official code gives the zero-vote entry the sign most elected entries have.

    Here one large negative entry outweighs two small positive ones in mass, but positive votes are the majority.
    """
    pre = {"w": torch.zeros(4)}
    experts = {"a": {"w": torch.tensor([1.0, -5.0, 1.0, 1.0])}, "b": {"w": torch.tensor([-1.0, 0.0, 0.0, 0.0])}}
    got = merge("ties", pre, experts, density=1.0, scaling_coef=1.0, trim_scope=trim_scope)["w"]
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, ["w"])
    want = ref_ties(pre_np, tau, ["w"], 1.0, 1.0, trim_scope, "mean")["w"]
    np.testing.assert_allclose(got.numpy(), want, atol=ATOL)
    assert got[0] == 1.0


def test_ties_keeps_ties_at_threshold():
    """TIES keeps every entry whose magnitude equals the k-th largest (the official `>= kthvalue` rule)."""
    pre = {"w": torch.zeros(5)}
    experts = {"a": {"w": torch.tensor([3.0, -2.0, 2.0, 1.0, 0.5])}, "b": {"w": torch.zeros(5)}}
    got = merge("ties", pre, experts, density=0.4, scaling_coef=1.0, trim_scope="per_tensor")["w"]
    assert got.tolist() == [3.0, -2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("trim_scope,disjoint", TIES_COMBOS)
@pytest.mark.parametrize("drop_rate,seed", [(0.5, 0), (0.9, 7), (0.3, 123)])
def test_dare_ties_matches_reference(trim_scope, disjoint, drop_rate, seed):
    pre, experts = make_pool(3, seed=6)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    dropped = ref_dare_vectors(tau, keys, drop_rate, seed)
    want = ref_ties(pre_np, dropped, keys, 0.5, 0.6, trim_scope, disjoint)
    got = merge("dare", pre, experts, base="ties", drop_rate=drop_rate, seed=seed, density=0.5, scaling_coef=0.6,
                trim_scope=trim_scope, disjoint_merge=disjoint)
    assert_state_close(got, want, pre)


@pytest.mark.parametrize("drop_rate,seed", [(0.5, 0), (0.9, 7), (0.3, 123)])
def test_dare_task_arithmetic_matches_reference(drop_rate, seed):
    pre, experts = make_pool(4, seed=7)
    keys = float_keys(pre)
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    want = ref_sum_of_vectors(pre_np, ref_dare_vectors(tau, keys, drop_rate, seed), keys, 0.3)
    got = merge("dare", pre, experts, drop_rate=drop_rate, seed=seed, base="task_arithmetic")
    assert_state_close(got, want, pre)


def test_dare_drops_about_drop_rate_and_is_seeded():
    pre = {"w": torch.zeros(20000)}
    experts = {"a": {"w": torch.ones(20000)}, "b": {"w": torch.full((20000,), 2.0)}}
    a = merge("dare", pre, experts, drop_rate=0.9, seed=3, scaling_coef=1.0)["w"]
    b = merge("dare", pre, experts, drop_rate=0.9, seed=3, scaling_coef=1.0)["w"]
    c = merge("dare", pre, experts, drop_rate=0.9, seed=4, scaling_coef=1.0)["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # survivors are rescaled by 1/(1-p) = 10, so the expected merged value is 1 + 2 = 3
    assert abs(float(a.mean()) - 3.0) < 0.15
    assert set(torch.unique(a).tolist()) <= {0.0, 10.0, 20.0, 30.0}


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

def test_task_arithmetic_one_expert_scaling_one_returns_expert():
    pre, experts = make_pool(1, seed=8)
    expert = experts["task0"]
    got = merge("task_arithmetic", pre, experts, scaling_coef=1.0)
    for key, value in got.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, expert[key], atol=ATOL, rtol=ATOL)
        else:
            assert torch.equal(value, pre[key])  # integer buffers come from the pretrained model


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_weight_averaging_identical_experts_returns_them(num_tasks):
    pre, experts = make_pool(1, seed=9)
    same = {f"t{i}": {k: v.clone() for k, v in experts["task0"].items()} for i in range(num_tasks)}
    got = merge("weight_averaging", pre, same)
    for key, value in got.items():
        want = same["t0"][key] if value.is_floating_point() else pre[key]
        torch.testing.assert_close(value, want, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("trim_scope,disjoint", TIES_COMBOS)
@pytest.mark.parametrize("scaling", [0.3, 1.0])
def test_ties_density_one_single_task_equals_task_arithmetic(trim_scope, disjoint, scaling):
    pre, experts = make_pool(1, seed=10)
    ties = merge("ties", pre, experts, density=1.0, scaling_coef=scaling, trim_scope=trim_scope,
                 disjoint_merge=disjoint)
    ta = merge("task_arithmetic", pre, experts, scaling_coef=scaling)
    for key in pre:
        torch.testing.assert_close(ties[key], ta[key], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("base_options", [
    {"base": "task_arithmetic", "scaling_coef": 0.7},
    *({"base": "ties", "density": 0.3, "scaling_coef": 0.5, "trim_scope": s, "disjoint_merge": d}
      for s, d in TIES_COMBOS),
])
def test_dare_drop_rate_zero_equals_base(base_options):
    pre, experts = make_pool(3, seed=11)
    options = dict(base_options)
    base = options.pop("base")
    got = merge("dare", pre, experts, drop_rate=0.0, seed=5, base=base, **options)
    want = merge(base, pre, experts, **options)
    for key in pre:
        torch.testing.assert_close(got[key], want[key], atol=0.0, rtol=0.0)


METHOD_OPTIONS = [
    ("weight_averaging", {}),
    ("task_arithmetic", {}),
    *(("ties", {"trim_scope": s, "disjoint_merge": d}) for s, d in TIES_COMBOS),
    ("dare", {"base": "task_arithmetic"}),
    *(("dare", {"base": "ties", "trim_scope": s, "disjoint_merge": d}) for s, d in TIES_COMBOS),
]
METHOD_IDS = [f"{m}-{'-'.join(map(str, o.values())) or 'default'}" for m, o in METHOD_OPTIONS]


@pytest.mark.parametrize("method,options", METHOD_OPTIONS, ids=METHOD_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_integer_buffers_preserved_no_nan(method, options, dtype):
    pre, experts = make_pool(3, seed=12, dtype=dtype)
    pre_copy = {k: v.clone() for k, v in pre.items()}
    got = merge(method, pre, experts, **options)
    assert list(got) == list(pre)
    for key, value in got.items():
        assert value.dtype == pre[key].dtype, key
        assert value.shape == pre[key].shape, key
        if value.is_floating_point():
            assert bool(torch.isfinite(value).all()), key
        else:
            assert torch.equal(value, pre[key]), key
            assert value.data_ptr() != pre[key].data_ptr(), f"{key} must be a copy"
    # inputs untouched
    for key in pre:
        assert torch.equal(pre[key], pre_copy[key])
    # the merge really happened (the merged model is not the pretrained one)
    assert not torch.equal(got["block.attn.weight"], pre["block.attn.weight"])


@pytest.mark.parametrize("method,options", METHOD_OPTIONS, ids=METHOD_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_match_float32_reference(method, options, dtype):
    """Half-precision models are merged in float32 and rounded once at the end."""
    pre, experts = make_pool(3, seed=13, dtype=dtype)
    pre32 = {k: v.float() if v.is_floating_point() else v for k, v in pre.items()}
    experts32 = {t: {k: v.float() if v.is_floating_point() else v for k, v in e.items()} for t, e in experts.items()}
    got = merge(method, pre, experts, **options)
    want = merge(method, pre32, experts32, **options)
    for key, value in got.items():
        if value.is_floating_point():
            assert torch.equal(value, want[key].to(dtype)), key


@pytest.mark.parametrize("method,options", METHOD_OPTIONS, ids=METHOD_IDS)
def test_bfloat16_storage_close_to_float32(method, options):
    pre, experts = make_pool(4, seed=14)
    f32 = merge(method, pre, experts, storage_dtype="float32", **options)
    b16 = merge(method, pre, experts, storage_dtype=torch.bfloat16, **options)
    eps = 2.0 ** -8  # bfloat16 relative precision (8 significant bits)
    # bound per element: λ_eff · Σ_k |τ_k| · eps, with λ_eff ≤ 1/(1-p) for DARE (scaling ≤ 1 for the rest)
    gain = 1.0 / (1.0 - 0.9) if method == "dare" else 1.0
    ties_like = method == "ties" or options.get("base") == "ties"
    for key in float_keys(pre):
        tau_abs = sum((experts[t][key] - pre[key]).abs() for t in experts)
        bound = gain * tau_abs * 2 * eps + 1e-6
        diff = (f32[key] - b16[key]).abs()
        if ties_like:
            # rounding to bf16 may move an entry across the top-k threshold: allow a few such entries
            assert float((diff > bound).float().mean()) <= 0.1, key
            assert bool((diff <= gain * tau_abs + 1e-6).all()), key
        else:
            assert bool((diff <= bound).all()), key


@pytest.mark.parametrize("method,options", METHOD_OPTIONS, ids=METHOD_IDS)
def test_keys_restricts_merging(method, options):
    pre, experts = make_pool(3, seed=15)
    keys = ["block.attn.weight", "out.weight", "block.norm.num_batches_tracked"]
    # experts may be partial outside `keys`: only `keys` are validated and read
    partial = {t: {k: e[k] for k in keys} for t, e in experts.items()}
    got = merge(method, pre, partial, keys=keys, **options)
    assert list(got) == list(pre)
    for key in pre:
        if key in ("block.attn.weight", "out.weight"):
            assert not torch.equal(got[key], pre[key]), key
        else:
            assert torch.equal(got[key], pre[key]), key
    # the result equals merging a model made of those tensors only
    sub_pre = {k: pre[k] for k in keys}
    sub = merge(method, sub_pre, partial, **options)
    for key in keys:
        torch.testing.assert_close(got[key], sub[key], atol=0.0, rtol=0.0)


def test_keys_restricted_ties_matches_reference():
    pre, experts = make_pool(3, seed=16)
    keys = ["embed.weight", "block.mlp.weight"]
    pre_np = to_np(pre)
    tau = task_vectors_np(pre_np, {t: to_np(e) for t, e in experts.items()}, keys)
    want = ref_ties(pre_np, tau, keys, 0.3, 0.3, "global", "mean")
    assert_state_close(merge("ties", pre, experts, keys=keys, density=0.3), want, pre)


@pytest.mark.parametrize("method,options", METHOD_OPTIONS, ids=METHOD_IDS)
def test_keys_with_only_integer_buffers_returns_pretrained(method, options):
    pre, experts = make_pool(2, seed=17)
    got = merge(method, pre, experts, keys=["block.norm.num_batches_tracked"], **options)
    for key in pre:
        assert torch.equal(got[key], pre[key]), key


def test_merge_does_not_alias_inputs():
    pre, experts = make_pool(2, seed=18)
    got = merge("task_arithmetic", pre, experts, keys=["out.weight"])
    got["embed.weight"].add_(1.0)
    got["block.norm.num_batches_tracked"].add_(1)
    assert not torch.equal(got["embed.weight"], pre["embed.weight"])
    assert int(pre["block.norm.num_batches_tracked"]) == 11


def test_merge_with_nn_module_state_dicts_and_buffers():
    """Real module state dicts (BatchNorm's int64 `num_batches_tracked`, a registered `position_ids`)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.register_buffer("position_ids", torch.arange(5).unsqueeze(0))

    torch.manual_seed(0)
    pre = Net()
    experts = {}
    for t in range(3):
        net = Net()
        net.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        net.bn.num_batches_tracked.fill_(50 + t)
        net.position_ids.add_(t)
        experts[f"t{t}"] = net.state_dict()
    for method, options in METHOD_OPTIONS:
        got = merge(method, pre.state_dict(), experts, **options)
        assert torch.equal(got["bn.num_batches_tracked"], pre.bn.num_batches_tracked)
        assert got["bn.num_batches_tracked"].dtype == torch.int64
        assert torch.equal(got["position_ids"], pre.position_ids)
        net = Net()
        net.load_state_dict(got)  # a loadable state dict


def test_merge_accepts_storage_dtype_names():
    pre, experts = make_pool(2, seed=19)
    a = merge("task_arithmetic", pre, experts, storage_dtype="bfloat16")
    b = merge("task_arithmetic", pre, experts, storage_dtype=torch.bfloat16)
    for key in pre:
        assert torch.equal(a[key], b[key])


def test_scaling_linear_in_task_arithmetic():
    """TA is linear in λ: Δ(2λ) = 2 Δ(λ)."""
    pre, experts = make_pool(3, seed=20)
    one = merge("task_arithmetic", pre, experts, scaling_coef=0.25)
    two = merge("task_arithmetic", pre, experts, scaling_coef=0.5)
    for key in float_keys(pre):
        torch.testing.assert_close(two[key] - pre[key], 2 * (one[key] - pre[key]), atol=1e-5, rtol=1e-5)


def test_ties_sum_equals_mean_times_agreeing_count():
    pre, experts = make_pool(3, seed=21)
    mean = merge("ties", pre, experts, disjoint_merge="mean", scaling_coef=1.0, density=1.0)
    total = merge("ties", pre, experts, disjoint_merge="sum", scaling_coef=1.0, density=1.0)
    for key in float_keys(pre):
        tau = torch.stack([experts[t][key] - pre[key] for t in experts])
        sign = torch.sign(tau.sum(0))
        count = (torch.sign(tau) == sign).sum(0).clamp(min=1)
        torch.testing.assert_close(total[key] - pre[key], (mean[key] - pre[key]) * count, atol=1e-5, rtol=1e-5)


def test_reference_trim_keeps_top_k():
    """The reference trim keeps exactly int(n·density) entries on distinct magnitudes."""
    values = np.array([0.1, -0.5, 0.3, 0.9, -0.2, 0.05, 0.7, -0.8, 0.6, 0.4], dtype=np.float32)
    kept = ref_trim(values, 0.3)
    assert int((kept != 0).sum()) == math.floor(10 * 0.3)
    assert sorted(np.abs(kept[kept != 0]).tolist()) == pytest.approx([0.7, 0.8, 0.9])
