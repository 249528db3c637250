"""TaskVectors: τ_k = θ_k − θ_pre stacked per tensor, storage dtypes, integer buffers, apply / subset / map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from symerge import TaskVectors, ValidationError
from symerge.taskvectors import mergeable_keys, resolve_dtype


def make_states(num_tasks=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "a.weight": torch.randn(3, 4, generator=g).to(dtype),
        "a.bias": torch.randn(3, generator=g).to(dtype),
        "ids": torch.arange(6).reshape(1, 6),
        "mask": torch.tensor([True, False, True]),
        "b.weight": torch.randn(2, 2, 2, generator=g).to(dtype),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    experts = {}
    for t in range(num_tasks):
        experts[f"t{t}"] = {
            k: (v.float() + 0.1 * (t + 1) * torch.randn(v.shape, generator=g)).to(dtype) if v.is_floating_point()
            else v + 1 if v.dtype != torch.bool else ~v
            for k, v in pre.items()
        }
    return pre, experts


def test_stacked_shapes_and_values_match_manual_differences():
    pre, experts = make_states()
    tv = TaskVectors.from_state_dicts(pre, experts)
    assert tv.tasks == ["t0", "t1", "t2"] and tv.num_tasks == 3
    assert tv.keys == ["a.weight", "a.bias", "b.weight"]
    for key in tv.keys:
        assert tv.vectors[key].shape == (3, *pre[key].shape)
        assert tv.vectors[key].dtype == torch.float32
        for k, task in enumerate(tv.tasks):
            want = experts[task][key].numpy().astype(np.float64) - pre[key].numpy().astype(np.float64)
            np.testing.assert_allclose(tv.vectors[key][k].numpy(), want, atol=1e-6)
    assert tv.numel() == 12 + 3 + 8


def test_integer_and_bool_buffers_are_never_task_vectors():
    pre, experts = make_states()
    tv = TaskVectors.from_state_dicts(pre, experts)
    for key in ("ids", "mask", "bn.num_batches_tracked"):
        assert key not in tv.vectors
    assert mergeable_keys(pre) == ["a.weight", "a.bias", "b.weight"]
    assert mergeable_keys(pre, ["ids", "b.weight"]) == ["b.weight"]
    merged = tv.apply({k: torch.ones_like(v[0]) for k, v in tv.vectors.items()})
    for key in ("ids", "mask", "bn.num_batches_tracked"):
        assert torch.equal(merged[key], pre[key]) and merged[key].dtype == pre[key].dtype


@pytest.mark.parametrize("storage", ["bfloat16", torch.bfloat16, "float16"])
def test_half_storage_halves_memory_and_stays_close(storage):
    pre, experts = make_states()
    f32 = TaskVectors.from_state_dicts(pre, experts)
    half = TaskVectors.from_state_dicts(pre, experts, dtype=storage)
    assert half.storage_dtype == resolve_dtype(storage)
    for key in f32.keys:
        assert half.vectors[key].element_size() * 2 == f32.vectors[key].element_size()
        torch.testing.assert_close(half.vectors[key].float(), f32.vectors[key], atol=1e-3, rtol=2 ** -7)
    # arithmetic always comes back in float32
    assert all(v.dtype == torch.float32 for _, v in half.items_float())
    assert half.task_vector("t1")["a.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_model_dtypes_are_preserved_by_apply(dtype):
    pre, experts = make_states(dtype=dtype)
    tv = TaskVectors.from_state_dicts(pre, experts)
    assert tv.storage_dtype == torch.float32
    # τ computed in (at least) float32 from the model's own values
    want = experts["t0"]["a.weight"].float() - pre["a.weight"].float()
    torch.testing.assert_close(tv.vectors["a.weight"][0], want.float(), atol=1e-6, rtol=1e-6)
    state = tv.expert_state("t0")
    for key, value in state.items():
        assert value.dtype == pre[key].dtype
    for key in tv.keys:
        torch.testing.assert_close(state[key], experts["t0"][key], atol=1e-6 if dtype == torch.float64 else 0.0,
                                   rtol=1e-6 if dtype == torch.float64 else 0.0)


def test_expert_state_reconstructs_expert_and_copies_pretrained():
    pre, experts = make_states()
    tv = TaskVectors.from_state_dicts(pre, experts)
    for index, task in enumerate(tv.tasks):
        by_name, by_index = tv.expert_state(task), tv.expert_state(index)
        for key in pre:
            assert torch.equal(by_name[key], by_index[key])
            if key in tv.vectors:
                torch.testing.assert_close(by_name[key], experts[task][key], atol=1e-6, rtol=1e-6)
            else:
                assert torch.equal(by_name[key], pre[key])
                assert by_name[key].data_ptr() != pre[key].data_ptr()


def test_apply_only_touches_given_keys():
    pre, experts = make_states()
    tv = TaskVectors.from_state_dicts(pre, experts)
    out = tv.apply({"a.bias": torch.full((3,), 2.0)})
    torch.testing.assert_close(out["a.bias"], pre["a.bias"] + 2.0)
    assert torch.equal(out["a.weight"], pre["a.weight"])
    assert list(out) == list(pre)


def test_keys_restrict_task_vectors():
    pre, experts = make_states()
    partial = {t: {"b.weight": e["b.weight"], "ids": e["ids"]} for t, e in experts.items()}
    tv = TaskVectors.from_state_dicts(pre, partial, keys=["b.weight", "ids"])
    assert tv.keys == ["b.weight"]
    assert list(tv.pretrained) == list(pre)  # the full pretrained model is kept for apply()


def test_subset_and_map():
    pre, experts = make_states(4)
    tv = TaskVectors.from_state_dicts(pre, experts, dtype="bfloat16")
    sub = tv.subset(["t3", "t1"])
    assert sub.tasks == ["t3", "t1"]
    for key in tv.keys:
        assert torch.equal(sub.vectors[key][0], tv.vectors[key][3])
        assert torch.equal(sub.vectors[key][1], tv.vectors[key][1])
    doubled = tv.map(lambda key, v: v * 2)
    assert doubled.storage_dtype == torch.bfloat16 and doubled.tasks == tv.tasks
    for key in tv.keys:
        assert torch.equal(doubled.vectors[key].float(), tv.vectors[key].float() * 2)
    with pytest.raises(ValueError):
        tv.subset(["nope"])


def test_task_vector_by_name_and_index():
    pre, experts = make_states()
    tv = TaskVectors.from_state_dicts(pre, experts)
    assert set(tv.task_vector("t2")) == set(tv.keys)
    for key in tv.keys:
        assert torch.equal(tv.task_vector("t2")[key], tv.task_vector(2)[key])


def test_inputs_are_not_modified_and_not_aliased():
    pre, experts = make_states()
    before = {k: v.clone() for k, v in experts["t0"].items()}
    tv = TaskVectors.from_state_dicts(pre, experts)
    tv.vectors["a.weight"].zero_()
    for key, value in before.items():
        assert torch.equal(experts["t0"][key], value)


def test_validation_is_on_by_default_and_can_be_skipped():
    pre, experts = make_states()
    experts["t1"]["a.bias"] = torch.full((3,), float("nan"))
    with pytest.raises(ValidationError, match=r"expert 't1'.*'a.bias'"):
        TaskVectors.from_state_dicts(pre, experts)
    tv = TaskVectors.from_state_dicts(pre, experts, validate=False)  # trusted callers (ModelPool) skip the checks
    assert bool(torch.isnan(tv.vectors["a.bias"][1]).all())


def test_resolve_dtype():
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValidationError, match="unknown storage dtype 'half'"):
        resolve_dtype("half")


def test_requires_grad_inputs_are_detached():
    pre, experts = make_states(2)
    pre = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in pre.items()}
    tv = TaskVectors.from_state_dicts(pre, experts)
    assert not any(v.requires_grad for v in tv.vectors.values())
    assert not any(v.requires_grad for v in tv.expert_state(0).values())


def test_float64_pretrained_not_rounded_to_float32_by_apply():
    """Entries with a zero update keep the pretrained float64 value bit for bit."""
    pre, experts = make_states(2, dtype=torch.float64)
    pre = {k: v + 1e-12 if v.is_floating_point() else v for k, v in pre.items()}  # not float32-representable
    tv = TaskVectors.from_state_dicts(pre, experts)
    out = tv.apply({k: torch.zeros_like(v[0]) for k, v in tv.vectors.items()})
    for key in tv.keys:
        assert out[key].dtype == torch.float64
        assert torch.equal(out[key], pre[key]), key
