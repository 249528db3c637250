"""Validation errors (via `merging.merge` and `ModelPool`) name the task and the tensor; ModelPool splits heads."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import symerge.merging as merging
from symerge import ModelPool, ValidationError
from symerge.merging import merge
from symerge.taskvectors import TaskVectors


# --------------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """Encoder (linear + BatchNorm with an int64 buffer + position_ids) and a task head of `classes` outputs."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5))
        self.register_buffer("position_ids", torch.arange(4).unsqueeze(0))
        self.head = nn.Linear(5, classes)


def make_models(widths=(3, 5, 2), seed=0):
    torch.manual_seed(seed)
    pre = Tiny(classes=10)
    experts = {}
    for i, width in enumerate(widths):
        model = Tiny(classes=width)
        model.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}, strict=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.startswith("head."):
                    p.add_(0.05 * torch.randn_like(p))
        model.encoder[1].num_batches_tracked.fill_(7 + i)
        experts[f"task{i}"] = model
    return pre, experts


def make_states(num_tasks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pre = {
        "enc.weight": torch.randn(4, 3, generator=g),
        "enc.bias": torch.randn(4, generator=g),
        "norm.num_batches_tracked": torch.tensor(3),
        "out.weight": torch.randn(2, 4, generator=g),
    }
    experts = {}
    for t in range(num_tasks):
        experts[f"task{t}"] = {k: (v + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
                               for k, v in pre.items()}
    return pre, experts


def names(task: str, tensor: str) -> str:
    """A regex requiring both the task and the tensor name in the message (either order)."""
    t, k = re.escape(task), re.escape(tensor)
    return rf"(?s)(\b{t}\b.*{k})|({k}.*\b{t}\b)"


# --------------------------------------------------------------------------------------------------------------
# Corruptions shared by the `merge` and `ModelPool` tests: (name, mutate(experts, pretrained), task, tensor)
# --------------------------------------------------------------------------------------------------------------

def corrupt_missing(pre, experts):
    del experts["task1"]["enc.bias"]
    return "task1", "enc.bias", "missing"


def corrupt_extra(pre, experts):
    experts["task2"]["enc.extra"] = torch.zeros(2)
    return "task2", "enc.extra", "unexpected"


def corrupt_shape(pre, experts):
    experts["task1"]["enc.weight"] = torch.zeros(4, 2)
    return "task1", "enc.weight", "shape"


def corrupt_dtype(pre, experts):
    experts["task0"]["out.weight"] = experts["task0"]["out.weight"].double()
    return "task0", "out.weight", "dtype"


def corrupt_int_dtype(pre, experts):
    experts["task2"]["norm.num_batches_tracked"] = torch.tensor(3, dtype=torch.int32)
    return "task2", "norm.num_batches_tracked", "dtype"


def corrupt_nan(pre, experts):
    experts["task2"]["enc.weight"][1, 2] = float("nan")
    return "task2", "enc.weight", "non-finite"


def corrupt_inf(pre, experts):
    experts["task0"]["enc.bias"][0] = float("-inf")
    return "task0", "enc.bias", "non-finite"


def corrupt_pretrained_nan(pre, experts):
    pre["out.weight"][0, 0] = float("nan")
    return "pretrained", "out.weight", "non-finite"


def corrupt_not_tensor(pre, experts):
    experts["task1"]["enc.bias"] = [0.0] * 4
    return "task1", "enc.bias", "not a tensor"


CORRUPTIONS = [corrupt_missing, corrupt_extra, corrupt_shape, corrupt_dtype, corrupt_int_dtype, corrupt_nan,
               corrupt_inf, corrupt_pretrained_nan, corrupt_not_tensor]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("method", ["weight_averaging", "task_arithmetic", "ties", "dare"])
def test_merge_validation_names_task_and_tensor(corrupt, method, monkeypatch):
    pre, experts = make_states()
    task, tensor, what = corrupt(pre, experts)
    calls = []
    original = merging.merge_task_vectors
    monkeypatch.setattr(merging, "merge_task_vectors", lambda *a, **k: calls.append(1) or original(*a, **k))
    result = None
    with pytest.raises(ValidationError, match=names(task, tensor)) as info:
        result = merge(method, pre, experts)
    assert what in str(info.value)
    assert result is None
    assert calls == [], "no merge work may start before validation passes"


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_pool_from_parts_validation_names_task_and_tensor(corrupt):
    pre, experts = make_states()
    task, tensor, what = corrupt(pre, experts)
    pool = None
    with pytest.raises(ValidationError, match=names(task, tensor)) as info:
        pool = ModelPool.from_parts(pre, experts)
    assert what in str(info.value)
    assert pool is None


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_pool_from_models_validation_names_task_and_tensor(corrupt):
    pre, experts = make_states()
    for state in experts.values():
        state["head.weight"] = torch.randn(3, 2)
    task, tensor, what = corrupt(pre, experts)
    with pytest.raises(ValidationError, match=names(task, tensor)) as info:
        ModelPool.from_models(pre, experts, head_prefixes=["head."])
    assert what in str(info.value)


def test_taskvectors_validation_names_task_and_tensor():
    pre, experts = make_states()
    task, tensor, _ = corrupt_shape(pre, experts)
    with pytest.raises(ValidationError, match=names(task, tensor)):
        TaskVectors.from_state_dicts(pre, experts)


def test_keys_restrict_validation_to_those_tensors():
    pre, experts = make_states()
    experts["task1"]["enc.bias"][0] = float("nan")  # outside `keys`: not read, not checked
    merged = merge("task_arithmetic", pre, experts, keys=["enc.weight"])
    assert torch.equal(merged["enc.bias"], pre["enc.bias"])
    with pytest.raises(ValidationError, match=names("task1", "enc.bias")):
        merge("task_arithmetic", pre, experts, keys=["enc.weight", "enc.bias"])


def test_keys_naming_a_tensor_absent_from_pretrained():
    pre, experts = make_states()
    with pytest.raises(ValidationError, match=names("pretrained", "nope.weight")):
        merge("task_arithmetic", pre, experts, keys=["nope.weight"])


# --------------------------------------------------------------------------------------------------------------
# Task-level errors
# --------------------------------------------------------------------------------------------------------------

def test_pool_duplicate_task_names_from_pairs():
    pre, experts = make_models()
    pairs = [("cars", experts["task0"]), ("dtd", experts["task1"]), ("cars", experts["task2"])]
    with pytest.raises(ValidationError, match=r"duplicate task name 'cars'"):
        ModelPool.from_models(pre, pairs, head_prefixes=["head."])


def test_merge_rejects_bad_task_names():
    pre, experts = make_states(2)
    with pytest.raises(ValidationError, match="task name"):
        merge("task_arithmetic", pre, {"": experts["task0"], "b": experts["task1"]})


@pytest.mark.parametrize("count", [0, 1])
def test_pool_needs_two_experts(count):
    pre, experts = make_models(widths=(3,) * max(count, 1))
    chosen = dict(list(experts.items())[:count])
    with pytest.raises(ValidationError, match="at least two experts") as info:
        ModelPool.from_models(pre, chosen, head_prefixes=["head."])
    if count == 1:
        assert "task0" in str(info.value)
    pre_s, experts_s = make_states(count)
    with pytest.raises(ValidationError, match="at least two experts"):
        ModelPool.from_parts(pre_s, experts_s)


def test_merge_needs_one_expert():
    pre, _ = make_states(0)
    with pytest.raises(ValidationError, match="at least 1 expert"):
        merge("task_arithmetic", pre, {})


def test_pool_head_width_must_match_num_classes():
    pre, experts = make_models(widths=(3, 5, 2))
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head."], num_classes={"task0": 3, "task1": 5})
    assert pool.num_classes == {"task0": 3, "task1": 5}
    with pytest.raises(ValidationError, match=names("task1", "head.bias")) as info:
        ModelPool.from_models(pre, experts, head_prefixes=["head."], num_classes={"task0": 3, "task1": 4})
    assert "width 5" in str(info.value) and "4 classes" in str(info.value)


def test_pool_head_width_from_parts_with_modules():
    pre, experts = make_models(widths=(3, 5))
    encoders = {t: {k: v for k, v in m.state_dict().items() if not k.startswith("head.")} for t, m in experts.items()}
    pre_enc = {k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}
    heads = {t: m.head for t, m in experts.items()}  # nn.Linear modules: keys 'weight', 'bias'
    pool = ModelPool.from_parts(pre_enc, encoders, heads, num_classes={"task0": 3, "task1": 5})
    assert set(pool.heads["task1"]) == {"weight", "bias"}
    with pytest.raises(ValidationError, match=names("task0", "bias")):
        ModelPool.from_parts(pre_enc, encoders, heads, num_classes={"task0": 7})


def test_pool_num_classes_for_unknown_task_or_headless_task():
    pre, experts = make_models(widths=(3, 5))
    with pytest.raises(ValidationError, match="unknown task 'svhn'"):
        ModelPool.from_models(pre, experts, head_prefixes=["head."], num_classes={"svhn": 10})
    pre_s, experts_s = make_states(2)
    with pytest.raises(ValidationError, match="task 'task0'.*no head"):
        ModelPool.from_parts(pre_s, experts_s, num_classes={"task0": 3})


def test_pool_head_for_unknown_task():
    pre_s, experts_s = make_states(2)
    with pytest.raises(ValidationError, match="unknown task 'svhn'"):
        ModelPool.from_parts(pre_s, experts_s, heads={"svhn": nn.Linear(2, 3)})


def test_pool_expert_without_head():
    pre, experts = make_models(widths=(3, 5))
    bare = {k: v for k, v in experts["task1"].state_dict().items() if not k.startswith("head.")}
    with pytest.raises(ValidationError, match=r"expert 'task1'.*no head tensor"):
        ModelPool.from_models(pre, {"task0": experts["task0"], "task1": bare}, head_prefixes=["head."])


def test_pool_nan_in_head_names_task_and_tensor():
    pre, experts = make_models(widths=(3, 5))
    with torch.no_grad():
        experts["task1"].head.bias[2] = float("inf")
    with pytest.raises(ValidationError, match=names("task1", "head.bias")):
        ModelPool.from_models(pre, experts, head_prefixes=["head."])


def test_pool_rejects_non_model_inputs():
    pre, experts = make_models(widths=(3, 5))
    with pytest.raises(ValidationError, match="expert 'task1'.*nn.Module or a state dict"):
        ModelPool.from_models(pre, {"task0": experts["task0"], "task1": 42}, head_prefixes=["head."])
    with pytest.raises(ValidationError, match="pretrained.*nn.Module or a state dict"):
        ModelPool.from_models("weights.pt", experts, head_prefixes=["head."])


def test_merge_rejects_non_dict_inputs():
    pre, experts = make_states(2)
    with pytest.raises(ValidationError, match="pretrained must be a dict"):
        merge("task_arithmetic", list(pre.values()), experts)
    with pytest.raises(ValidationError, match="experts must be a dict"):
        merge("task_arithmetic", pre, list(experts.values()))
    with pytest.raises(ValidationError, match="expert 'task1'.*expected a state dict"):
        merge("task_arithmetic", pre, {"task0": experts["task0"], "task1": torch.zeros(3)})


# --------------------------------------------------------------------------------------------------------------
# Method / option errors: raised before any work
# --------------------------------------------------------------------------------------------------------------

def test_unknown_method_name(monkeypatch):
    pre, experts = make_states()
    built = []
    monkeypatch.setattr(TaskVectors, "from_state_dicts", classmethod(lambda cls, *a, **k: built.append(1)))
    with pytest.raises(ValidationError, match=r"unknown merge method 'tie'.*'ties'"):
        merge("tie", pre, experts)
    assert built == []


@pytest.mark.parametrize("method,option", [
    ("ties", "k"), ("task_arithmetic", "density"), ("dare", "p"), ("weight_averaging", "scaling_coef")])
def test_unknown_option_name(method, option, monkeypatch):
    pre, experts = make_states()
    built = []
    monkeypatch.setattr(TaskVectors, "from_state_dicts", classmethod(lambda cls, *a, **k: built.append(1)))
    with pytest.raises(ValidationError, match=rf"method '{method}' has no option '{option}'"):
        merge(method, pre, experts, **{option: 0.5})
    assert built == []


@pytest.mark.parametrize("method,options,match", [
    ("ties", {"density": 1.5}, "density"),
    ("ties", {"density": -0.1}, "density"),
    ("ties", {"trim_scope": "layer"}, "trim_scope"),
    ("ties", {"disjoint_merge": "max"}, "disjoint_merge"),
    ("dare", {"drop_rate": 1.0}, "drop_rate"),
    ("dare", {"drop_rate": -0.2}, "drop_rate"),
    ("dare", {"base": "magmax"}, "base"),
    ("dare", {"base": "ties", "trim_scope": "layer"}, "trim_scope"),
])
def test_bad_option_values(method, options, match):
    pre, experts = make_states()
    with pytest.raises(ValidationError, match=match):
        merge(method, pre, experts, **options)


def test_unknown_storage_dtype():
    pre, experts = make_states()
    with pytest.raises(ValidationError, match="storage dtype 'fp8'"):
        merge("task_arithmetic", pre, experts, storage_dtype="fp8")


# --------------------------------------------------------------------------------------------------------------
# ModelPool structure
# --------------------------------------------------------------------------------------------------------------

def test_pool_from_models_splits_encoder_and_heads():
    pre, experts = make_models(widths=(3, 5, 2))
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head."], num_classes={"task0": 3, "task1": 5,
                                                                                       "task2": 2})
    assert pool.tasks == ["task0", "task1", "task2"]
    encoder_keys = [k for k in pre.state_dict() if not k.startswith("head.")]
    assert list(pool.pretrained) == encoder_keys
    assert "position_ids" in pool.pretrained and "encoder.1.num_batches_tracked" in pool.pretrained
    for task, model in experts.items():
        state = model.state_dict()
        assert list(pool.experts[task]) == encoder_keys
        assert set(pool.heads[task]) == {"head.weight", "head.bias"}
        for key in encoder_keys:
            assert torch.equal(pool.experts[task][key], state[key])
        for key, value in pool.heads[task].items():
            assert torch.equal(value, state[key])
    assert [pool.heads[t]["head.weight"].shape[0] for t in pool.tasks] == [3, 5, 2]


