"""Adaptive merging engine: functional merge, gradients, objectives, trainer guarantees, and a quality check."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from symerge.adaptive import TrainerConfig, adapt, build_trainer
from symerge.adaptive.finish import finish
from symerge.adaptive.merged_encoder import MergedEncoder, default_init
from symerge.adaptive.objectives import confidence_keep_mask, self_label_loss
from symerge.errors import ValidationError
from symerge.merging import merge_task_vectors
from symerge.result import MergeResult
from symerge.taskvectors import TaskVectors
from toy import ToyEncoder, accuracy, perturbed_experts

FAST = dict(steps=6, batch_size=32, progress=False, lr=1e-2, layer_lr=1e-2)


def mean_accuracy(result: MergeResult, problem) -> float:
    return sum(accuracy(result.predict(t, problem.test_inputs[t]), problem.test_labels[t]) for t in result.tasks) / len(
        result.tasks
    )


def test_functional_merge_equals_loaded_state_dict(toy_problem):
    tv = toy_problem.task_vectors()
    lam = torch.rand(len(tv.keys), tv.num_tasks)
    merged = MergedEncoder(toy_problem.encoder, tv, init=lam, clamp=None)
    x = toy_problem.test_inputs["task0"][:10]
    expected_state = {
        k: toy_problem.encoder.state_dict()[k] + sum(lam[i, j] * (toy_problem.experts[t][k] - toy_problem.encoder.state_dict()[k])
                                                     for j, t in enumerate(tv.tasks))
        for i, k in enumerate(tv.keys)
    }
    reference = copy.deepcopy(toy_problem.encoder)
    reference.load_state_dict(expected_state)
    torch.testing.assert_close(merged(x), reference(x), atol=1e-5, rtol=1e-5)
    reference.load_state_dict(merged.merged_state())
    torch.testing.assert_close(merged(x), reference(x), atol=1e-6, rtol=1e-6)


def test_lambda_gradients_match_finite_differences():
    torch.manual_seed(0)
    enc = ToyEncoder().double()
    tv = TaskVectors.from_state_dicts(enc.state_dict(), perturbed_experts(enc, ("a", "b"), 0.3), dtype="float64")
    merged = MergedEncoder(enc, tv, init=0.4, clamp=None)
    x = torch.randn(8, 16, dtype=torch.float64)

    def loss_at(lam: torch.Tensor) -> torch.Tensor:
        merged.lambdas.data.copy_(lam)
        return merged(x).pow(2).sum()

    lam0 = merged.lambdas.detach().clone()
    merged.lambdas.grad = None
    loss_at(lam0).backward()
    analytic = merged.lambdas.grad.clone()
    eps = 1e-6
    numeric = torch.zeros_like(lam0)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in lam0.shape]):
        i, j = int(idx[0]), int(idx[1])
        plus, minus = lam0.clone(), lam0.clone()
        plus[i, j] += eps
        minus[i, j] -= eps
        with torch.no_grad():
            numeric[i, j] = (loss_at(plus) - loss_at(minus)) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, atol=1e-5, rtol=1e-5)


def test_granularities_and_default_init(toy_problem):
    tv = toy_problem.task_vectors()
    assert MergedEncoder(toy_problem.encoder, tv, granularity="tensor").lambdas.shape == (4, 3)
    assert MergedEncoder(toy_problem.encoder, tv, granularity="block").lambdas.shape == (2, 3)
    assert MergedEncoder(toy_problem.encoder, tv, granularity="task").lambdas.shape == (1, 3)
    assert default_init(8) == 0.3 and default_init(14) == 0.1
    with pytest.raises(ValidationError, match="granularity"):
        MergedEncoder(toy_problem.encoder, tv, granularity="row")
    clamped = MergedEncoder(toy_problem.encoder, tv, init=1.7)
    assert float(clamped.coefficients().detach().max()) == 1.0


def test_confidence_filter_rules_on_hand_built_batch():
    # sample 0: agree, merged more confident; 1: disagree, merged more confident;
    # 2: disagree, expert more confident; 3: agree, expert more confident.
    merged = torch.log(torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]]))
    expert = torch.log(torch.tensor([[0.7, 0.3], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]]))
    assert confidence_keep_mask(merged, expert, "code").tolist() == [True, False, True, True]
    assert confidence_keep_mask(merged, expert, "paper").tolist() == [False, False, True, True]
    assert confidence_keep_mask(merged, expert, "none").tolist() == [True, True, True, True]
    loss = self_label_loss(merged, expert, "code")
    expected = nn.functional.cross_entropy(merged[[0, 2, 3]], torch.tensor([0, 0, 0]))
    torch.testing.assert_close(loss.value, expected)
    assert loss.units == 3


def test_all_filtered_batch_gives_no_loss():
    merged = torch.log(torch.tensor([[0.05, 0.95], [0.02, 0.98]]))
    expert = torch.log(torch.tensor([[0.6, 0.4], [0.7, 0.3]]))
    assert self_label_loss(merged, expert, "code") is None


def test_all_filtered_batches_make_no_update(toy_problem):
    tv = toy_problem.task_vectors()
    trainer = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                            config=TrainerConfig(**FAST), filter_rule="paper")
    # Make every expert maximally unconfident: the paper rule then drops every sample.
    for task in trainer.cache.outputs:
        trainer.cache.outputs[task] = torch.zeros_like(trainer.cache.outputs[task])
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    trainer.run()
    after = trainer.method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.skipped_steps == FAST["steps"] * 3


def test_non_finite_loss_is_skipped_and_lambda_stays_finite(toy_problem):
    tv = toy_problem.task_vectors()
    inputs = dict(toy_problem.adapt_inputs)
    trainer = build_trainer("adamerging", toy_problem.encoder, toy_problem.heads, tv, inputs, config=TrainerConfig(**FAST))
    bad = inputs["task1"].clone()
    bad[:] = float("nan")
    trainer.inputs["task1"] = bad
    with pytest.warns(UserWarning, match="non-finite loss"):
        trainer.run()
    assert bool(torch.isfinite(trainer.method.merged.lambdas).all())
    assert trainer.skipped_steps == FAST["steps"]


def test_same_seed_same_result_and_experts_run_once(toy_problem):
    tv = toy_problem.task_vectors()
    runs = [adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                  config=TrainerConfig(**FAST, seed=3)) for _ in range(2)]
    assert torch.equal(runs[0].lambdas, runs[1].lambdas)
    for t in tv.tasks:
        assert torch.equal(runs[0].heads[t].weight, runs[1].heads[t].weight)
    assert runs[0].provenance["expert_runs_per_sample"] == {t: 1.0 for t in tv.tasks}
    other = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                  config=TrainerConfig(**FAST, seed=4))
    assert not torch.equal(runs[0].lambdas, other.lambdas)


@pytest.mark.parametrize("method", ["symerge", "surgery"])
def test_kill_and_resume_equals_uninterrupted(toy_problem, tmp_path, method):
    tv = toy_problem.task_vectors()
    cfg = dict(FAST, steps=8)
    full = adapt(method, toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs, config=TrainerConfig(**cfg))
    ckpt = tmp_path / "ckpt.pt"
    first = build_trainer(method, toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                          config=TrainerConfig(**cfg, checkpoint_every=3, checkpoint_path=ckpt))
    first.run(stop_after=5)  # "killed" after 5 iterations; the last checkpoint is at 3
    assert ckpt.exists() and not list(tmp_path.glob("*.tmp"))
    second = build_trainer(method, toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                           config=TrainerConfig(**cfg, checkpoint_every=3, checkpoint_path=ckpt, resume=True))
    second.run()
    assert second.start_step == 8
    resumed = finish(second)
    for a, b in zip(full.heads.values(), resumed.heads.values()):
        assert torch.equal(a.weight, b.weight)
    for t in tv.tasks:
        x = toy_problem.test_inputs[t][:16]
        assert torch.equal(full.predict(t, x), resumed.predict(t, x))
    assert [h["loss"] for h in full.loss_history] == [h["loss"] for h in resumed.loss_history]


def test_one_task_graph_is_freed_before_the_next(toy_problem):
    """Every tensor saved for backward is released before the next task's forward (no graph accumulation)."""
    tv = toy_problem.task_vectors()
    alive: weakref.WeakSet = weakref.WeakSet()

    class Saved:
        def __init__(self, tensor):
            self.tensor = tensor

    def pack(tensor):
        holder = Saved(tensor)
        alive.add(holder)
        return holder

    live_counts = []

    def after_task(step, task, loss):
        gc.collect()
        live_counts.append(len(alive))

    for update in ("sequential", "summed"):
        trainer = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                                config=TrainerConfig(**FAST, update=update))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor):
            trainer.run(callback=after_task)
    assert live_counts and max(live_counts) == 0


