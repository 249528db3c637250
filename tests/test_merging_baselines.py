"""The training-free baselines (MagMax, LiNeS, Consensus/TALL, PCB, TSV-M, Iso-C, Iso-CTS, EMR) against
brute-force references computed another way, plus the properties that pin each definition.

The references never call symerge code. Element-wise methods are re-derived with python loops over tasks and
entries; PCB follows the official code's sort-based `clamp` / `normalize` on the flattened [K, D] array; the
spectral methods use `numpy.linalg.svd` in float64 exactly as the official implementations do (SVD of each task
matrix, concatenation, orthogonal polar factors from a second SVD).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import symerge.merging as merging
from symerge.errors import ValidationError
from symerge.merging import PerTaskDelta, merge, merge_delta
from symerge.merging.consensus import tall_masks
from symerge.merging.lines import depth_fractions, parse_block
from symerge.merging import select_ops
from symerge.merging.select_ops import kth_smallest
from symerge.taskvectors import TaskVectors

NEW_METHODS = ["magmax", "lines", "consensus", "pcb", "tsv", "iso_c", "iso_cts", "emr"]
ALL_STATIC = sorted(["weight_averaging", "task_arithmetic", "ties", "dare"] + NEW_METHODS)
ATOL = RTOL = 1e-5


# --------------------------------------------------------------------------------------------------------------
# A tiny BERT-like pool
# --------------------------------------------------------------------------------------------------------------

SHAPES = {
    "embeddings.word_embeddings.weight": (10, 6),
    "embeddings.position_ids": None,  # int64 buffer
    "encoder.layer.0.attention.weight": (6, 6),
    "encoder.layer.0.attention.bias": (6,),
    "encoder.layer.0.mlp.weight": (12, 6),
    "encoder.layer.1.attention.weight": (6, 6),
    "encoder.layer.1.mlp.weight": (6, 12),
    "encoder.layer.1.norm.weight": (6,),
    "encoder.layer.2.mlp.weight": (8, 6),
    "encoder.layer.2.norm.num_batches_tracked": None,  # int64 scalar buffer
    "pooler.dense.weight": (6, 6),
    "head.conv.weight": (4, 3, 2, 2),
}


def spaced_matrix(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A random matrix with well-separated singular values (so top-k subspaces are well defined)."""
    m, n = shape
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    sigma = scale * np.geomspace(3.0, 0.3, r) * rng.uniform(0.9, 1.1)
    return (u * sigma) @ v.T


def make_pool(num_tasks: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32):
    rng = np.random.default_rng(seed)
    pre: dict[str, torch.Tensor] = {}
    for key, shape in SHAPES.items():
        if key.endswith("position_ids"):
            pre[key] = torch.arange(10, dtype=torch.int64).unsqueeze(0)
        elif key.endswith("num_batches_tracked"):
            pre[key] = torch.tensor(5, dtype=torch.int64)
        else:
            pre[key] = torch.from_numpy(rng.standard_normal(shape)).float().to(dtype)
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for t in range(num_tasks):
        state = {}
        for key, value in pre.items():
            if not value.is_floating_point():
                state[key] = value + 7 + t  # experts' integer buffers differ: must never be merged
                continue
            scale = 0.5 + 0.25 * t
            if value.dim() == 2:
                tau = spaced_matrix(rng, tuple(value.shape), scale)
            else:
                tau = scale * rng.standard_normal(tuple(value.shape))
            state[key] = (value.float() + torch.from_numpy(tau).float()).to(dtype)
        experts[f"task{t}"] = state
    return pre, experts


def float_keys(pre):
    return [k for k, v in pre.items() if v.is_floating_point()]


def task_vectors_np(pre, experts):
    """τ_t per key, float32 subtraction (identical to torch's), returned as float64 arrays."""
    keys = float_keys(pre)
    return {t: {k: (e[k].float().numpy() - pre[k].float().numpy()).astype(np.float64) for k in keys}
            for t, e in experts.items()}


def assert_state_close(got, want_delta, pre, atol=ATOL, rtol=RTOL):
    """got = θ_pre + Δ for the keys of `want_delta`; every other tensor must be the pretrained one."""
    assert list(got.keys()) == list(pre.keys())
    for key, value in got.items():
        assert value.dtype == pre[key].dtype and value.shape == pre[key].shape, key
        if key in want_delta:
            want = pre[key].double().numpy() + np.asarray(want_delta[key], dtype=np.float64)
            np.testing.assert_allclose(value.double().numpy(), want, atol=atol, rtol=rtol, err_msg=key)
        else:
            assert torch.equal(value, pre[key]), key


