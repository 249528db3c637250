"""SyMerge's task-specific layer: which encoder tensors a `task_layer` takes, what trains (λ / layer / both), how the
heads start, the teachers' scale, and that checkpointed runs with these options resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import symerge.adaptive as adaptive_module
from symerge.adaptive import TrainerConfig, adapt, build_trainer
from symerge.adaptive.experts import compute_expert_cache
from symerge.adaptive.finish import finish
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.adaptive.symerge_method import TaskLayer, parse_task_layer, select_task_layer_keys
from symerge.errors import ValidationError
from symerge.merging import merge_task_vectors
from symerge.taskvectors import TaskVectors
from test_checkpoints import FAST, small_inputs
from toy import perturbed_experts

BLOCKS = 12  # ≥ 11, so "layer.1" is a prefix of "layer.10" and "layer.11"


class BlockEncoder(nn.Module):
    """Twelve tiny numbered blocks named like `layer.N.*` (block_of sees them as numbered blocks)."""

    def __init__(self, width: int = 4, blocks: int = BLOCKS):
        super().__init__()
        self.layer = nn.ModuleList([nn.Linear(width, width) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = torch.tanh(block(x))
        return x


@pytest.fixture(scope="module")
def twelve_blocks():
    torch.manual_seed(0)
    encoder = BlockEncoder()
    tv = TaskVectors.from_state_dicts(encoder.state_dict(), perturbed_experts(encoder, ("a", "b"), 0.1))
    heads = {t: nn.Linear(4, 3) for t in tv.tasks}
    inputs = {t: torch.randn(32, 4) for t in tv.tasks}
    return encoder, heads, tv, inputs


def block_trainer(problem, task_layer: str, **options):
    encoder, heads, tv, inputs = problem
    return build_trainer("symerge", encoder, heads, tv, inputs, config=TrainerConfig(**FAST, steps=2),
                         task_layer=task_layer, **options)


# --- which tensors a task_layer takes ---------------------------------------------------------------------------------
def test_block_path_takes_only_that_block_not_blocks_whose_number_starts_alike(twelve_blocks):
    """The bug: `startswith("layer.1")` also took layer.10.* and layer.11.* (three blocks trained as 'one layer')."""
    trainer = block_trainer(twelve_blocks, "block:layer.1")
    assert sorted(trainer.method.encoder_overrides("a")) == ["layer.1.bias", "layer.1.weight"]


def test_trailing_dot_spelling_selects_the_same_block(twelve_blocks):
    trainer = block_trainer(twelve_blocks, "block:layer.1.")
    assert sorted(trainer.method.encoder_overrides("a")) == ["layer.1.bias", "layer.1.weight"]


SYNTHETIC = [f"encoder.layer.{i}.{part}" for i in range(BLOCKS) for part in ("attention.q.weight", "output.bias")] + [
    "embeddings.word.weight", "pooler.dense.weight"]


def test_selection_is_by_whole_module_name():
    layer = parse_task_layer("block:encoder.layer.1")
    assert select_task_layer_keys(SYNTHETIC, layer) == ["encoder.layer.1.attention.q.weight", "encoder.layer.1.output.bias"]
    inner = parse_task_layer("block:encoder.layer.1.attention")
    assert select_task_layer_keys(SYNTHETIC, inner) == ["encoder.layer.1.attention.q.weight"]
    assert select_task_layer_keys(SYNTHETIC, parse_task_layer("block:embeddings")) == ["embeddings.word.weight"]
    assert select_task_layer_keys(SYNTHETIC, parse_task_layer("head")) == []


def test_a_path_spanning_several_numbered_blocks_is_refused_naming_them():
    with pytest.raises(ValidationError, match=r"selects 12 numbered blocks \(encoder.layer.0, encoder.layer.1, "
                                              r"encoder.layer.2, .*encoder.layer.11\).*'blocks:encoder.layer.0,"):
        select_task_layer_keys(SYNTHETIC, parse_task_layer("block:encoder"))


def test_a_group_of_blocks_is_selected_together_in_key_order():
    group = parse_task_layer("blocks:encoder.layer.11, encoder.layer.1")
    assert group == TaskLayer("blocks", ("encoder.layer.11", "encoder.layer.1"))
    assert select_task_layer_keys(SYNTHETIC, group) == [
        "encoder.layer.1.attention.q.weight", "encoder.layer.1.output.bias",
        "encoder.layer.11.attention.q.weight", "encoder.layer.11.output.bias"]
    assert len(select_task_layer_keys(SYNTHETIC, parse_task_layer("blocks:encoder"))) == 2 * BLOCKS


@pytest.mark.parametrize("spec,message", [
    ("layer", "must be 'head'"), ("block:", "must be 'head'"), ("blocks:a,,b", "must be 'head'"),
    ("blocks:a,a", "must be 'head'"), ("block:a,b", "'block:' takes one module path"),
])
def test_task_layer_syntax_errors(spec, message):
    with pytest.raises(ValidationError, match=message):
        parse_task_layer(spec)


def test_a_path_that_matches_nothing_is_named():
    with pytest.raises(ValidationError, match="no encoder tensor belongs to module 'encoder.layer.12'"):
        select_task_layer_keys(SYNTHETIC, parse_task_layer("blocks:encoder.layer.0,encoder.layer.12"))


def test_block_group_trains_one_copy_per_task_from_task_arithmetic(twelve_blocks):
    trainer = block_trainer(twelve_blocks, "blocks:layer.0,layer.11")
    ta = merge_task_vectors("task_arithmetic", twelve_blocks[2])
    start = trainer.method.encoder_overrides("a")
    assert sorted(start) == ["layer.0.bias", "layer.0.weight", "layer.11.bias", "layer.11.weight"]
    for key, value in start.items():
        torch.testing.assert_close(value, ta[key])
    trainer.run()
    result = finish(trainer)
    assert not torch.equal(result.task_overrides["a"]["layer.11.weight"], result.task_overrides["b"]["layer.11.weight"])
    assert not torch.equal(result.task_overrides["a"]["layer.0.weight"], ta["layer.0.weight"])
    assert result.task_specific_values() == 2 * 2 * (4 * 4 + 4)  # 2 tasks × 2 blocks × Linear(4, 4), and no more


def test_bad_task_layer_fails_before_the_expert_pass(twelve_blocks, monkeypatch):
    def no_expert_pass(*args, **kwargs):
        raise AssertionError("the expert pass ran before the option was checked")

    monkeypatch.setattr(adaptive_module, "compute_expert_cache", no_expert_pass)
    with pytest.raises(ValidationError, match="numbered blocks"):
        block_trainer(twelve_blocks, "block:layer")


# --- what trains ----------------------------------------------------------------------------------------------------------
def run_toy(toy_problem, steps: int = 4, seed: int = 0, **options):
    config = TrainerConfig(**{**FAST, "steps": steps, "seed": seed})
    return build_trainer("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(),
                         small_inputs(toy_problem), config=config, **options)


def test_coefficient_only_keeps_heads_bit_identical_and_moves_lambda(toy_problem):
    trainer = run_toy(toy_problem, train_layer=False)
    start = trainer.method.merged.lambdas.detach().clone()
    trainer.run()
    result = finish(trainer)
    for task, head in toy_problem.heads.items():
        for name, value in head.state_dict().items():
            assert torch.equal(result.heads[task].state_dict()[name], value), (task, name)
    assert not torch.equal(trainer.method.merged.lambdas.detach(), start)
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [1]


def test_layer_only_keeps_lambda_and_moves_heads(toy_problem):
    trainer = run_toy(toy_problem, train_coefficients=False)
    start = trainer.method.merged.lambdas.detach().clone()
    trainer.run()
    result = finish(trainer)
    assert torch.equal(trainer.method.merged.lambdas.detach(), start)
    assert not torch.equal(result.heads["task0"].weight, toy_problem.heads["task0"].weight)


def test_coefficient_only_gets_the_regimes_coefficient_only_rate(toy_problem):
    config = TrainerConfig(steps=1, batch_size=8, progress=False)  # lr unset: the vision regime's defaults
    inputs = small_inputs(toy_problem, 8)
    only = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(), inputs,
                         config=config, train_layer=False)
    joint = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(), inputs,
                          config=config)
    assert (only.config.lr, joint.config.lr) == (1e-3, 1e-2)


@pytest.mark.parametrize("options,message", [
    ({"train_coefficients": False, "train_layer": False}, "trains nothing"),
    ({"train_layer": False, "task_layer": "block:layer2"}, "train_layer=False needs task_layer='head'"),
    ({"head_init": "random", "task_layer": "block:layer2"}, "head_init='random' needs"),
    ({"head_init": "random", "train_layer": False}, "head_init='random' needs"),
    ({"head_init": "zeros"}, "head_init must be one of"),
])
def test_contradictory_switches_are_refused_before_the_expert_pass(toy_problem, monkeypatch, options, message):
    monkeypatch.setattr(adaptive_module, "compute_expert_cache", lambda *a, **k: pytest.fail("expert pass ran"))
    with pytest.raises(ValidationError, match=message):
        run_toy(toy_problem, **options)


def test_option_values_are_checked_before_loading():
    from symerge.method_options import check_adaptive_options
    from symerge.option_types import OptionError

    for options, named in [({"loss": "hinge"}, "loss"), ({"head_init": "zero"}, "head_init"),
                           ({"task_layer": "block:a,b"}, "task_layer")]:
        with pytest.raises(OptionError) as err:
            check_adaptive_options("symerge", options, 2)
        assert err.value.option == named
    assert check_adaptive_options("symerge", {"loss": "js", "train_layer": False}, 2) == {"loss": "js",
                                                                                          "train_layer": False}


# --- how the heads start ------------------------------------------------------------------------------------------------
def start_heads(toy_problem, seed: int) -> dict[str, torch.Tensor]:
    trainer = run_toy(toy_problem, seed=seed, head_init="random")
    return {t: trainer.method.head(t).weight.detach().clone() for t in trainer.method.tasks}


def test_random_head_init_is_a_fresh_layer_per_task_and_seed(toy_problem):
    first, again, other = start_heads(toy_problem, 0), start_heads(toy_problem, 0), start_heads(toy_problem, 1)
    for task, weight in first.items():
        assert torch.equal(weight, again[task])
        assert not torch.equal(weight, other[task])
        assert not torch.equal(weight, toy_problem.heads[task].weight)
        bound = 1 / weight.shape[1] ** 0.5  # nn.Linear's kaiming-uniform(a=√5) range
        assert float(weight.abs().max()) <= bound
    assert not torch.equal(first["task0"], first["task1"])


def test_random_head_init_leaves_the_teachers_alone(toy_problem):
    trainer = run_toy(toy_problem, head_init="random")
    plain = run_toy(toy_problem)
    for task in trainer.cache.outputs:
        assert torch.equal(trainer.cache.outputs[task], plain.cache.outputs[task])


# --- teachers θ_pre + α τ_k (paper Fig. 6a) -----------------------------------------------------------------------------------
def test_scaled_teacher_cache_equals_a_brute_force_model(toy_problem):
    tv = toy_problem.task_vectors()
    merged = MergedEncoder(toy_problem.encoder, tv)
    inputs = small_inputs(toy_problem, 20)
    half = compute_expert_cache(merged, toy_problem.heads, inputs, batch_size=8, scale=0.5)
    full = compute_expert_cache(merged, toy_problem.heads, inputs, batch_size=8)
    assert (half.scale, full.scale) == (0.5, 1.0)
    base = toy_problem.encoder.state_dict()
    for task in tv.tasks:
        model = copy.deepcopy(toy_problem.encoder)
        model.load_state_dict({k: base[k] + 0.5 * (toy_problem.experts[task][k] - base[k]) for k in base})
        expected = toy_problem.heads[task](model(inputs[task]))
        torch.testing.assert_close(half.outputs[task], expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(half.outputs[task], full.outputs[task])
    with pytest.raises(ValidationError, match="finite"):
        compute_expert_cache(merged, toy_problem.heads, inputs, scale=float("nan"))


def test_resume_with_another_teacher_scale_is_refused(toy_problem, tmp_path):
    tv = toy_problem.task_vectors()
    inputs = small_inputs(toy_problem)
    merged = MergedEncoder(toy_problem.encoder, tv)
    config = TrainerConfig(**FAST, steps=6, checkpoint_every=2, checkpoint_path=tmp_path / "c.pt", resume=True)
    half = compute_expert_cache(merged, toy_problem.heads, inputs, scale=0.5)
    build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=config, cache=half).run(
        stop_after=2)
    with pytest.raises(ValidationError, match="teacher_scale: 0.5 → \\(absent\\)"):
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=config)


# --- resume with non-default options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {"loss": "js", "head_init": "random"},
    {"train_layer": False, "loss": "l2"},
    {"train_coefficients": False, "loss": "cosine"},
    {"task_layer": "blocks:layer1,layer2", "loss": "smooth_l1", "filter_rule": "none"},
])
def test_resume_with_non_default_options_equals_an_uninterrupted_run(toy_problem, tmp_path, options):
    tv = toy_problem.task_vectors()
    inputs = small_inputs(toy_problem)
    ckpt = tmp_path / "ckpt.pt"
    config = dict(FAST, steps=7, checkpoint_every=3, checkpoint_path=ckpt)
    build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**config),
                  **options).run(stop_after=5)  # checkpoint at 3, then two more steps that are lost
    resumed = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs,
                            config=TrainerConfig(**config, resume=True), **options)
    assert resumed.start_step == 3
    resumed.run()
    full = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**FAST, steps=7),
                 **options)
    got = finish(resumed)
    torch.testing.assert_close(got.lambdas, full.lambdas, atol=0, rtol=0)
    for task in tv.tasks:
        for name, value in full.heads[task].state_dict().items():
            torch.testing.assert_close(got.heads[task].state_dict()[name], value, atol=0, rtol=0)
        for name, value in full.task_overrides.get(task, {}).items():
            torch.testing.assert_close(got.task_overrides[task][name], value, atol=0, rtol=0)
    assert [h["loss"] for h in got.loss_history] == [h["loss"] for h in full.loss_history]


# --- device paths (tests/logical_device.py: a mix of CPU and accelerator tensors fails as on CUDA) -------------------------
@pytest.mark.parametrize("options", [{"loss": name} for name in ("kl", "js", "entropy", "l1", "smooth_l1", "l2",
                                                                  "cosine")]
                         + [{"train_layer": False}, {"head_init": "random"}, {"task_layer": "blocks:layer1,layer2"}])
def test_options_on_a_second_device_equal_cpu(toy_problem, options):
    from logical_device import logical_accelerator

    tv = toy_problem.task_vectors()
    inputs = small_inputs(toy_problem, 32)
    config = dict(FAST, steps=2)
    cpu = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**config), **options)
    with logical_accelerator() as device:
        moved = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, inputs,
                      config=TrainerConfig(**config, device=device), **options)
    torch.testing.assert_close(moved.lambdas, cpu.lambdas, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved.heads["task0"].weight, cpu.heads["task0"].weight, atol=1e-5, rtol=1e-5)
