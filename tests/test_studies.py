"""`symerge study`: the pilot (paper §3) and head-transfer (Table 4) studies on a tiny benchmark, checked against
brute-force computations done another way; the study runner's output (atomic, multi-seed summary, refusals before
any work); the CLI; the suites' adaptation labels; the device path."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import pytest
import torch
from scipy import stats
from torch import nn

from symerge.cli import main
from symerge.errors import ValidationError
from symerge.evaluation.cross_task import encoder_features
from symerge.result import MergeResult
from symerge.studies import STUDIES
from symerge.studies import runner as study_runner
from symerge.studies.base import StudyOutput, StudySpec
from symerge.studies.encoders import per_tensor_lambdas, single_task_states
from symerge.studies.runner import run_study
from symerge.suites.runner import AdaptSettings, Benchmark
from symerge.suites.tasks import TaskData, TaskPool
from symerge.suites.text import TextSuiteConfig
from symerge.taskvectors import TaskVectors
from toy import accuracy, make_task

SAMPLES = 80  # cross_task_samples of the tiny config
QUIET = dict(progress=False, log=lambda _: None)


# --- a tiny benchmark: the toy problem with labeled adaptation splits ------------------------------------------------
def toy_benchmark(toy, experts=None, heads=None) -> Benchmark:
    datas = {}
    for k, task in enumerate(toy.heads):
        _x, y, _mean = make_task(k, 256, 16, 4)  # the toy's own draw (seed 0): labels of its adaptation inputs
        datas[task] = TaskData(task, ["a", "b", "c", "d"], toy.adapt_inputs[task], toy.test_inputs[task],
                               toy.test_labels[task], toy.test_inputs[task][:32], toy.test_labels[task][:32],
                               adapt_labels=y[256:512])
    return Benchmark(toy.encoder, heads or toy.heads, experts or toy.experts, TaskPool(datas))


def tiny_config(**overrides) -> TextSuiteConfig:
    adapt = AdaptSettings(regime="nlp", steps=10, batch_size=32, lr=1e-2, layer_lr=1e-2, curve=[])
    return TextSuiteConfig(**{"adapt": adapt, "cross_task_samples": SAMPLES, **overrides})


@pytest.fixture(scope="module")
def bench(toy_problem) -> Benchmark:
    return toy_benchmark(toy_problem)


def state_with(bench: Benchmark, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """θ_pre + Σ_t w_t (θ_t − θ_pre), from the experts' state dicts directly."""
    base = bench.encoder.state_dict()
    return {k: v + sum(w * (bench.experts[t][k] - v) for t, w in weights.items()) for k, v in base.items()}


def brute_score(bench: Benchmark, state: dict[str, torch.Tensor], head_task: str, heads=None) -> float:
    """Accuracy of the encoder `state` read by `head_task`'s head on its first SAMPLES test inputs (MergeResult)."""
    result = MergeResult("brute", bench.task_names, bench.encoder, state, dict(heads or bench.heads))
    data = bench.tasks[head_task]
    return accuracy(result.predict(head_task, data.test[:SAMPLES]), data.test_labels[:SAMPLES])


def read(path: Path) -> dict:
    return json.loads((path / "study.json").read_text())


# --- pilot ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pilot_run(bench, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pilot") / "out"
    run_study("pilot", "text", tiny_config(), out, study_options={"lambdas": [0.3, 0.6], "head_epochs": 3},
              benchmark=bench, **QUIET)
    return out, read(out)