def assert_delta_close(got, want, atol=ATOL, rtol=RTOL):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key].double().numpy(), np.asarray(want[key], dtype=np.float64),
                                   atol=atol, rtol=rtol, err_msg=key)


@pytest.fixture
def one_thread():
    """Time-sensitive tests run single-threaded: OpenMP threads spin badly on a shared, oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tv_of(pre, experts, dtype=torch.float32):
    return TaskVectors.from_state_dicts(pre, experts, dtype=dtype)


# --------------------------------------------------------------------------------------------------------------
# Brute-force references
# --------------------------------------------------------------------------------------------------------------

def ref_magmax(tau, keys, scaling):
    """Per entry, the task value with the largest |·| (the first task on ties), by loops."""
    tasks = list(tau)
    out = {}
    for key in keys:
        shape = tau[tasks[0]][key].shape
        flat = np.zeros(int(np.prod(shape)))
        for i in range(flat.size):
            best, best_abs = 0.0, -1.0
            for t in tasks:
                value = float(tau[t][key].reshape(-1)[i])
                if abs(value) > best_abs:
                    best, best_abs = value, abs(value)
            flat[i] = scaling * best
        out[key] = flat.reshape(shape)
    return out


def ref_sum(tau, keys):
    tasks = list(tau)
    return {k: sum(tau[t][k] for t in tasks) for k in keys}


def ref_consensus(tau, keys, lambdas, k, scaling):
    """m_t = |τ_t| > λ_t |Σ τ − τ_t| per element; keep entries with Σ_t m_t ≥ k; α · kept sum."""
    tasks = list(tau)
    out = {}
    for key in keys:
        shape = tau[tasks[0]][key].shape
        flat = np.zeros(int(np.prod(shape)))
        for i in range(flat.size):
            values = [float(tau[t][key].reshape(-1)[i]) for t in tasks]
            total = sum(values)
            used = sum(1 for lam, v in zip(lambdas, values) if abs(v) > lam * abs(total - v))
            flat[i] = scaling * total if used >= k else 0.0
        out[key] = flat.reshape(shape)
    return out


def ref_emr(tau, keys, rescaler_norm):
    """EMR by loops: elected sign, max agreeing magnitude, masks, rescalers, per-task updates."""
    tasks = list(tau)
    unified, masks = {}, {t: {} for t in tasks}
    for key in keys:
        shape = tau[tasks[0]][key].shape
        flat = np.zeros(int(np.prod(shape)))
        for t in tasks:
            masks[t][key] = np.zeros(flat.size, dtype=bool)
        for i in range(flat.size):
            values = [float(tau[t][key].reshape(-1)[i]) for t in tasks]
            sign = 1.0 if sum(values) > 0 else -1.0
            agreeing = [abs(v) for v in values if v * sign > 0]
            flat[i] = sign * max(agreeing) if agreeing else 0.0
            for t, v in zip(tasks, values):
                masks[t][key][i] = v * flat[i] > 0
        unified[key] = flat
    out = {}
    for t in tasks:
        num = den = 0.0
        for key in keys:
            a = np.abs(tau[t][key].reshape(-1))
            b = np.abs(unified[key] * masks[t][key])
            if rescaler_norm == "tensor_mean":
                num, den = num + a.mean(), den + b.mean()
            else:
                num, den = num + a.sum(), den + b.sum()
        lam = num / den
        out[t] = {k: (lam * unified[k] * masks[t][k]).reshape(tau[t][k].shape) for k in keys}
    return out, unified


def official_normalize(x, axis):
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    return (x - lo) / (hi - lo)


def official_clamp(x, min_ratio, max_ratio):
    d = x.shape[1]
    s = np.sort(x, axis=1)
    lo = s[:, int(d * min_ratio)][:, None]
    hi = s[:, int(d * (1 - max_ratio) - 1)][:, None]
    return np.clip(x, lo, hi)


def ref_pcb(tau, keys, ratio, scaling, clamp_ratio=0.0001):
    """The official `PCB_merge` in numpy on the flattened [K, D] task vectors, then split back per key."""
    tasks = list(tau)
    checks = np.stack([np.concatenate([tau[t][k].reshape(-1) for k in keys]) for t in tasks])
    n = checks.shape[0]
    checks_abs = official_clamp(np.abs(checks), clamp_ratio, clamp_ratio)
    clamped = np.sign(checks) * checks_abs
    self_pcb = np.exp(n * official_normalize(checks_abs, 1) ** 2)
    cross_pcb = np.tanh(checks * checks.sum(axis=0))
    scale = official_normalize(official_clamp(self_pcb * cross_pcb, 1 - ratio, 0), 1)
    merged = (clamped * scale).sum(axis=0) / np.maximum(scale.sum(axis=0), 1e-12)
    out, offset = {}, 0
    for k in keys:
        size = tau[tasks[0]][k].size
        out[k] = scaling * merged[offset:offset + size].reshape(tau[tasks[0]][k].shape)
        offset += size
    return out


def polar(a):
    p, _, qt = np.linalg.svd(a, full_matrices=False)
    return p @ qt


def ref_tsv_matrix(mats):
    num = len(mats)
    k = int(min(mats[0].shape) * (1 / num))
    us, ss, vs = [], [], []
    for mat in mats:
        u, s, vt = np.linalg.svd(mat, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k])
    u_cat, s_cat, vt_cat = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 0)
    return polar(u_cat) @ np.diag(s_cat) @ polar(vt_cat)


def ref_iso_c_matrix(mats):
    u, s, vt = np.linalg.svd(sum(mats), full_matrices=False)
    return s.mean() * (u @ vt)


def ref_iso_cts_matrix(mats, fraction):
    num = len(mats)
    total = sum(mats)
    r = min(total.shape)
    common = int(r * fraction)
    common = r - round((r - common) / num) * num
    per_task = int((r - common) / num)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vt[:common]]
    for mat in mats:
        residual = mat - u[:, :common] @ u[:, :common].T @ mat
        a, b, c = np.linalg.svd(residual, full_matrices=False)
        us.append(a[:, :per_task]), ss.append(b[:per_task]), vs.append(c[:per_task])
    s_cat = np.concatenate(ss)
    return s_cat.mean() * polar(np.concatenate(us, 1)) @ polar(np.concatenate(vs, 0))


def ref_spectral(tau, keys, matrix_fn, scaling):
    """Apply a per-matrix reference to 2-D tensors; average every other tensor (the papers' fallback)."""
    tasks = list(tau)
    out = {}
    for k in keys:
        mats = [tau[t][k] for t in tasks]
        if mats[0].ndim == 2 and min(mats[0].shape) // len(tasks) > 0:
            out[k] = scaling * matrix_fn(mats)
        else:
            out[k] = scaling * sum(mats) / len(mats)
    return out


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

def test_available_methods_lists_all_twelve():
    assert merging.available_methods() == ALL_STATIC
    assert merging.get_method("emr").per_task
    assert not any(merging.get_method(m).per_task for m in ALL_STATIC if m != "emr")


def test_documented_defaults():
    defaults = {m: merging.get_method(m).defaults for m in NEW_METHODS}
    assert defaults["magmax"] == {"scaling_coef": 0.5}
    assert defaults["lines"]["beta"] == 0.5 and defaults["lines"]["alpha"] is None
    assert defaults["lines"]["base"] == "task_arithmetic" and defaults["lines"]["outside_blocks"] == "alpha"
    assert defaults["consensus"] == {"k": 2, "tall_lambda": 0.6, "scaling_coef": 0.3, "base": "task_arithmetic",
                                     "ties_density": 0.2}
    assert defaults["pcb"] == {"pcb_ratio": 0.05, "scaling_coef": 1.2, "clamp_ratio": 0.0001}
    assert defaults["tsv"] == {"scaling_coef": 1.0}
    assert defaults["iso_c"] == {"scaling_coef": 1.0}
    assert defaults["iso_cts"] == {"scaling_coef": 1.0, "common_space_fraction": 0.8}
    assert defaults["emr"] == {"rescaler_norm": "tensor_mean"}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_unknown_option_is_rejected(method):
    pre, experts = make_pool(2, seed=1)
    with pytest.raises(ValidationError, match="no option 'bogus'"):
        merge(method, pre, experts, bogus=1)


# --------------------------------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [0.5, 1.0])
@pytest.mark.parametrize("num_tasks", [2, 4])
def test_magmax_matches_reference(num_tasks, scaling):
    pre, experts = make_pool(num_tasks, seed=num_tasks)
    tau = task_vectors_np(pre, experts)
    want = ref_magmax(tau, float_keys(pre), scaling)
    assert_state_close(merge("magmax", pre, experts, scaling_coef=scaling), want, pre)


def test_magmax_ties_go_to_the_first_task():
    pre = {"w": torch.zeros(3)}
    experts = {"a": {"w": torch.tensor([1.0, -2.0, 0.5])}, "b": {"w": torch.tensor([-1.0, 2.0, -0.7])}}
    got = merge("magmax", pre, experts, scaling_coef=1.0)["w"]
    assert got.tolist() == pytest.approx([1.0, -2.0, -0.7])


@pytest.mark.parametrize("lam,k,scaling", [(0.6, 2, 0.3), (0.2, 2, 1.0), (0.4, 1, 0.5), (0.5, 3, 0.7)])
def test_consensus_matches_reference(lam, k, scaling):
    pre, experts = make_pool(4, seed=11)
    tau = task_vectors_np(pre, experts)
    want = ref_consensus(tau, float_keys(pre), [lam] * 4, k, scaling)
    assert_state_close(merge("consensus", pre, experts, tall_lambda=lam, k=k, scaling_coef=scaling), want, pre)


def test_consensus_per_task_lambdas():
    pre, experts = make_pool(3, seed=12)
    tau = task_vectors_np(pre, experts)
    lambdas = {"task0": 0.2, "task1": 0.5, "task2": 0.9}
    want = ref_consensus(tau, float_keys(pre), [0.2, 0.5, 0.9], 2, 0.3)
    assert_state_close(merge("consensus", pre, experts, tall_lambda=lambdas), want, pre)
    assert_state_close(merge("consensus", pre, experts, tall_lambda=[0.2, 0.5, 0.9]), want, pre)
    with pytest.raises(ValidationError, match="task2"):
        merge("consensus", pre, experts, tall_lambda={"task0": 0.2, "task1": 0.5})


def test_consensus_defaults_match_reference():
    pre, experts = make_pool(3, seed=13)
    tau = task_vectors_np(pre, experts)
    assert_state_close(merge("consensus", pre, experts), ref_consensus(tau, float_keys(pre), [0.6] * 3, 2, 0.3), pre)


@pytest.mark.parametrize("ratio,scaling", [(0.05, 1.2), (0.1, 1.0), (0.3, 0.8), (1.0, 1.0)])
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_pcb_matches_official_code(num_tasks, ratio, scaling):
    pre, experts = make_pool(num_tasks, seed=20 + num_tasks)
    tau = task_vectors_np(pre, experts)
    want = ref_pcb(tau, float_keys(pre), ratio, scaling)
    assert_state_close(merge("pcb", pre, experts, pcb_ratio=ratio, scaling_coef=scaling), want, pre)


def test_pcb_clamp_ratio_matches_official_code():
    pre, experts = make_pool(3, seed=24)
    tau = task_vectors_np(pre, experts)
    want = ref_pcb(tau, float_keys(pre), 0.2, 1.0, clamp_ratio=0.05)
    assert_state_close(merge("pcb", pre, experts, pcb_ratio=0.2, scaling_coef=1.0, clamp_ratio=0.05), want, pre)


def test_pcb_matches_official_code_on_a_long_vector(monkeypatch, one_thread):
    """The sampled exact selection path of `select_ops.kth_smallest` (forced on for a 90k-entry vector)."""
    monkeypatch.setattr(select_ops, "DIRECT_BELOW", 1000)
    rng = np.random.default_rng(26)
    pre = {"w": torch.zeros(300, 300), "b": torch.zeros(300)}
    experts = {f"t{i}": {k: torch.from_numpy(rng.standard_normal(v.shape) * (0.01 + 0.01 * i)).float()
                         for k, v in pre.items()} for i in range(3)}
    tau = task_vectors_np(pre, experts)
    want = ref_pcb(tau, ["w", "b"], 0.1, 1.0)
    assert_state_close(merge("pcb", pre, experts, pcb_ratio=0.1, scaling_coef=1.0), want, pre)


@pytest.mark.parametrize("kind", ["normal", "sorted", "duplicates", "constant", "adversarial"])
def test_kth_smallest_is_exact(kind, monkeypatch, one_thread):
    monkeypatch.setattr(select_ops, "DIRECT_BELOW", 1000)  # take the sampled path on a short vector
    g = torch.Generator().manual_seed(27)
    n = 200_003
    if kind == "normal":
        rows = torch.randn(2, n, generator=g)
    elif kind == "sorted":
        rows = torch.randn(2, n, generator=g).sort(dim=1).values
    elif kind == "duplicates":
        rows = torch.randint(0, 5, (2, n), generator=g).float()
    elif kind == "constant":
        rows = torch.full((2, n), 0.25)
    else:  # the strided sample sees only the large entries: the bracket misses and the fallback must kick in
        rows = torch.zeros(2, n)
        rows[:, ::3] = 1.0
    for k in [1, 17, n // 3, n - 1000, n]:
        torch.testing.assert_close(kth_smallest(rows, k), rows.kthvalue(k, dim=1).values, atol=0, rtol=0)


def test_pcb_rejects_bad_ratio():
    pre, experts = make_pool(2, seed=25)
    with pytest.raises(ValidationError, match="pcb_ratio"):
        merge("pcb", pre, experts, pcb_ratio=0.0)


@pytest.mark.parametrize("num_tasks", [1, 2, 3])
@pytest.mark.parametrize("scaling", [1.0, 0.4])
def test_tsv_matches_numpy_svd_reference(num_tasks, scaling):
    pre, experts = make_pool(num_tasks, seed=30 + num_tasks)
    tau = task_vectors_np(pre, experts)
    want = ref_spectral(tau, float_keys(pre), ref_tsv_matrix, scaling)
    assert_state_close(merge("tsv", pre, experts, scaling_coef=scaling), want, pre)


@pytest.mark.parametrize("num_tasks", [1, 2, 4])
def test_iso_c_matches_numpy_svd_reference(num_tasks):
    pre, experts = make_pool(num_tasks, seed=40 + num_tasks)
    tau = task_vectors_np(pre, experts)
    want = ref_spectral(tau, float_keys(pre), ref_iso_c_matrix, 1.3)
    assert_state_close(merge("iso_c", pre, experts, scaling_coef=1.3), want, pre)


@pytest.mark.parametrize("num_tasks,fraction", [(2, 0.8), (3, 0.5), (2, 0.0), (4, 1.0), (1, 0.8)])
def test_iso_cts_matches_numpy_svd_reference(num_tasks, fraction):
    pre, experts = make_pool(num_tasks, seed=50 + num_tasks)
    tau = task_vectors_np(pre, experts)
    want = ref_spectral(tau, float_keys(pre), lambda mats: ref_iso_cts_matrix(mats, fraction), 0.9)
    got = merge("iso_cts", pre, experts, scaling_coef=0.9, common_space_fraction=fraction)
    assert_state_close(got, want, pre)


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_spectral_methods_match_reference_on_eight_tasks(method, shape):
    """Eight tasks, a larger layer in both orientations: the batched Gram + Rayleigh–Ritz path vs numpy SVD."""
    rng = np.random.default_rng(shape[0])
    mats = [spaced_matrix(rng, shape, 0.1 * (1 + t)).astype(np.float32).astype(np.float64) for t in range(8)]
    pre = {"w": torch.zeros(shape)}
    experts = {f"t{t}": {"w": torch.from_numpy(m).float()} for t, m in enumerate(mats)}
    ref = {"tsv": ref_tsv_matrix, "iso_c": ref_iso_c_matrix,
           "iso_cts": lambda ms: ref_iso_cts_matrix(ms, 0.8)}[method]
    got = merge_delta(method, tv_of(pre, experts))
    assert_delta_close(got, {"w": ref(mats)})


@pytest.mark.parametrize("rescaler_norm", ["tensor_mean", "global"])
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_emr_matches_reference(num_tasks, rescaler_norm):
    pre, experts = make_pool(num_tasks, seed=60 + num_tasks)
    tau = task_vectors_np(pre, experts)
    want, unified = ref_emr(tau, float_keys(pre), rescaler_norm)
    got = merge("emr", pre, experts, rescaler_norm=rescaler_norm)
    assert list(got) == list(experts)
    for task, state in got.items():
        assert_state_close(state, want[task], pre)
    delta = merge_delta("emr", tv_of(pre, experts), rescaler_norm=rescaler_norm)
    assert isinstance(delta, PerTaskDelta)
    for key, value in delta.shared.items():
        np.testing.assert_allclose(value.double().numpy().reshape(-1), unified[key], atol=ATOL, rtol=RTOL)
    masks = delta.extras["masks"]
    assert set(masks) == set(float_keys(pre))
    assert all(m.dtype == torch.bool and m.shape == (num_tasks,) + tuple(pre[k].shape) for k, m in masks.items())
    assert set(delta.extras["rescalers"]) == set(experts)


# --------------------------------------------------------------------------------------------------------------
# LiNeS
# --------------------------------------------------------------------------------------------------------------

# block index per float key of the BERT-like pool (L = 3); embeddings / pooler / head are outside the blocks
LINES_DEPTH = {
    "encoder.layer.0.attention.weight": 0, "encoder.layer.0.attention.bias": 0, "encoder.layer.0.mlp.weight": 0,
    "encoder.layer.1.attention.weight": 1, "encoder.layer.1.mlp.weight": 1, "encoder.layer.1.norm.weight": 1,
    "encoder.layer.2.mlp.weight": 2,
}


@pytest.mark.parametrize("beta", [0.5, 1.2])
@pytest.mark.parametrize("num_tasks", [2, 4])
def test_lines_task_arithmetic_matches_reference(num_tasks, beta):
    """α = 1/K for task arithmetic (‖Στ‖₁ / ‖τ_MTL‖₁ = 1); λ(ℓ) = α + β ℓ / (L − 1) on Σ τ."""
    pre, experts = make_pool(num_tasks, seed=70 + num_tasks)
    tau = task_vectors_np(pre, experts)
    alpha = 1.0 / num_tasks
    summed = ref_sum(tau, float_keys(pre))
    want = {k: v * (alpha + beta * LINES_DEPTH.get(k, 0) / 2) for k, v in summed.items()}
    assert_state_close(merge("lines", pre, experts, beta=beta), want, pre)


def test_lines_outside_blocks_by_position_and_explicit_alpha():
    pre, experts = make_pool(3, seed=74)
    tau = task_vectors_np(pre, experts)
    summed = ref_sum(tau, float_keys(pre))
    last = {"pooler.dense.weight": 2, "head.conv.weight": 2}  # post-block tensors take the last depth
    want = {k: v * (0.2 + 0.6 * {**LINES_DEPTH, **last}.get(k, 0) / 2) for k, v in summed.items()}
    got = merge("lines", pre, experts, alpha=0.2, beta=0.6, outside_blocks="by_position")
    assert_state_close(got, want, pre)


def test_lines_scaling_is_linear_in_depth_for_any_base():
    pre, experts = make_pool(3, seed=75)
    tv = tv_of(pre, experts)
    base = merge_delta("ties", tv, density=0.5, scaling_coef=1.0)
    got = merge_delta("lines", tv, beta=0.9, base="ties", base_options={"density": 0.5})
    # official α: (1/K) ‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁
    summed = sum(float(v.sum(0).abs().sum()) for v in tv.vectors.values())
    alpha = summed / sum(float(v.abs().sum()) for v in base.values()) / 3
    for key, value in got.items():
        ratio = alpha + 0.9 * LINES_DEPTH.get(key, 0) / 2
        torch.testing.assert_close(value, base[key] * ratio, atol=1e-6, rtol=1e-5)
    coefs = {LINES_DEPTH[k]: float((got[k] / base[k])[base[k] != 0].mean()) for k in LINES_DEPTH}
    assert coefs[1] - coefs[0] == pytest.approx(coefs[2] - coefs[1], rel=1e-4)
    assert coefs[0] == pytest.approx(alpha, rel=1e-4)


def test_lines_layer_index_overrides_parsing():
    pre = {"stem.w": torch.zeros(3), "a.w": torch.zeros(3), "b.w": torch.zeros(3), "c.w": torch.zeros(3)}
    experts = {"x": {k: torch.ones(3) for k in pre}, "y": {k: torch.full((3,), 3.0) for k in pre}}
    got = merge_delta("lines", tv_of(pre, experts), alpha=0.1, beta=0.8, layer_index={"a.w": 0, "b.w": 1, "c.w": 4})
    for key, depth in {"stem.w": 0, "a.w": 0, "b.w": 1, "c.w": 4}.items():
        torch.testing.assert_close(got[key], torch.full((3,), 4.0 * (0.1 + 0.8 * depth / 4)))


def test_lines_errors_without_parseable_names():
    pre = {"stem.w": torch.zeros(3), "mixer.w": torch.zeros(3)}
    experts = {"x": {k: torch.ones(3) for k in pre}}
    with pytest.raises(ValidationError, match="layer_index"):
        merge("lines", pre, experts)
    with pytest.raises(ValidationError, match="not in the model"):
        merge("lines", pre, experts, layer_index={"missing.w": 0})


def test_lines_rejects_per_task_or_recursive_base():
    pre, experts = make_pool(2, seed=76)
    for base in ("emr", "lines"):
        with pytest.raises(ValidationError, match="single-model"):
            merge("lines", pre, experts, base=base)


def test_lines_block_name_parsing():
    assert parse_block("bert.encoder.layer.11.attention.self.query.weight") == ("bert.encoder.layer", 11)
    assert parse_block("roberta.encoder.layer.3.output.dense.bias") == ("roberta.encoder.layer", 3)
    assert parse_block("vision_model.encoder.layers.7.mlp.fc1.weight") == ("vision_model.encoder.layers", 7)
    assert parse_block("model.visual.transformer.resblocks.2.attn.in_proj_weight") == (
        "model.visual.transformer.resblocks", 2)
    assert parse_block("features.10.weight") == ("features", 10)
    assert parse_block("encoder.block.4.layer.1.DenseReluDense.wi.weight") == ("encoder.block", 4)
    assert parse_block("transformer.h.5.attn.c_attn.weight") == ("transformer.h", 5)
    assert parse_block("vision_model.embeddings.patch_embedding.weight") is None
    assert parse_block("layer10.weight") is None


def test_lines_each_stack_has_its_own_depth():
    names = [f"text_model.encoder.layers.{i}.w" for i in range(4)] + \
            [f"vision_model.encoder.layers.{i}.w" for i in range(2)] + \
            ["vision_model.embeddings.patch_embedding.weight", "vision_model.post_layernorm.weight"]
    fr = depth_fractions(names, names, outside_blocks="by_position")
    assert [fr[f"text_model.encoder.layers.{i}.w"] for i in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert [fr[f"vision_model.encoder.layers.{i}.w"] for i in range(2)] == [0.0, 1.0]
    assert fr["vision_model.embeddings.patch_embedding.weight"] == 0.0
    assert fr["vision_model.post_layernorm.weight"] == 1.0
    assert depth_fractions(names, names)["vision_model.post_layernorm.weight"] == 0.0


# --------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------

def test_magmax_of_one_task_is_that_task():
    pre, experts = make_pool(1, seed=80)
    got = merge("magmax", pre, experts, scaling_coef=1.0)
    for key, value in got.items():
        want = experts["task0"][key] if value.is_floating_point() else pre[key]
        torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_iso_c_keeps_the_direction_of_a_rank_one_task_vector(shape):
    g = torch.Generator().manual_seed(81)
    u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)
    tau = 0.7 * u @ v
    pre = {"w": torch.zeros(shape)}
    got = merge_delta("iso_c", tv_of(pre, {"a": {"w": tau}}), scaling_coef=1.0)["w"]
    cosine = float((got * tau).sum() / (got.norm() * tau.norm()))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(got, tau, atol=1e-5, rtol=1e-5)  # σ̄ = σ: one component


@pytest.mark.parametrize("num_tasks,rank,shape", [(3, 2, (12, 10)), (4, 1, (9, 14)), (2, 3, (8, 8))])
def test_tsv_of_orthogonal_task_vectors_equals_task_arithmetic(num_tasks, rank, shape):
    """Mutually orthogonal row and column spaces and ranks ≤ ⌊r/K⌋: no interference, TSV-M = Σ τ_t."""
    g = torch.Generator().manual_seed(82)
    m, n = shape
    assert rank <= min(m, n) // num_tasks
    u, _ = torch.linalg.qr(torch.randn(m, num_tasks * rank, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, num_tasks * rank, generator=g))
    experts = {}
    for t in range(num_tasks):
        cols = slice(t * rank, (t + 1) * rank)
        sigma = torch.rand(rank, generator=g) + 0.5
        experts[f"t{t}"] = {"w": (u[:, cols] * sigma) @ v[:, cols].T}
    pre = {"w": torch.zeros(shape)}
    tsv = merge("tsv", pre, experts, scaling_coef=1.0)["w"]
    ta = merge("task_arithmetic", pre, experts, scaling_coef=1.0)["w"]
    torch.testing.assert_close(tsv, ta, atol=1e-5, rtol=1e-5)


def test_tsv_with_more_tasks_than_rank_averages():
    pre = {"w": torch.zeros(2, 5)}
    experts = {f"t{i}": {"w": torch.full((2, 5), float(i))} for i in range(4)}
    torch.testing.assert_close(merge("tsv", pre, experts)["w"], torch.full((2, 5), 1.5))


def test_iso_cts_with_full_common_space_is_iso_c():
    pre, experts = make_pool(3, seed=83)
    tv = tv_of(pre, experts)
    a = merge_delta("iso_cts", tv, common_space_fraction=1.0)
    b = merge_delta("iso_c", tv)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


def test_emr_with_one_task_reconstructs_it():
    pre, experts = make_pool(1, seed=84)
    got = merge("emr", pre, experts)["task0"]
    for key, value in got.items():
        want = experts["task0"][key] if value.is_floating_point() else pre[key]
        torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_tasks,lam,expected", [(2, 0.6, True), (3, 0.6, False), (3, 0.4, True), (5, 0.2, True)])
def test_tall_masks_of_identical_tasks(num_tasks, lam, expected):
    """K identical τ: |τ| > λ |Kτ − τ| ⇔ λ (K − 1) < 1, on every non-zero entry; zeros are never attributed."""
    pre, experts = make_pool(1, seed=85)
    same = {f"t{i}": {k: v.clone() for k, v in experts["task0"].items()} for i in range(num_tasks)}
    tv = tv_of(pre, same)
    masks = tall_masks(tv, tall_lambda=lam)
    for key, mask in masks.items():
        assert mask.shape == (num_tasks,) + tuple(pre[key].shape)
        assert bool((mask == ((tv.vectors[key] != 0) & expected)).all()), key
    # consensus keeps all of Σ τ = K τ when every task uses every entry, nothing otherwise
    got = merge_delta("consensus", tv, tall_lambda=lam, scaling_coef=1.0)
    for key, value in got.items():
        want = tv.vectors[key].sum(0) if expected else torch.zeros_like(value)
        torch.testing.assert_close(value, want, atol=1e-6, rtol=1e-6)


def test_consensus_k_zero_is_the_base_method():
    pre, experts = make_pool(3, seed=86)
    tv = tv_of(pre, experts)
    for base, ref in [("task_arithmetic", merge_delta("task_arithmetic", tv, scaling_coef=0.4)),
                      ("ties", merge_delta("ties", tv, density=0.2, scaling_coef=0.4, disjoint_merge="sum"))]:
        got = merge_delta("consensus", tv, k=0, scaling_coef=0.4, base=base)
        for key in got:
            torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_methods_finite_keep_buffers_and_dtypes(method, dtype):
    pre, experts = make_pool(3, seed=90, dtype=dtype)
    got = merge(method, pre, experts, storage_dtype=dtype)
    states = list(got.values()) if method == "emr" else [got]
    for state in states:
        assert list(state.keys()) == list(pre.keys())
        for key, value in state.items():
            assert value.dtype == pre[key].dtype and value.shape == pre[key].shape, key
            if value.is_floating_point():
                assert bool(torch.isfinite(value).all()), key
            else:
                assert torch.equal(value, pre[key]), key


@pytest.mark.parametrize("method", ["tsv", "iso_c", "iso_cts"])
def test_bfloat16_storage_close_to_float32(method):
    """bf16 storage only rounds τ (relative 2^-8); the spectral results are continuous in τ and follow it.

    (Selection methods — MagMax, EMR, PCB, TALL — may legitimately flip a near-tie, so they are only checked for
    finiteness / dtypes above.)
    """
    pre, experts = make_pool(3, seed=91)
    a = merge_delta(method, tv_of(pre, experts))
    b = merge_delta(method, tv_of(pre, experts, dtype=torch.bfloat16))
    for key in a:
        scale = float(a[key].abs().max()) + 1e-12
        assert float((a[key] - b[key]).abs().max()) / scale < 0.05, key


def test_zero_task_vectors_give_zero_updates():
    pre = {"w": torch.randn(6, 4), "b": torch.randn(4)}
    experts = {"a": {k: v.clone() for k, v in pre.items()}, "b": {k: v.clone() for k, v in pre.items()}}
    for method in NEW_METHODS:
        if method == "lines":
            continue  # no block names here
        got = merge(method, pre, experts)
        for state in (got.values() if method == "emr" else [got]):
            for key, value in state.items():
                assert torch.equal(value, pre[key]), (method, key)


def test_no_python_loop_over_entries_speed_smoke(one_thread):
    """A 64×256 layer with 8 tasks in well under a second per method (catches accidental per-entry loops)."""
    import time

    g = torch.Generator().manual_seed(92)
    pre = {"encoder.layer.0.w": torch.zeros(64, 256), "encoder.layer.1.w": torch.zeros(64, 256)}
    experts = {f"t{i}": {k: torch.randn(64, 256, generator=g) * 0.01 for k in pre} for i in range(8)}
    tv = tv_of(pre, experts)
    for method in NEW_METHODS:
        start = time.perf_counter()
        merge_delta(method, tv)
        assert time.perf_counter() - start < 2.0, method
