"""Suite rows that run an adaptive method the way a paper names a variant of it (`suites.runner.ROW_VARIANTS`):
AdaMerging with summed task losses, Surgery w/ Ada (adapters on AdaMerging's λ)."""

from __future__ import annotations

import pytest
import torch

from symerge.adaptive import TrainerConfig, adapt
from symerge.errors import ValidationError
from symerge.suites.runner import AdaptSettings, Benchmark, check_methods, known_methods, run_methods, run_order
from symerge.suites.tasks import TaskData

STEPS = 5


@pytest.fixture(scope="module")
def bench(toy_problem) -> Benchmark:
    tasks = {t: TaskData(t, ["0", "1", "2", "3"], adapt=toy_problem.adapt_inputs[t], test=toy_problem.test_inputs[t],
                         test_labels=toy_problem.test_labels[t], val=toy_problem.test_inputs[t][:8],
                         val_labels=toy_problem.test_labels[t][:8]) for t in toy_problem.heads}
    return Benchmark(toy_problem.encoder, dict(toy_problem.heads), dict(toy_problem.experts), tasks)


def settings() -> AdaptSettings:
    return AdaptSettings(regime="vision", steps=STEPS, batch_size=32, lr=1e-2, layer_lr=1e-2, curve=[],
                         per_method={"adamerging": {"lr": 5e-3}}, progress=False)


def config(**overrides) -> TrainerConfig:
    return TrainerConfig(**{"regime": "vision", "steps": STEPS, "batch_size": 32, "layer_lr": 1e-2, "progress": False,
                            "lr": 5e-3, **overrides})


@pytest.fixture(scope="module")
def outcomes(bench):
    return run_methods(bench, ["adamerging", "surgery_ada", "adamerging_summed", "surgery"], "held-out", settings(),
                       progress=False, log=lambda _: None)


def test_rows_equal_the_method_run_directly_that_way(bench, toy_problem, outcomes):
    """Each variant row equals its method called by hand with the variant's settings (summed update; Surgery from
    AdaMerging's learned λ), and differs from the plain row."""
    tv = bench.task_vectors()
    inputs = bench.tasks.adapt_inputs("held-out")
    summed = adapt("adamerging", bench.encoder, bench.heads, tv, inputs, config=config(update="summed"))
    torch.testing.assert_close(outcomes["adamerging_summed"].result.lambdas, summed.lambdas, rtol=0, atol=0)
    assert not torch.equal(outcomes["adamerging_summed"].result.lambdas, outcomes["adamerging"].result.lambdas)

    ada = outcomes["adamerging"].result
    surgery_ada = adapt("surgery", bench.encoder, bench.heads, tv, inputs, config=config(lr=None),
                        init=ada.lambdas, granularity="tensor")
    row = outcomes["surgery_ada"].result
    torch.testing.assert_close(row.lambdas, ada.lambdas, rtol=0, atol=0)  # Surgery keeps AdaMerging's λ
    x = toy_problem.test_inputs["task0"][:16]
    torch.testing.assert_close(row.predict("task0", x), surgery_ada.predict("task0", x))
    assert not torch.allclose(row.predict("task0", x), outcomes["surgery"].result.predict("task0", x))
    assert outcomes["surgery_ada"].notes.startswith("Surgery w/ Ada")


def test_row_order_and_dependency_checks():
    assert run_order(["surgery_ada", "symerge", "adamerging"]) == ["individual", "symerge", "adamerging", "surgery_ada"]
    assert {"adamerging_summed", "surgery_ada"} <= set(known_methods())
    check_methods(["adamerging", "surgery_ada"])
    with pytest.raises(ValidationError, match="'surgery_ada' starts from the λ that 'adamerging' learns"):
        check_methods(["task_arithmetic", "surgery_ada"])


def test_symerge_filter_follows_the_paper_per_regime(bench):
    """Vision regime: the confidence filter; NLP and dense: none (paper App. A.1). A given filter_rule wins, and the
    suites' symerge_filtered / symerge_unfiltered rows set it."""
    from symerge.adaptive import build_trainer
    from symerge.suites.runner import row_settings

    tv = bench.task_vectors()
    inputs = bench.tasks.adapt_inputs("held-out")
    for regime, expected in (("vision", "code"), ("nlp", "none"), ("dense", "none")):
        trainer = build_trainer("symerge", bench.encoder, bench.heads, tv, inputs, config=config(regime=regime))
        assert trainer.method.filter_rule == expected, regime
        assert trainer.result().provenance["options"].get("filter_rule", "code") == expected  # recorded when set
    given = build_trainer("symerge", bench.encoder, bench.heads, tv, inputs, config=config(regime="nlp"),
                          filter_rule="paper")
    assert given.method.filter_rule == "paper"
    base = settings()
    assert row_settings("symerge_filtered", base, {}).method_options["symerge"] == {"filter_rule": "code"}
    assert row_settings("symerge_unfiltered", base, {}).method_options["symerge"] == {"filter_rule": "none"}
    assert row_settings("symerge", base, {}) is base


def block_suite(suite: str):
    """The text or vision suite's default config and the filter-variant row it reports beside `symerge`."""
    from symerge.suites.text import TextSuiteConfig
    from symerge.suites.vision import VisionSuiteConfig

    if suite == "text":
        return TextSuiteConfig(), "symerge_filtered"
    return VisionSuiteConfig(), "symerge_unfiltered"


