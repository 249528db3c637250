"""The streaming merge engine: `merge()` on state dicts (τ computed block by block) must equal the same method on
materialised `TaskVectors`, and the exact selection behind TIES thresholds must equal `kthvalue` on every path
(sampled bracket + band, radix fallback, zeros, ties), whatever the block size."""

from __future__ import annotations

import pytest
import torch

from symerge.merging import merge, merge_task_vectors, select_ops, stream
from symerge.merging.stream import StateDictTau
from symerge.taskvectors import TaskVectors

SEPARABLE = [
    ("task_arithmetic", {}),
    ("weight_averaging", {}),
    ("magmax", {}),
    *(("ties", {"trim_scope": s, "disjoint_merge": d, "density": p})
      for s in ("global", "per_tensor") for d in ("mean", "sum") for p in (0.2, 0.9)),
    ("dare", {"drop_rate": 0.8, "seed": 4}),
    *(("dare", {"base": "ties", "trim_scope": s, "density": 0.3, "drop_rate": 0.5, "seed": 9})
      for s in ("global", "per_tensor")),
]


def make_pool(kind: str = "normal", num_tasks: int = 4, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (40, 30), "a.bias": (40,), "steps": None, "b.weight": (9, 3, 5, 5), "c.weight": (700,)}
    pre = {k: torch.arange(3) if s is None else torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    experts = {}
    for t in range(num_tasks):
        state = {}
        for key, value in pre.items():
            if not value.is_floating_point():
                state[key] = value + t
                continue
            if kind == "quantized":  # many equal magnitudes, exact cancellations, more negative votes
                noise = torch.randint(-3, 2, value.shape, generator=g).float() * 0.5
            else:
                noise = torch.randn(value.shape, generator=g) * (0.1 + 0.05 * t) * (5.0 if key == "c.weight" else 1.0)
            state[key] = (value.float() + noise).to(dtype)
        experts[f"t{t}"] = state
    return pre, experts


@pytest.fixture(params=["default", "tiny_blocks", "band_everywhere", "radix_everywhere"])
def engine(request, monkeypatch):
    """Run each test under several engine settings that change blocks and selection paths, never results."""
    if request.param == "tiny_blocks":
        monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 37)
    if request.param in ("band_everywhere", "radix_everywhere"):
        monkeypatch.setattr(stream, "DIRECT_SELECT", 16)
        monkeypatch.setattr(stream, "TENSOR_SAMPLE", 64)
        monkeypatch.setattr(select_ops, "STREAM_SAMPLE", 256)
    if request.param == "radix_everywhere":  # every bracket misses: the exact radix fallback decides
        monkeypatch.setattr(select_ops, "bracket", lambda sample, *_: (
            torch.full((sample.shape[0],), float("inf")), torch.full((sample.shape[0],), float("inf"))))
    return request.param


@pytest.mark.parametrize("kind", ["normal", "quantized"])
@pytest.mark.parametrize("method,options", SEPARABLE, ids=lambda x: x if isinstance(x, str) else
                         "-".join(map(str, x.values())) or "default")
def test_streamed_merge_equals_task_vector_path_and_default_engine(engine, kind, method, options, monkeypatch):
    pre, experts = make_pool(kind)
    streamed = merge(method, pre, experts, **options)
    tv = TaskVectors.from_state_dicts(pre, experts)
    materialised = merge_task_vectors(method, tv, **options)
    for key in pre:
        torch.testing.assert_close(streamed[key], materialised[key], atol=0, rtol=0)
    monkeypatch.undo()  # the default engine
    reference = merge(method, pre, experts, **options)
    for key in pre:
        torch.testing.assert_close(streamed[key], reference[key], atol=1e-6, rtol=1e-6)


def test_zero_votes_take_the_global_majority_across_tensors_and_blocks(engine):
    """Cancellations in one tensor, majority decided by another tensor visited later."""
    pre = {"first": torch.zeros(6), "second": torch.zeros(50)}
    experts = {
        "a": {"first": torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0, 0.0]), "second": -torch.ones(50)},
        "b": {"first": torch.tensor([-1.0, 2.0, -3.0, 0.0, 0.0, 0.0]), "second": torch.zeros(50)},
    }
    got = merge("ties", pre, experts, density=1.0, scaling_coef=1.0)
    # votes: first = 0 + 0 + 0 + 1 = +1, second = −50: majority −, so cancelled entries take the negative side
    assert got["first"].tolist() == [-1.0, -2.0, -3.0, 0.5, 0.0, 0.0]
    per_tensor = merge("ties", pre, experts, density=1.0, scaling_coef=1.0, trim_scope="per_tensor")
    assert per_tensor["first"].tolist() == [1.0, 2.0, 3.0, 0.5, 0.0, 0.0]  # its own scope: majority +


@pytest.mark.parametrize("kind", ["normal", "sorted", "duplicates", "zeros", "constant", "periodic", "tiny"])
@pytest.mark.parametrize("density", [0.001, 0.2, 0.5, 0.999])
def test_kth_largest_abs_is_exact(kind, density, monkeypatch):
    g = torch.Generator().manual_seed(3)
    rows, n = 3, 6_007
    if kind == "normal":
        data = torch.randn(rows, n, generator=g)
    elif kind == "sorted":
        data = torch.randn(rows, n, generator=g).sort(dim=1).values
    elif kind == "duplicates":
        data = torch.randint(-4, 5, (rows, n), generator=g).float()
    elif kind == "zeros":  # DARE-like: most entries exactly zero
        data = torch.randn(rows, n, generator=g) * (torch.rand(rows, n, generator=g) < 0.1)
    elif kind == "constant":
        data = torch.full((rows, n), -0.25)
    elif kind == "periodic":  # a strided sample would only see the large entries
        data = torch.full((rows, n), 1e-3)
        data[:, ::7] = 5.0
    else:  # subnormal magnitudes
        data = torch.randn(rows, n, generator=g) * 1e-42
    kept = max(1, int(n * density))
    want = data.abs().kthvalue(n - kept + 1, dim=1).values
    width = 1000
    blocks = lambda: (data[:, s:s + width].clone() for s in range(0, n, width))  # noqa: E731
    for sample_size in (50, 4000):
        sample = data[:, torch.randint(n, (sample_size,), generator=g)].abs()
        torch.testing.assert_close(select_ops.kth_largest_abs(blocks, sample, kept, n), want, atol=0, rtol=0)
    torch.testing.assert_close(select_ops.radix_kth_largest_abs(blocks, rows, kept), want, atol=0, rtol=0)


def test_state_dict_source_matches_task_vectors_in_every_storage_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        pre, experts = make_pool(dtype=dtype)
        for storage in ("float32", "bfloat16", "float16", "float64"):
            tv = TaskVectors.from_state_dicts(pre, experts, dtype=storage)
            source = StateDictTau(pre, experts, storage_dtype=storage)
            for key, tau in source.iterate():
                want = tv.vectors[key].float().reshape(len(experts), -1)
                assert torch.equal(tau.full(), want), (dtype, storage, key)
                assert torch.equal(tau.block(3, 17), want[:, 3:17]), (dtype, storage, key)
                index = torch.tensor([0, 5, tau.numel - 1])
                assert torch.equal(tau.sample(index), want[:, index]), (dtype, storage, key)


def test_merge_streams_without_materialising_task_vectors(monkeypatch):
    pre, experts = make_pool()
    monkeypatch.setattr(TaskVectors, "from_state_dicts", classmethod(lambda cls, *a, **k: pytest.fail("built")))
    for method, options in SEPARABLE:
        merge(method, pre, experts, **options)