def test_pilot_matrices_match_brute_force(bench, pilot_run):
    _out, record = pilot_run
    data, tasks = record["data"], bench.task_names
    m_a = data["cross_task"]["expert_heads"]
    for name in ("expert_heads", "retrained_heads_ta0.3", "symerge_heads"):
        matrix = data["cross_task"][name]
        assert len(matrix) == 3 and all(len(row) == 3 for row in matrix), name
    for j, task in enumerate(tasks):  # the diagonal is each expert's own accuracy on those samples
        assert m_a[j][j] == pytest.approx(brute_score(bench, dict(bench.experts[task]), task), abs=1e-6)
    assert m_a[0][2] == pytest.approx(brute_score(bench, dict(bench.experts[tasks[0]]), tasks[2]), abs=1e-6)
    # Fig. 2's merge score: experts 1 and 2 weight-averaged, read by task 2's head
    pair = data["pairwise_merge"][1][2]
    assert pair == pytest.approx(brute_score(bench, state_with(bench, {tasks[1]: 0.5, tasks[2]: 0.5}), tasks[2]),
                                 abs=1e-6)
    assert [data["pairwise_merge"][j][j] for j in range(3)] == [m_a[j][j] for j in range(3)]


def test_pilot_sweep_gains_and_correlations_are_consistent(bench, pilot_run):
    _out, record = pilot_run
    data, tasks = record["data"], bench.task_names
    m_a = data["cross_task"]["expert_heads"]
    assert [row["lambda"] for row in data["sweep"]] == [0.3, 0.6]
    for row in data["sweep"]:  # Fig. 3b: column means over foreign encoders of M_b(λ) − M_a
        m_b = row["cross_task_retrained"]
        for j, task in enumerate(tasks):
            want = statistics.fmean(m_b[i][j] - m_a[i][j] for i in range(3) if i != j)
            assert row["gain"][task] == pytest.approx(want, abs=1e-9)
    focus = data["sweep"][0]
    assert focus["cross_task_retrained"] == data["cross_task"]["retrained_heads_ta0.3"]
    # TA(0.3) with the experts' heads, on the whole test split, against a merge built from the state dicts
    ta_state = state_with(bench, {t: 0.3 for t in tasks})
    ta = MergeResult("ta", tasks, bench.encoder, ta_state, dict(bench.heads))
    for task in tasks:
        want = accuracy(ta.predict(task, bench.tasks[task].test), bench.tasks[task].test_labels)
        assert focus["ta_per_task"][task] == pytest.approx(want, abs=1e-6)
    fig2 = data["fig2"]
    x = [statistics.fmean(m_a[i][j] for i in range(3) if i != j) for j in range(3)]
    y = [statistics.fmean(data["pairwise_merge"][i][j] for i in range(3) if i != j) for j in range(3)]
    assert [fig2["cross_task"][t] for t in tasks] == pytest.approx(x)
    assert [fig2["pairwise_merge"][t] for t in tasks] == pytest.approx(y)
    pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    head = record["headline"]
    assert head["pearson_r"] == pytest.approx(pearson[0]) and head["pearson_p"] == pytest.approx(pearson[1])
    assert head["spearman_rho"] == pytest.approx(spearman[0]) and head["spearman_p"] == pytest.approx(spearman[1])
    ta_norm = [data["cross_task_vs_ta"]["ta_normalized"][t] for t in tasks]
    assert data["cross_task_vs_ta"]["pearson_r"] == pytest.approx(stats.pearsonr(x, ta_norm)[0])
    assert ta_norm == pytest.approx([focus["ta_per_task"][t] / record["reference"][t] for t in tasks])
    assert head["cross_task_expert_heads"] == pytest.approx(statistics.fmean(x))
    assert head["symerge_normalized"] == data["symerge"]["normalized_average"]


def test_pilot_writes_its_figures_and_report(pilot_run):
    out, record = pilot_run
    assert sorted(p.name for p in out.iterdir()) == sorted(["study.json", "study.md", *record["figures"]])
    assert set(record["figures"]) == {"cross_task_matrices.png", "fig2_cross_task_vs_merge.png",
                                      "fig3b_retrained_gain.png"}
    for name in record["figures"]:
        assert (out / name).stat().st_size > 5000, name
    markdown = (out / "study.md").read_text()
    assert markdown.startswith("# symerge study pilot: reproduces paper §3: Fig. 2, Fig. 3b and Fig. A / H")
    assert "![fig2_cross_task_vs_merge.png](fig2_cross_task_vs_merge.png)" in markdown
    assert "Pearson r = " in markdown and "| task0 | **" in markdown
    assert record["reproduces"] == STUDIES["pilot"].reproduces and record["seed"] == 0
    assert record["config"]["cross_task_samples"] == SAMPLES and record["settings"]["steps"] == 10