def test_pool_from_models_with_prefix_without_dot_and_state_dicts():
    pre, experts = make_models(widths=(3, 5))
    states = [(t, m.state_dict()) for t, m in experts.items()]
    pool = ModelPool.from_models(pre.state_dict(), states, head_prefixes=["head"])
    assert all(not k.startswith("head") for k in pool.pretrained)
    assert set(pool.heads["task1"]) == {"head.weight", "head.bias"}


def test_pool_head_prefix_does_not_match_longer_names():
    class WithHeadless(Tiny):
        def __init__(self, classes=3):
            super().__init__(classes)
            self.headless = nn.Linear(2, 2)

    torch.manual_seed(1)
    pre = WithHeadless(10)
    experts = {f"t{i}": WithHeadless(w) for i, w in enumerate((3, 4))}
    for m in experts.values():
        m.load_state_dict({k: v for k, v in pre.state_dict().items() if not k.startswith("head.")}, strict=False)
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head"])
    assert "headless.weight" in pool.pretrained
    assert set(pool.heads["t0"]) == {"head.weight", "head.bias"}


def test_pool_task_vectors_equal_manual_differences():
    pre, experts = make_models(widths=(3, 5, 2))
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head."])
    tv = pool.task_vectors()
    pre_state = pre.state_dict()
    float_keys = [k for k in pool.pretrained if pool.pretrained[k].is_floating_point()]
    assert tv.tasks == pool.tasks
    assert tv.keys == float_keys
    assert "encoder.1.num_batches_tracked" not in tv.vectors and "position_ids" not in tv.vectors
    assert all(not k.startswith("head.") for k in tv.vectors)
    for key in float_keys:
        manual = torch.stack([experts[t].state_dict()[key] - pre_state[key] for t in pool.tasks])
        assert tv.vectors[key].shape == (3, *pre_state[key].shape)
        torch.testing.assert_close(tv.vectors[key], manual, atol=0.0, rtol=0.0)
    # bfloat16 storage and restricted keys
    tv16 = pool.task_vectors(dtype="bfloat16", keys=["encoder.0.weight"])
    assert tv16.keys == ["encoder.0.weight"] and tv16.storage_dtype == torch.bfloat16
    torch.testing.assert_close(tv16.vectors["encoder.0.weight"].float(), tv.vectors["encoder.0.weight"],
                               atol=1e-2, rtol=1e-2)


def test_pool_merge_through_registry_keeps_heads_separate():
    pre, experts = make_models(widths=(3, 5, 2))
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head."])
    merged = merging.merge_task_vectors("task_arithmetic", pool.task_vectors(), scaling_coef=0.3)
    assert list(merged) == list(pool.pretrained)
    same = merge("task_arithmetic", pool.pretrained, pool.experts, scaling_coef=0.3)
    for key in merged:
        assert torch.equal(merged[key], same[key])
    assert torch.equal(merged["encoder.1.num_batches_tracked"], pre.encoder[1].num_batches_tracked)


def test_pool_check_heads_match():
    pre, experts = make_models(widths=(3, 5))
    pool = ModelPool.from_models(pre, experts, head_prefixes=["head."])
    pool.check_heads_match({"task0": dict(pool.heads["task0"])})
    with pytest.raises(ValidationError, match=names("task1", "head.weight")):
        pool.check_heads_match({"task1": {"head.weight": torch.zeros(4, 5), "head.bias": torch.zeros(5)}})
    with pytest.raises(ValidationError, match="unknown task 'x'"):
        pool.check_heads_match({"x": {}})