@pytest.mark.parametrize("suite", ["text", "vision"])
def test_block_rows_fit_soft_labels_and_the_paper_head_row_its_hard_labels(suite):
    """Both suites' block rows use KL to the experts' soft predictions (each chosen on its validation split); the
    symerge_head row, and the studies that reproduce the paper's head, keep the paper's CE to hard labels."""
    from symerge.studies.runner import paper_head_settings
    from symerge.suites.runner import row_settings

    cfg, variant = block_suite(suite)
    base = cfg.adapt_settings()

    def loss(settings) -> str:
        return settings.method_options["symerge"].get("loss", "ce")

    assert [loss(row_settings(row, base, {})) for row in ("symerge", variant)] == ["kl", "kl"]
    assert loss(row_settings("symerge_head", base, {})) == "ce" == loss(paper_head_settings(base))


@pytest.mark.parametrize("suite", ["text", "vision"])
def test_suites_adapt_a_block_with_the_paper_head_row_beside_it(suite):
    """The text and vision suites give SyMerge (and its filter-variant row) one encoder block as the task layer at
    the block's lr; the symerge_head row runs the paper's classifier head at the head's lr, right after them."""
    from symerge.suites.runner import row_settings

    cfg, variant = block_suite(suite)
    base = cfg.adapt_settings()
    assert cfg.methods[cfg.methods.index("symerge"):][:3] == ["symerge", variant, "symerge_head"]

    def trainer_and_layer(row: str) -> tuple[float, str]:
        adapted = row_settings(row, base, {})
        layer = adapted.method_options.get("symerge", {}).get("task_layer", "head")
        return adapted.trainer_config("symerge", progress=False).layer_lr, layer

    block_lr, block = trainer_and_layer("symerge")
    assert block.startswith("block:") and block_lr < base.layer_lr
    assert trainer_and_layer(variant) == (block_lr, block)
    assert trainer_and_layer("symerge_head") == (base.layer_lr, "head")
    from symerge.studies.runner import paper_head_settings  # the studies reproduce the paper's head

    studied = paper_head_settings(base)
    assert studied.method_options["symerge"]["task_layer"] == "head"
    assert studied.trainer_config("symerge", progress=False).layer_lr == base.layer_lr


def test_diagnostics_read_the_heads_of_the_symerge_row_that_trained_them(bench):
    """With a block as SyMerge's task layer its heads are the experts' own: the cross-task matrix and head transfer
    read the symerge_head row's learned heads instead, and name that row; with no head-trained row they are left out."""
    import copy

    from symerge.suites.diagnostics import run_diagnostics

    base = settings().overriding("symerge", options={"task_layer": "block:layer2"})
    outs = run_methods(bench, ["task_arithmetic", "symerge", "symerge_head"], "held-out", base, progress=False,
                       log=lambda _: None)
    assert outs["symerge"].result.task_overrides and not outs["symerge_head"].result.task_overrides
    diagnostics = run_diagnostics(bench, outs, samples=16, device="cpu", progress=False)
    cross = diagnostics["cross_task"]
    assert cross["symerge_heads_from"] == "symerge_head"
    learned = outs["symerge_head"].result.heads
    swapped = copy.copy(outs)
    swapped["symerge"] = outs["symerge_head"]  # the same heads under the name the diagnostics prefer
    assert run_diagnostics(bench, swapped, samples=16, device="cpu", progress=False)["cross_task"]["symerge"] == \
        cross["symerge"]
    assert any(not torch.equal(learned[t].weight, bench.heads[t].weight) for t in learned)
    assert cross["symerge"] != cross["original"]
    assert "task_arithmetic" in diagnostics["head_transfer"]
    without = run_diagnostics(bench, {k: v for k, v in outs.items() if k != "symerge_head"}, samples=16, device="cpu",
                              progress=False)
    assert "symerge" not in without["cross_task"] and "head_transfer" not in without
    assert without["cross_task"]["symerge_heads_from"] is None


def test_a_shorter_run_scores_as_the_longer_runs_curve_point(bench, toy_problem):
    """The demo preset runs fewer iterations than the full suite and its rows must equal the full report's curve
    point at that count: nothing in training depends on the total number of steps (no schedule, seeded batches)."""
    short = run_methods(bench, ["symerge", "adamerging", "surgery"], "held-out",
                        settings().model_copy(update={"steps": 3}), progress=False, log=lambda _: None)
    long = run_methods(bench, ["symerge", "adamerging", "surgery"], "held-out",
                       settings().model_copy(update={"curve": [3]}), progress=False, log=lambda _: None)
    for name in ("symerge", "adamerging", "surgery"):
        at_3 = long[name].curve[0]
        assert at_3["iterations"] == 3 and long[name].curve[-1]["iterations"] == STEPS
        assert at_3["normalized_average"] == short[name].curve[-1]["normalized_average"]
        assert at_3["average"] == short[name].curve[-1]["average"]
        x = toy_problem.test_inputs["task0"][:16]  # the long run did train on after step 3
        assert not torch.allclose(long[name].result.predict("task0", x), short[name].result.predict("task0", x))


def test_curve_evaluations_leave_the_final_result_unchanged(bench):
    """The demo preset evaluates adaptive rows once, at the end; the full run stops at its curve marks to evaluate.
    Both must reach the same final λ, heads and scores (evaluation consumes no training randomness)."""
    straight = run_methods(bench, ["symerge", "adamerging"], "held-out", settings(), progress=False,
                           log=lambda _: None)
    stopped = run_methods(bench, ["symerge", "adamerging"], "held-out",
                          settings().model_copy(update={"curve": [1, 3]}), progress=False, log=lambda _: None)
    for name in ("symerge", "adamerging"):
        assert [p["iterations"] for p in stopped[name].curve] == [1, 3, STEPS]
        assert [p["iterations"] for p in straight[name].curve] == [STEPS]
        torch.testing.assert_close(stopped[name].result.lambdas, straight[name].result.lambdas, rtol=0, atol=0)
        assert stopped[name].per_task == straight[name].per_task