def test_retrained_heads_when_every_encoder_is_the_pretrained_one(toy_problem, tmp_path):
    """τ = 0: every encoder (experts, TA at any λ, pairwise merges) is θ_pre, so every matrix has equal rows, the
    merge score IS the cross-task score (r = 1), and heads re-trained with labels beat untrained heads."""
    base = toy_problem.encoder.state_dict()
    experts = {t: {k: v.clone() for k, v in base.items()} for t in toy_problem.heads}
    torch.manual_seed(3)
    heads = {t: nn.Linear(32, 4).requires_grad_(False) for t in toy_problem.heads}
    before = {t: h.weight.clone() for t, h in heads.items()}
    bench = toy_benchmark(toy_problem, experts=experts, heads=heads)
    run_study("pilot", "text", tiny_config(), tmp_path / "out", study_options={"lambdas": [0.5], "head_epochs": 20},
              benchmark=bench, **QUIET)
    data = read(tmp_path / "out")["data"]
    for name, matrix in data["cross_task"].items():
        assert all(row == matrix[0] for row in matrix), name
    assert data["pairwise_merge"] == data["cross_task"]["expert_heads"]
    assert data["fig2"]["pearson_r"] == pytest.approx(1.0)
    gains = data["sweep"][0]["gain"]
    assert min(gains.values()) > 0.15, gains  # a trained linear probe vs a random head (chance: 0.25)
    assert data["sweep"][0]["ta_retrained_normalized"] > data["sweep"][0]["ta_normalized"] + 0.3
    assert all(torch.equal(before[t], heads[t].weight) for t in heads)  # re-training copies the heads


# --- head transfer --------------------------------------------------------------------------------------------------
def test_head_transfer_cross_and_merged_match_brute_force(bench, tmp_path):
    run_study("head-transfer", "text", tiny_config(), tmp_path / "out", benchmark=bench, **QUIET)
    record = read(tmp_path / "out")
    table, tasks = record["data"]["table"], bench.task_names
    assert set(table) == {"task_arithmetic", "adamerging"}
    ta = table["task_arithmetic"]["expert_heads"]
    cells = {(i, j): brute_score(bench, state_with(bench, {tasks[i]: 0.3}), tasks[j])
             for i in range(3) for j in range(3) if i != j}
    for (i, j), want in cells.items():
        assert ta["cross_task"][i][j] == pytest.approx(want, abs=1e-6), (i, j)
    assert ta["cross_average"] == pytest.approx(statistics.fmean(cells.values()), abs=1e-6)
    merged = MergeResult("ta", tasks, bench.encoder, state_with(bench, {t: 0.3 for t in tasks}), dict(bench.heads))
    for task in tasks:
        want = accuracy(merged.predict(task, bench.tasks[task].test), bench.tasks[task].test_labels)
        assert ta["merged_per_task"][task] == pytest.approx(want, abs=1e-6)
    for enc in table.values():
        for row in enc.values():
            assert row["merged_normalized"] == pytest.approx(statistics.fmean(
                row["merged_per_task"][t] / record["reference"][t] for t in tasks))
    # AdaMerging's own λ differ from TA's, so its "Cross" encoders differ; SyMerge heads differ from the experts'
    assert table["adamerging"]["expert_heads"]["cross_task"] != ta["cross_task"]
    assert table["task_arithmetic"]["symerge_heads"]["merged_per_task"] != ta["merged_per_task"]
    head = record["headline"]
    assert head["task_arithmetic/cross_average/expert_heads"] == ta["cross_average"]
    assert len(head) == 16
    markdown = (tmp_path / "out" / "study.md").read_text()
    assert "paper Table 4" in markdown.splitlines()[0] and "| 69.1 | 49.8 |" in markdown


