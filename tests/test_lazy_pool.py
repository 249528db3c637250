"""Lazy pools: expert (and pretrained) tensors left in their safetensors files and read one tensor — or one block of
a tensor — at a time must merge exactly as the same tensors loaded into memory, pass the same up-front checks with
the same messages, and (hf_text) keep no expert's file mapped once the pool is built."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_tiny
from symerge.errors import ValidationError
from symerge.merging import merge
from symerge.pool import ModelPool
from symerge.tensorio import LazyStateDict, cast_floats, read_lazily, read_safetensors

SEPARABLE = [("task_arithmetic", {}), ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "trim_scope": "per_tensor"}),
             ("dare", {"drop_rate": 0.5, "seed": 3}), ("magmax", {})]


def write_pool(root: Path, num_tasks: int = 3, dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, Path]]:
    g = torch.Generator().manual_seed(0)
    pre = {"enc.w": torch.randn(70, 50, generator=g).to(dtype), "enc.b": torch.randn(70, generator=g).to(dtype),
           "enc.steps": torch.arange(4), "enc.flag": torch.tensor([True, False]), "head.w": torch.randn(3, 70, generator=g)}
    save_file(pre, str(root / "pre.safetensors"))
    experts = {}
    for t in range(num_tasks):
        state = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
                 for k, v in pre.items()}
        experts[f"t{t}"] = root / f"t{t}.safetensors"
        save_file(state, str(experts[f"t{t}"]))
    return root / "pre.safetensors", experts


@pytest.mark.parametrize("dtype,cast", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, torch.float32)])
def test_lazy_state_dict_reads_what_load_file_reads(tmp_path, dtype, cast):
    pre, _ = write_pool(tmp_path, 1, dtype)
    lazy = read_lazily(pre, "pretrained", cast)
    assert isinstance(lazy, LazyStateDict)
    eager = cast_floats(read_safetensors(pre, "pretrained"), cast)
    assert list(lazy) == list(load_file(str(pre)))
    for key, value in eager.items():
        assert lazy.layout(key) == (tuple(value.shape), value.dtype)
        assert torch.equal(lazy[key], value) and lazy[key].dtype == value.dtype
        flat = lazy.flat(key)
        assert torch.equal(flat[3:40], value.reshape(-1)[3:40])
        assert torch.equal(flat[torch.tensor([0, 1])], value.reshape(-1)[[0, 1]])
    assert list(lazy.select(["enc.b", "enc.w"])) == ["enc.b", "enc.w"]


def test_lazy_state_dict_refuses_a_truncated_file(tmp_path):
    pre, _ = write_pool(tmp_path, 1)
    data = pre.read_bytes()
    pre.write_bytes(data[:-100])
    with pytest.raises(ValidationError, match="corrupt or truncated"):
        LazyStateDict.from_files([pre], "pretrained")


@pytest.mark.parametrize("method,options", SEPARABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_pool_merges_exactly_as_the_loaded_one(tmp_path, method, options, dtype):
    pre, experts = write_pool(tmp_path, 3, dtype)
    heads = ["head"]
    eager = ModelPool.from_models(read_safetensors(pre, "pretrained"),
                                  {t: read_safetensors(p, t) for t, p in experts.items()}, head_prefixes=heads)
    lazy = ModelPool.from_models(read_lazily(pre, "pretrained"), {t: read_lazily(p, t) for t, p in experts.items()},
                                 head_prefixes=heads)
    assert all(isinstance(e, LazyStateDict) for e in lazy.experts.values())
    assert isinstance(lazy.pretrained, LazyStateDict)
    assert list(lazy.pretrained) == list(eager.pretrained) and "head.w" not in lazy.pretrained
    for task in experts:
        assert torch.equal(lazy.heads[task]["head.w"], eager.heads[task]["head.w"])
    want = merge(method, eager.pretrained, eager.experts, **options)
    got = merge(method, lazy.pretrained, lazy.experts, **options)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # non-separable methods and adaptive merging read the lazy pool through TaskVectors
    tv_lazy, tv_eager = lazy.task_vectors(), eager.task_vectors()
    for key in tv_eager.vectors:
        assert torch.equal(tv_lazy.vectors[key], tv_eager.vectors[key])


def test_lazy_pool_checks_say_what_the_loaded_pool_says(tmp_path):
    pre, experts = write_pool(tmp_path, 2)
    bad = load_file(str(experts["t1"]))
    bad["enc.w"][3, 4] = float("nan")
    save_file(bad, str(experts["t1"]))
    with pytest.raises(ValidationError, match=r"expert 't1': tensor 'enc.w' has 1 non-finite value\(s\)"):
        ModelPool.from_models(read_lazily(pre, "pretrained"), {t: read_lazily(p, t) for t, p in experts.items()},
                              head_prefixes=["head"])
    bad["enc.w"] = torch.zeros(70, 49)
    save_file(bad, str(experts["t1"]))
    with pytest.raises(ValidationError, match=r"expert 't1': tensor 'enc.w' has shape \(70, 49\), pretrained has \(70, 50\)"):
        ModelPool.from_models(read_lazily(pre, "pretrained"), {t: read_lazily(p, t) for t, p in experts.items()},
                              head_prefixes=["head"])
    bad["enc.w"] = torch.zeros(70, 50, dtype=torch.float16)
    save_file(bad, str(experts["t1"]))
    with pytest.raises(ValidationError, match=r"expert 't1': tensor 'enc.w' has dtype torch.float16, pretrained has"):
        ModelPool.from_models(read_lazily(pre, "pretrained"), {t: read_lazily(p, t) for t, p in experts.items()},
                              head_prefixes=["head"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_hf_text_lazy_pool_keeps_no_expert_in_memory(tmp_path):
    from symerge.models.hf_text import load_text_classifier_pool

    pre_dir, experts = hf_tiny.make_pool(tmp_path)
    lazy = load_text_classifier_pool(pre_dir, experts, lazy=True)
    mapped = Path("/proc/self/maps").read_text()
    for task, path in experts.items():
        assert isinstance(lazy.pool.experts[task], LazyStateDict)
        assert str(path) not in mapped  # a head tensor viewing the file's memory map would keep the file resident
    want = load_text_classifier_pool(pre_dir, experts).pool
    for task in experts:
        assert list(lazy.pool.experts[task]) == list(want.experts[task])
        for key, value in want.experts[task].items():
            assert torch.equal(lazy.pool.experts[task][key], value)
    for method, options in SEPARABLE[:2]:
        got = merge(method, lazy.pool.pretrained, lazy.pool.experts, **options)
        ref = merge(method, want.pretrained, want.experts, **options)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