def test_symerge_beats_task_arithmetic_and_adamerging(toy_problem):
    tv = toy_problem.task_vectors()
    cfg = dict(steps=150, batch_size=64, progress=False, seed=0)
    ta = MergeResult("task_arithmetic", tv.tasks, toy_problem.encoder, merge_task_vectors("task_arithmetic", tv),
                     toy_problem.heads)
    ada = adapt("adamerging", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                config=TrainerConfig(**cfg, lr=1e-2))
    sym = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                config=TrainerConfig(**cfg, lr=1e-2, layer_lr=1e-2))
    acc = {name: mean_accuracy(r, toy_problem) for name, r in [("task_arithmetic", ta), ("adamerging", ada), ("symerge", sym)]}
    print(f"\nheld-out accuracy {acc}; margin vs TA {acc['symerge'] - acc['task_arithmetic']:+.3f}, "
          f"vs AdaMerging {acc['symerge'] - acc['adamerging']:+.3f}")
    assert acc["symerge"] > acc["task_arithmetic"] + 0.05
    assert acc["symerge"] > acc["adamerging"] + 0.05


def test_block_as_task_layer_starts_from_task_arithmetic(toy_problem):
    tv = toy_problem.task_vectors()
    trainer = build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                            config=TrainerConfig(**FAST), task_layer="block:layer2.")
    ta = merge_task_vectors("task_arithmetic", tv)
    overrides = trainer.method.encoder_overrides("task0")
    assert sorted(overrides) == ["layer2.bias", "layer2.weight"]
    torch.testing.assert_close(overrides["layer2.weight"], ta["layer2.weight"])
    trainer.run()
    result = finish(trainer)
    assert not torch.equal(result.task_overrides["task0"]["layer2.weight"], result.task_overrides["task1"]["layer2.weight"])
    for t in tv.tasks:  # heads stay the experts' heads in block mode
        assert torch.equal(result.heads[t].weight, toy_problem.heads[t].weight)
    with pytest.raises(ValidationError, match="no encoder tensor"):
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                      config=TrainerConfig(**FAST), task_layer="block:nothing.")