def test_per_tensor_lambdas_expand_rows_and_scale_one_task_vector(toy_problem):
    tv = TaskVectors.from_state_dicts(toy_problem.encoder.state_dict(), toy_problem.experts)
    lambdas = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])  # block granularity: layer1, layer2
    result = MergeResult("m", tv.tasks, toy_problem.encoder, {}, {}, lambdas=lambdas, lambda_rows=["layer1", "layer2"],
                         provenance={"granularity": "block"})
    coefs = per_tensor_lambdas(result, tv)
    assert tv.keys == ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"]
    torch.testing.assert_close(coefs, lambdas[[0, 0, 1, 1]].double())
    state = single_task_states(tv, coefs)["task1"]
    base = toy_problem.encoder.state_dict()
    for key, scale in (("layer1.weight", 0.2), ("layer2.bias", 0.5)):
        want = base[key] + scale * (toy_problem.experts["task1"][key] - base[key])
        torch.testing.assert_close(state[key], want)
    with pytest.raises(ValidationError, match="λ rows"):
        per_tensor_lambdas(MergeResult("m", tv.tasks, toy_problem.encoder, {}, {}, lambdas=lambdas,
                                       lambda_rows=["a", "b"], provenance={"granularity": "block"}), tv)


def test_shared_inputs_are_encoded_once_per_encoder(toy_problem):
    calls = []
    encoder = toy_problem.encoder
    x = toy_problem.test_inputs["task0"][:10]
    params = {"e0": dict(toy_problem.experts["task0"]), "e1": dict(toy_problem.experts["task1"])}
    handle = encoder.register_forward_hook(lambda _m, args, _out: calls.append(len(args[0])))  # device copies too
    try:
        features = encoder_features(encoder, params, {"a": x, "b": x, "c": x.clone()}, progress=False)
    finally:
        handle.remove()
    assert calls == [10, 10, 10, 10]  # per encoder: the shared tensor once, its copy once
    assert features["e0"]["a"] is features["e0"]["b"]
    torch.testing.assert_close(features["e0"]["a"], features["e0"]["c"])
    assert not torch.equal(features["e0"]["a"], features["e1"]["a"])


