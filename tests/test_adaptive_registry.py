"""The adaptive method list exists once (`adaptive.registry`): a method registered in ONE place — here, a throw-away
method defined inside this test file — is known to `adapt(...)`, the merge config's validation (name, option
names, types and values), the CLI's method list and the suites' method check, with no other file touched."""

from __future__ import annotations

import copy

import hf_tiny
import pytest
from torch import Tensor

from symerge.adaptive import adapt, register_adaptive
from symerge.adaptive.base import AdaptiveMethod
from symerge.adaptive.experts import ExpertCache
from symerge.adaptive.objectives import LossTerm, entropy_loss
from symerge.adaptive.registry import positive, unregister_adaptive
from symerge.batching import Inputs
from symerge.errors import ValidationError

NAME = "throwaway_entropy"


@pytest.fixture
def throwaway():
    """Register the throw-away method for one test (the only place it is declared), then remove it."""

    @register_adaptive(NAME, granularity="task", coefficients_only=True, checks={"weight": positive})
    class ThrowawayEntropy(AdaptiveMethod):
        """Task-wise λ by entropy minimisation, with a loss weight option."""

        def __init__(self, merged, heads, weight: float = 1.0, **kwargs):
            super().__init__(merged, heads, **kwargs)
            self.weight = weight

        def param_groups(self, lr: float, layer_lr: float) -> list[dict]:
            return [{"params": [self.merged.lambdas], "lr": lr}]

        def step_parameters(self, task: str) -> list:
            return [self.merged.lambdas]

        def task_loss(self, task: str, inputs: Inputs, index: Tensor, cache: ExpertCache) -> LossTerm | None:
            term = entropy_loss(self.task_output(task, inputs))
            return LossTerm(term.value * self.weight, term.units)

    yield ThrowawayEntropy
    unregister_adaptive(NAME)


def test_adapt_runs_a_method_registered_in_one_place(throwaway, toy_problem):
    p = toy_problem
    result = adapt(NAME, p.encoder, p.heads, p.task_vectors(), p.adapt_inputs,
                   config={"steps": 2, "batch_size": 16, "progress": False}, weight=0.5)
    assert result.method == NAME
    assert result.provenance["options"] == {"weight": 0.5}
    assert result.provenance["granularity"] == "task"  # the registered default
    assert tuple(result.lambdas.shape) == (1, len(p.heads))  # task-wise: one row of K
    assert result.provenance["config"]["lr"] == 1e-3  # coefficients_only: the vision regime's λ-only rate


def test_merge_config_validates_the_registered_method_and_its_options(throwaway, bert, tmp_path):
    from symerge.config import known_methods, parse_config

    assert NAME in known_methods()[1]
    base = hf_tiny.merge_config(bert, tmp_path / "out")
    trainer = {"steps": 2, "batch_size": 4, "progress": False}
    cfg = copy.deepcopy(base)
    cfg["method"] = {"name": NAME, "options": {"weight": "0.5"}, "trainer": trainer}
    parsed = parse_config(cfg, tmp_path)
    assert parsed.adaptive and parsed.method.options == {"weight": 0.5}  # coerced to the declared float
    for options, pattern in [({"weight": -1.0}, "weight.*must be > 0"), ({"wieght": 1.0}, "has no option 'wieght'"),
                             ({"weight": "heavy"}, "weight.*not a valid float")]:
        cfg = copy.deepcopy(base)
        cfg["method"] = {"name": NAME, "options": options, "trainer": trainer}
        with pytest.raises(ValidationError, match=pattern):
            parse_config(cfg, tmp_path)


def test_cli_and_suites_know_the_registered_method(throwaway, capsys):
    from symerge.cli import main
    from symerge.suites.runner import check_methods, known_methods

    assert main(["methods"]) == 0
    assert NAME in capsys.readouterr().out
    assert NAME in known_methods()
    check_methods(["individual", NAME])


def test_an_unregistered_method_is_unknown_everywhere():
    from symerge.config import known_methods as config_methods
    from symerge.suites.runner import check_methods

    assert NAME not in config_methods()[1]
    with pytest.raises(ValidationError, match=f"unknown method '{NAME}'"):
        check_methods([NAME])
    with pytest.raises(ValidationError, match=f"unknown adaptive method '{NAME}'"):
        adapt(NAME, None, {}, None, {})