def test_soft_labels_and_regression_objectives(toy_problem):
    tv = toy_problem.task_vectors()
    result = adapt("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                   config=TrainerConfig(**FAST), labels="soft", task_kinds={"task2": "regression"})
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.loss_history)


def test_surgery_keeps_lambda_fixed_and_can_start_from_another_result(toy_problem):
    tv = toy_problem.task_vectors()
    ada = adapt("adamerging", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                config=TrainerConfig(**FAST))
    surgery = adapt("surgery", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                    config=TrainerConfig(**FAST), init=ada, granularity="tensor", rank=4)
    torch.testing.assert_close(surgery.lambdas, ada.lambdas)
    assert set(surgery.adapters) == set(tv.tasks)


class PooledReLU6Encoder(nn.Module):
    """Non-negative features like a CNN's pooled ReLU6 output (MobileNetV2): the case where Surgery's adapters died."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu6(self.proj(x) + 1.0)


def test_surgery_adapters_train_on_non_negative_features():
    """At the vision regime's task-layer rate (1e-2) Adam's first W_down steps pushed every ReLU pre-activation of the
    adapters below zero on such features, freezing them (Surgery equal to task arithmetic on the vision suite); at the
    official adapter rate they keep training: they change, most units stay active and the L1 objective falls."""
    torch.manual_seed(0)
    enc = PooledReLU6Encoder()
    tv = TaskVectors.from_state_dicts(enc.state_dict(), perturbed_experts(enc, ("a", "b", "c"), 0.3))
    heads = {t: nn.Linear(512, 4) for t in tv.tasks}
    inputs = {t: torch.randn(128, 16) for t in tv.tasks}
    trainer = build_trainer("surgery", enc, heads, tv, inputs, config=TrainerConfig(
        regime="vision", steps=30, batch_size=32, lr=1e-2, layer_lr=1e-2, progress=False))
    surgery = trainer.method
    assert surgery.param_groups(1e-2, 1e-2)[0]["lr"] == 1e-3  # the official rate, not the task-layer rate

    def objective() -> float:
        with torch.no_grad():
            return sum(float((surgery.surgery[surgery.slot(t)](surgery.frozen_features[t])
                              - trainer.cache.features[t]).abs().mean()) for t in tv.tasks) / len(tv.tasks)

    surgery.prepare(inputs, 32, "cpu")
    before = objective()
    trainer.run()
    assert objective() < 0.95 * before
    for t in tv.tasks:
        adapter = surgery.surgery[surgery.slot(t)]
        assert adapter.up.weight.abs().sum() > 0
        active = (adapter.down(surgery.frozen_features[t]) > 0).any(dim=0).float().mean()
        assert active > 0.75, f"{t}: only {float(active):.0%} of the adapter's ReLU units are ever active"
    with pytest.raises(ValidationError, match="adapter_lr"):
        build_trainer("surgery", enc, heads, tv, inputs, config=TrainerConfig(**FAST), adapter_lr=0.0)


def test_bad_options_are_named(toy_problem):
    tv = toy_problem.task_vectors()
    with pytest.raises(ValidationError, match="unknown adaptive method 'symurge'"):
        build_trainer("symurge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs)
    with pytest.raises(ValidationError, match="no adaptation inputs for task 'task2'"):
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv,
                      {k: v for k, v in toy_problem.adapt_inputs.items() if k != "task2"})
    with pytest.raises(ValidationError, match="filter_ruel"):
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, tv, toy_problem.adapt_inputs,
                      config=TrainerConfig(**FAST), filter_ruel="code")