# --- the runner -----------------------------------------------------------------------------------------------------
def test_several_seeds_get_a_folder_each_and_a_mean_std_summary(bench, tmp_path):
    out = tmp_path / "out"
    summary = run_study("pilot", "text", tiny_config(), out, seeds=[0, 1],
                        study_options={"lambdas": [0.3], "head_epochs": 1}, benchmark=bench, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["seed-0", "seed-1", "study.json", "study.md"]
    per_seed = {s: read(out / f"seed-{s}") for s in (0, 1)}
    assert [per_seed[s]["seed"] for s in (0, 1)] == [0, 1]
    assert per_seed[0]["headline"]["symerge_normalized"] != per_seed[1]["headline"]["symerge_normalized"]
    on_disk = read(out)
    assert on_disk["seeds"] == [0, 1] and set(on_disk["headline"]) == set(per_seed[0]["headline"])
    for name, entry in on_disk["headline"].items():
        values = [per_seed[s]["headline"][name] for s in (0, 1)]
        assert entry["mean"] == pytest.approx(statistics.fmean(values), nan_ok=True)
        assert entry["std"] == pytest.approx(statistics.stdev(values), nan_ok=True)
    assert summary["headline"]["symerge_normalized"] == on_disk["headline"]["symerge_normalized"]
    markdown = (out / "study.md").read_text()
    assert "±" in markdown and "(seed-1/study.md)" in markdown


@pytest.fixture
def no_build(monkeypatch):
    """The suite's benchmark builder, replaced by one that fails the test if any work starts."""
    def build(*_args, **_kwargs):
        raise AssertionError("the benchmark was built before the inputs were checked")

    real = study_runner.suite_parts
    monkeypatch.setattr(study_runner, "suite_parts", lambda suite: (real(suite)[0], build, real(suite)[2]))


def test_bad_inputs_are_refused_before_any_work(tmp_path, no_build):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (dict(out_dir=foreign), "exists and is not empty; pass --overwrite"),
        (dict(out_dir=foreign, overwrite=True), "is not a symerge output"),
        (dict(study_options={"lambda": [0.3]}), "no option 'lambda'"),
        (dict(study_options={"lambdas": [0.3, 1.5]}), "'lambdas' must be distinct numbers in \\(0, 1\\]"),
        (dict(seeds=[0, 0]), "seed 0 given twice"),
        (dict(steps=0), "--steps"),
        (dict(name="nope"), "unknown study 'nope'"),
        (dict(cfg=tiny_config(tasks=["bbc_topic"])), "needs at least 2 tasks"),
    ]
    for overrides, message in cases:
        args = {"name": "pilot", "suite": "text", "cfg": tiny_config(), "out_dir": tmp_path / "new", **overrides}
        with pytest.raises(ValidationError, match=message):
            run_study(**args, **QUIET)
    assert (foreign / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_a_failing_study_leaves_the_previous_output_and_no_temp_dir(bench, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_study("head-transfer", "text", tiny_config(), out, benchmark=bench, **QUIET)
    before = (out / "study.json").read_text()

    def boom(ctx):
        raise RuntimeError("study failed")

    monkeypatch.setitem(STUDIES, "head-transfer", StudySpec("head-transfer", boom, "test", "test"))
    with pytest.raises(RuntimeError, match="study failed"):
        run_study("head-transfer", "text", tiny_config(), out, benchmark=bench, overwrite=True, **QUIET)
    assert (out / "study.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_study_must_return_a_flat_headline(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(STUDIES, "bad", StudySpec(
        "bad", lambda ctx: StudyOutput({"headline": {"nested": {"x": 1.0}}}, ""), "test", "test"))
    with pytest.raises(TypeError, match="flat"):
        run_study("bad", "text", tiny_config(), tmp_path / "out", benchmark=bench, **QUIET)
    assert not (tmp_path / "out").exists()


# --- the CLI ----------------------------------------------------------------------------------------------------------
def test_cli_lists_the_studies(capsys):
    assert main(["study", "--list"]) == 0
    out = capsys.readouterr().out
    for spec in STUDIES.values():
        assert spec.name in out and spec.reproduces in out and spec.summary in out
    assert {"pilot", "head-transfer"} <= set(STUDIES)


@pytest.mark.parametrize("argv,message", [
    (["study", "nope"], "unknown study 'nope'; available: "),
    (["study", "pilot", "--suite", "audio"], "unknown suite 'audio'; available: text, vision, dense"),
    (["study", "pilot", "--tasks", "bbc_topic,no_such_task"], "--tasks: unknown text task 'no_such_task'"),
    (["study", "pilot", "--seeds", "3,3"], "--seeds: seed 3 given twice"),
    (["study"], "give a study name"),
    (["study", "head-transfer", "--option", "nope=1"], "study 'head-transfer' has no option 'nope' (options: ta_lambda)"),
    (["study", "pilot", "--option", "head_epochs"], "'head_epochs' is not NAME=VALUE"),
])
def test_cli_fails_fast_with_one_clear_line(argv, message, tmp_path, capsys, no_build):
    assert main([*argv, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("symerge: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_cli_runs_a_study_with_seeds_and_steps(bench, tmp_path, capsys, monkeypatch):
    built = []

    def build(cfg, progress, log):
        built.append(cfg.seed)
        return bench, {"model": "toy"}

    monkeypatch.setattr(study_runner, "suite_parts", lambda suite: (TextSuiteConfig, build, 8))
    out = tmp_path / "run"
    argv = ["study", "head-transfer", "--suite", "text", "--seeds", "0,1", "--steps", "4", "--out", str(out),
            "--no-progress", "--option", "ta_lambda=4e-1"]  # YAML 1.1 alone would read '4e-1' as a string
    assert main(argv) == 0
    assert built == [0, 1]
    assert "task_arithmetic/merged_average/symerge_heads" in capsys.readouterr().out
    for seed in (0, 1):
        record = read(out / f"seed-{seed}")
        assert record["settings"]["steps"] == 4 and record["config"]["seed"] == seed
        assert record["config"]["adapt"]["steps"] == 4  # the recorded config alone reproduces the run
        assert record["benchmark"] == {"model": "toy"}
        assert record["study_options"] == {"ta_lambda": 0.4}
        assert record["data"]["symerge"]["label"] == "symerge" and record["data"]["adamerging"]["label"] == "adamerging"
    assert main(argv) == 2 and built == [0, 1]  # the existing output is refused before any work
    assert "exists and is not empty" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and built == [0, 1, 0, 1]


# --- the suites' adaptation labels ------------------------------------------------------------------------------------
def test_suite_benchmarks_carry_the_true_adaptation_labels(tmp_path, monkeypatch):
    """The suites' benchmark builders: each expert scores on its labeled adaptation split as on its test split
    (misaligned labels would score at chance); dense: the adaptation scenes' own targets."""
    from test_dense_suite import TinyDenseEncoder, synthetic_sources
    from test_vision_suite import synthetic_image_task, tiny_config as vision_config, tiny_pretrained_cnn

    from symerge.data.fetch import cache_root
    from symerge.suites.dense import DenseSuiteConfig, dense_benchmark, load_splits
    from symerge.suites.runner import primary_scores, static_result
    from symerge.suites.vision import vision_benchmark

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    tasks = [synthetic_image_task("alpha", 3, 1), synthetic_image_task("beta", 2, 2)]
    bench, info = vision_benchmark(vision_config(), tiny_pretrained_cnn(), tasks, **QUIET)
    experts = static_result("individual", bench, bench.task_vectors(), {})
    for task, data in bench.tasks.items():
        assert len(data.adapt_labels) == len(data.adapt) == data.sizes["n_adapt"]
        adapt_accuracy = accuracy(experts.predict(task, data.adapt), data.adapt_labels)
        assert adapt_accuracy > 0.6 and abs(adapt_accuracy - primary_scores(experts, bench, "cpu")[task]) < 0.25
    assert info["sources"] == {"alpha": "synthetic", "beta": "synthetic"}
    from test_text_suite import synthetic_task, tiny_bert_dir

    from symerge.suites.text import text_benchmark

    text_cfg = TextSuiteConfig(max_test=30, max_adapt=30, max_train=60, n_val=10, max_len=12,
                               expert={"steps": 20, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2},
                               freeze_word_embeddings=False, methods=["individual"])
    text, info = text_benchmark(text_cfg, tiny_bert_dir(tmp_path / "bert"), [synthetic_task("alpha", 2, 1, n=120)],
                                **QUIET)
    experts = static_result("individual", text, text.task_vectors(), {})
    data = text.tasks["alpha"]
    assert len(data.adapt_labels) == data.sizes["n_adapt"] == 30
    assert accuracy(experts.predict("alpha", data.adapt), data.adapt_labels) > 0.75
    assert info["sources"] == {"alpha": "synthetic"} and "model_dir" in info
    torch.manual_seed(0)
    cfg = DenseSuiteConfig(n_train=24, n_adapt=8, n_val=4, n_test=8, expert={"steps": 2, "batch_size": 8, "lr": 1e-2,
                                                                              "head_lr": 1e-2})
    dense, info = dense_benchmark(cfg, TinyDenseEncoder().eval(), synthetic_sources(), **QUIET)
    assert info["test_images"].shape[0] == 8
    splits, _images = load_splits(cfg, synthetic_sources(), cache_root() / "dense" / "scenes")  # the cached scenes
    for task, data in dense.tasks.items():
        assert torch.equal(data.adapt, splits["adapt"]["inputs"]), task
        assert torch.equal(data.adapt_labels, splits["adapt"][task]), task
        assert not torch.equal(data.adapt_labels, splits["test"][task]), task


def test_pilot_and_head_transfer_on_the_dense_suite(tmp_path, monkeypatch):
    """Decoders as heads: per-pixel CE (segmentation) and L1 (depth, normals) re-training, mIoU / 1/error scores,
    all three tasks reading the same scenes. No cross-task sample limit here, so M_a's diagonal is the reference."""
    from test_dense_suite import TinyDenseEncoder, synthetic_sources

    from symerge.suites.dense import DenseSuiteConfig, dense_benchmark

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = DenseSuiteConfig(n_train=24, n_adapt=8, n_val=4, n_test=8, decoder_hidden=8,
                           expert={"steps": 4, "batch_size": 8, "lr": 1e-2, "head_lr": 1e-2},
                           adapt=AdaptSettings(regime="dense", steps=2, batch_size=4, lr=1e-2, layer_lr=1e-3, curve=[]))
    dense, _info = dense_benchmark(cfg, TinyDenseEncoder().eval(), synthetic_sources(), **QUIET)
    run_study("pilot", "dense", cfg, tmp_path / "pilot", study_options={"lambdas": [0.3], "head_epochs": 2},
              benchmark=dense, **QUIET)
    record = read(tmp_path / "pilot")
    m_a = record["data"]["cross_task"]["expert_heads"]
    assert [m_a[j][j] for j in range(3)] == pytest.approx([record["reference"][t] for t in dense.task_names])
    for matrix in record["data"]["cross_task"].values():
        assert all(v == v and v > 0 for row in matrix for v in row)
    markdown = (tmp_path / "pilot" / "study.md").read_text()
    assert "primary score" in markdown and "| segmentation | **" in markdown
    run_study("head-transfer", "dense", cfg, tmp_path / "transfer", benchmark=dense, **QUIET)
    table = read(tmp_path / "transfer")["data"]["table"]
    assert table["task_arithmetic"]["expert_heads"]["merged_normalized"] > 0


# --- the device path ------------------------------------------------------------------------------------------------
def test_pilot_and_head_transfer_on_a_second_device_equal_cpu(bench, tmp_path):
    from logical_device import logical_accelerator

    records = {}
    for name in ("device", "cpu"):
        with logical_accelerator() if name == "device" else contextlib.nullcontext("cpu") as device:
            cfg = tiny_config(device=device, adapt=AdaptSettings(regime="nlp", steps=2, batch_size=32, curve=[]))
            for study, options in (("pilot", {"lambdas": [0.3], "head_epochs": 1}), ("head-transfer", {})):
                run_study(study, "text", cfg, tmp_path / name / study, study_options=options, benchmark=bench,
                          **QUIET)
                records[name, study] = read(tmp_path / name / study)
    assert records["device", "pilot"]["config"]["device"] == "meta"
    for study in ("pilot", "head-transfer"):
        got, want = records["device", study]["headline"], records["cpu", study]["headline"]
        assert got == pytest.approx(want, abs=1e-6, nan_ok=True), study


def test_study_options_read_exponent_numbers_at_any_depth():
    """YAML 1.1 reads '1e-4' as a string; `--option` values read it as the number, in lists and mappings too."""
    from symerge.cli import parse_study_options

    options = parse_study_options(["lrs=[1e-4, 1.5E3, 2]", "trainer={lr: -1e-2, update: summed}", "block_lr=1e-4",
                                   "name=e5", "tag=nan"])
    assert options == {"lrs": [1e-4, 1500.0, 2], "trainer": {"lr": -0.01, "update": "summed"}, "block_lr": 1e-4,
                       "name": "e5", "tag": "nan"}


def test_scoring_an_unknown_split_is_refused_naming_it(bench):
    """Only the labeled test and validation splits are scored; any other name (e.g. 'train') used to score the
    validation split silently."""
    from symerge.suites.runner import static_result

    result = static_result("task_arithmetic", bench, bench.task_vectors(), {})
    assert set(bench.tasks.score(result, "cpu", "val")) == set(bench.task_names)
    with pytest.raises(ValidationError, match="split 'train'.*'test', 'val'"):
        bench.tasks.score(result, "cpu", "train")


def test_a_study_report_header_gives_the_steps_the_study_ran(bench, tmp_path, monkeypatch):
    """The tuning study's own `steps` option (3) wins over the suite's (here 4): the report's set-up line and the
    record say 3, not the suite's figure the study never ran."""
    monkeypatch.setattr(study_runner, "suite_parts", lambda suite: (TextSuiteConfig, None, 8))
    out = tmp_path / "run"
    record = study_runner.run_study("tuning", "text", TextSuiteConfig(), out, progress=False, log=lambda _: None,
                                    study_options={"method": "adamerging", "lrs": [1e-2], "steps": 3}, steps=4,
                                    benchmark=bench)
    assert record["steps"] == 3 and record["settings"]["steps"] == 4
    header = (out / "study.md").read_text().split("\n")[4]
    assert "; 3 adaptation steps;" in header, header


# --- which SyMerge the studies run ------------------------------------------------------------------------------------
def test_studies_run_the_paper_head_unless_asked_for_the_suite_row(bench, tmp_path, monkeypatch, capsys):
    """By default a study runs SyMerge as the paper's figures do (classifier head, its lr, CE); `symerge_as="suite"`
    (`--symerge-as suite`) runs the suite's main row instead (the text suite: MiniLM's 4th block at its lr, KL)."""
    from symerge.suites.text import SYMERGE_BLOCK_LR, TEXT_TASK_LAYER

    seen = []

    def probe(ctx):
        seen.append(ctx.settings)
        return StudyOutput({"headline": {"x": 1.0}}, "")

    monkeypatch.setitem(STUDIES, "probe", StudySpec("probe", probe, "test", "test"))
    cfg = TextSuiteConfig()
    paper = run_study("probe", "text", cfg, tmp_path / "paper", benchmark=bench, **QUIET)
    suite = run_study("probe", "text", cfg, tmp_path / "suite", benchmark=bench, symerge_as="suite", **QUIET)
    head, block = (s.method_options["symerge"] for s in seen)
    assert head["task_layer"] == "head" and head.get("loss", "ce") == "ce"
    assert seen[0].trainer_config("symerge", False).layer_lr == cfg.adapt.layer_lr
    assert block == {"task_layer": TEXT_TASK_LAYER, "loss": "kl"}
    assert seen[1].trainer_config("symerge", False).layer_lr == SYMERGE_BLOCK_LR
    assert (paper["symerge_as"], suite["symerge_as"]) == ("paper", "suite")
    with pytest.raises(ValidationError, match="symerge_as must be one of \\['paper', 'suite'\\], got 'block'"):
        run_study("probe", "text", cfg, tmp_path / "bad", benchmark=bench, symerge_as="block", **QUIET)
    assert not (tmp_path / "bad").exists() and len(seen) == 2
    monkeypatch.setattr(study_runner, "suite_parts", lambda suite: (TextSuiteConfig, lambda *a, **k: (bench, {}), 8))
    assert main(["study", "probe", "--symerge-as", "suite", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert seen[-1].method_options["symerge"]["loss"] == "kl"
    assert main(["study", "probe", "--symerge-as", "nope", "--out", str(tmp_path / "cli2")]) == 2
    assert "--symerge-as" in capsys.readouterr().err
