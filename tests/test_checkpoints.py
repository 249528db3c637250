"""Adaptation checkpoints: resumed once, only by the run that made them, read safely; expert passes counted for real."""

from __future__ import annotations

import pickle

import pytest
import torch

import symerge.adaptive.experts as experts_module
from symerge.adaptive import TrainerConfig, adapt, build_trainer
from symerge.adaptive.experts import compute_expert_cache
from symerge.adaptive.finish import finish
from symerge.adaptive.merged_encoder import MergedEncoder
from symerge.errors import ValidationError

FAST = dict(batch_size=16, progress=False, lr=1e-2, layer_lr=1e-2)


def small_inputs(toy_problem, n: int = 48) -> dict[str, torch.Tensor]:
    return {t: x[:n] for t, x in toy_problem.adapt_inputs.items()}


def trainer_for(toy_problem, ckpt, inputs=None, **overrides):
    config = {**FAST, "steps": 10, "checkpoint_every": 3, "checkpoint_path": ckpt, **overrides}
    return build_trainer("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(),
                         inputs or small_inputs(toy_problem), config=TrainerConfig(**config))


def test_run_called_twice_continues_and_never_rewinds(toy_problem, tmp_path):
    """Item 3: with resume=True, run(stop_after=5) twice used to reload the step-3 checkpoint and end at step 8."""
    ckpt = tmp_path / "ckpt.pt"
    trainer = trainer_for(toy_problem, ckpt, resume=True)
    trainer.run(stop_after=5)
    trainer.run(stop_after=5)
    assert trainer.start_step == 10 and len(trainer.history) == 10
    full = adapt("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(),
                 small_inputs(toy_problem), config=TrainerConfig(**FAST, steps=10))
    torch.testing.assert_close(finish(trainer).lambdas, full.lambdas, atol=0, rtol=0)


def test_resume_happens_once_at_construction(toy_problem, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    trainer_for(toy_problem, ckpt).run(stop_after=4)  # checkpoint at 3
    resumed = trainer_for(toy_problem, ckpt, resume=True)
    assert resumed.start_step == 3 and resumed.resumed_from == 3
    resumed.run(stop_after=2)
    assert resumed.start_step == 5


@pytest.mark.parametrize("change,named", [
    ({"lr": 5e-3}, "trainer.lr: 0.01 → 0.005"),
    ({"batch_size": 8}, "trainer.batch_size"),
    ({"precision": "bf16"}, "trainer.precision"),
    ("data", "data.task1"),
    ("option", "options.labels"),
])
def test_resume_with_other_settings_is_refused_naming_what_differs(toy_problem, tmp_path, change, named):
    """Item 2: a checkpoint made with other settings used to be resumed silently (old weights, new lr recorded)."""
    ckpt = tmp_path / "ckpt.pt"
    trainer_for(toy_problem, ckpt).run(stop_after=4)
    inputs = small_inputs(toy_problem)
    kwargs: dict = {}
    if change == "data":
        inputs["task1"] = inputs["task1"] + 0.5
    elif change == "option":
        kwargs = {"labels": "soft"}
    else:
        kwargs = {}
    overrides = change if isinstance(change, dict) else {}
    with pytest.raises(ValidationError, match="different run") as err:
        config = {**FAST, "steps": 10, "checkpoint_every": 3, "checkpoint_path": ckpt, "resume": True, **overrides}
        build_trainer("symerge", toy_problem.encoder, toy_problem.heads, toy_problem.task_vectors(), inputs,
                      config=TrainerConfig(**config), **kwargs)
    assert named in str(err.value)


def test_execution_only_settings_may_change_on_resume(toy_problem, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    trainer_for(toy_problem, ckpt).run(stop_after=4)
    resumed = trainer_for(toy_problem, ckpt, resume=True, expert_batch_size=7, log_every=5)
    assert resumed.start_step == 3


def test_truncated_checkpoint_gives_one_clear_error(toy_problem, tmp_path):
    """Item 4: a truncated checkpoint used to raise a long torch/zipfile traceback."""
    ckpt = tmp_path / "ckpt.pt"
    trainer_for(toy_problem, ckpt).run(stop_after=4)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValidationError, match=r"checkpoint '.*ckpt.pt' cannot be read \(truncated or corrupt") as err:
        trainer_for(toy_problem, ckpt, resume=True)
    assert err.value.__cause__ is None and err.value.__suppress_context__


class Payload:
    ran = False

    def __reduce__(self):
        return (Payload.mark, ())

    @staticmethod
    def mark():
        Payload.ran = True
        return "executed"


def test_checkpoints_are_read_without_unpickling_code(toy_problem, tmp_path):
    """Item 4: `weights_only=False` would run arbitrary code stored in a checkpoint."""
    ckpt = tmp_path / "ckpt.pt"
    trainer = trainer_for(toy_problem, ckpt)
    trainer.run(stop_after=4)
    state = torch.load(ckpt, weights_only=True)
    state["history"].append({"evil": Payload()})
    torch.save(state, ckpt, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValidationError, match="cannot be read"):
        trainer_for(toy_problem, ckpt, resume=True)
    assert not Payload.ran


def test_checkpoint_holds_cpu_tensors_and_a_fingerprint(toy_problem, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    trainer_for(toy_problem, ckpt).run(stop_after=3)
    state = torch.load(ckpt, weights_only=True)
    assert {"trainer.lr", "data.task0", "pretrained", "task_vectors", "heads.task0", "method"} <= set(state["fingerprint"])
    assert all(v.device.type == "cpu" for v in state["method_state"].values())


def test_expert_runs_per_sample_counts_real_forward_calls(toy_problem, monkeypatch):
    """Item 20: the count used to be samples cached ÷ samples cached (1.0 by construction)."""
    tv = toy_problem.task_vectors()
    merged = MergedEncoder(toy_problem.encoder, tv)
    inputs = small_inputs(toy_problem, 40)
    calls: list[int] = []
    handle = merged.encoder.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    cache = compute_expert_cache(merged, toy_problem.heads, inputs, batch_size=16)
    handle.remove()
    assert cache.forward_passes == {t: 40 for t in tv.tasks} and sum(calls) == 40 * tv.num_tasks
    assert len(calls) == 3 * tv.num_tasks  # batches of 16, 16, 8
    assert cache.runs_per_sample() == {t: 1.0 for t in tv.tasks}

    original = experts_module.encode_all

    def twice(*args, **kwargs):  # a regression that runs every expert twice must show up as 2.0
        original(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(experts_module, "encode_all", twice)
    doubled = compute_expert_cache(merged, toy_problem.heads, inputs, batch_size=16)
    assert doubled.runs_per_sample() == {t: 2.0 for t in tv.tasks}
