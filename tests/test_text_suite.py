"""The text suite end to end on a tiny random BERT and synthetic text (no downloads), plus a slow real run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from symerge.data.text_corpus import TextTask
from hf_tiny import word_bert_dir
from symerge.suites.runner import AdaptSettings
from symerge.suites.text import TextSuiteConfig, run_text_suite

WORDS = [f"w{i}" for i in range(60)]


def synthetic_task(name: str, classes: int, seed: int, n: int = 160) -> TextTask:
    """Each class has its own keywords hidden among random filler words."""
    rng = random.Random(seed)
    keywords = {c: rng.sample(WORDS[:30], 3) for c in range(classes)}
    texts, labels = [], []
    for i in range(n):
        label = i % classes
        words = rng.sample(WORDS[30:], 5) + [rng.choice(keywords[label])]
        rng.shuffle(words)
        texts.append(" ".join(words) + f" n{i}")
        labels.append(label)
    return TextTask(name, texts, labels, [f"c{c}" for c in range(classes)], "synthetic")


# Tests that only build the benchmark: no SyMerge row, whose suite default names a MiniLM block the tiny BERT lacks.
BENCH_ONLY = ["individual", "task_arithmetic"]


def tiny_bert_dir(path: Path) -> Path:
    return word_bert_dir(path, WORDS, 200, pairs=False)


def test_text_suite_pipeline_on_tiny_bert(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_bert_dir(tmp_path / "tiny-bert")
    tasks = [synthetic_task("alpha", 3, 1), synthetic_task("beta", 2, 2), synthetic_task("gamma", 4, 3)]
    cfg = TextSuiteConfig(
        max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12,
        expert={"steps": 30, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2}, freeze_word_embeddings=False,
        adapt=AdaptSettings(steps=6, batch_size=8, curve=[3, 6]), cross_task_samples=20,
        methods=["pretrained", "individual", "weight_averaging", "task_arithmetic", "task_arithmetic_val", "ties",
                 "adamerging", "surgery", "symerge", "wemoe"],
    )
    out = tmp_path / "run"
    run_text_suite(cfg, out, model_dir=model_dir, tasks=tasks, progress=False, log=lambda _: None)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["suite"] == "text" and on_disk["protocol"] == "held-out" and on_disk["seed"] == 0
    assert [t["name"] for t in on_disk["tasks"]] == ["alpha", "beta", "gamma"]
    assert {"num_classes", "n_train", "n_adapt", "n_test"} <= set(on_disk["tasks"][0])
    for name in cfg.methods:
        entry = on_disk["methods"][name]
        assert set(entry["per_task"]) == {"alpha", "beta", "gamma"}
        assert all(0.0 <= v <= 1.0 for v in entry["per_task"].values())
        for key in ("average", "normalized_average", "ece", "seconds", "peak_memory_mb"):
            assert isinstance(entry[key], float)
    assert on_disk["methods"]["individual"]["normalized_average"] == pytest.approx(1.0)
    assert [p["iterations"] for p in on_disk["methods"]["symerge"]["curve"]] == [3, 6]
    assert on_disk["methods"]["symerge"]["expert_runs_per_sample"] == {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}
    cross = on_disk["cross_task"]
    assert len(cross["original"]) == 3 and len(cross["symerge"][0]) == 3
    assert "task_arithmetic" in on_disk["head_transfer"]
    assert 0 < on_disk["diagnostics_seconds"] < on_disk["total_seconds"]
    for name in ("accuracy.png", "normalized.png", "cross_task.png", "lambda_symerge.png", "loss.png", "iterations.png"):
        assert (out / name).stat().st_size > 1000, name
    assert on_disk["methods"]["wemoe"]["inference_cost"]["router_params"] > 0
    kept = {name: entry.get("task_specific") for name, entry in on_disk["methods"].items()}
    assert kept["individual"]["of_encoder"] == pytest.approx(3.0)  # three experts' whole encoders
    assert 0 < kept["surgery"]["of_encoder"] < 1  # an adapter per task
    assert kept["task_arithmetic"] is None and kept["symerge"] is None  # SyMerge here trains the heads only
    markdown = (out / "report.md").read_text()
    assert "| symerge |" in markdown or "| **symerge** |" in markdown
    assert "## Inference cost" in markdown
    assert "Quality vs adaptation iterations" in markdown
    # experts are cached: a second run fine-tunes nothing
    messages: list[str] = []
    run_text_suite(cfg.model_copy(update={"methods": ["individual", "task_arithmetic"]}), tmp_path / "run2",
                   model_dir=model_dir, tasks=tasks, progress=False, log=messages.append)
    assert sum("cached" in m for m in messages) == 3


@pytest.mark.slow
def test_text_suite_quick_on_real_minilm(tmp_path):
    cfg = TextSuiteConfig.quick_preset()
    report = run_text_suite(cfg, tmp_path / "quick", progress=False)
    methods = report["methods"]
    assert methods["individual"]["average"] > 0.7
    assert methods["symerge"]["normalized_average"] > methods["task_arithmetic"]["normalized_average"]
    assert (tmp_path / "quick" / "report.md").exists()


def test_experts_fine_tuned_in_two_worker_processes_equal_the_sequential_ones(tmp_path, monkeypatch):
    """`expert_workers` 2 trains the uncached experts in 1-thread worker processes: same cache folders, same
    tensors as training them one after another here, reported in the jobs' order."""
    import torch

    from symerge.suites.text import text_benchmark

    model_dir = tiny_bert_dir(tmp_path / "tiny-bert")
    tasks = [synthetic_task("alpha", 3, 1), synthetic_task("beta", 2, 2), synthetic_task("gamma", 4, 3)]
    cfg = TextSuiteConfig(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12, methods=BENCH_ONLY,
                          expert={"steps": 12, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2})
    built = {}
    for workers in (1, 2):
        monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / f"cache-{workers}"))
        messages: list[str] = []
        torch.set_num_threads(1)
        bench, info = text_benchmark(cfg.model_copy(update={"expert_workers": workers}), model_dir, tasks,
                                     progress=False, log=messages.append)
        built[workers] = bench
        assert bench.task_names == ["alpha", "beta", "gamma"]
        # a fresh expert's head is like a loaded one: no gradients of its last training step left on it
        assert all(p.grad is None for head in bench.heads.values() for p in head.parameters())
        assert not any(e["cached"] for e in info["experts"].values())
        assert sum("worker process" in m for m in messages) == (3 if workers == 2 else 0)
    folders = {w: sorted(p.name for p in (tmp_path / f"cache-{w}" / "experts" / "text").iterdir()) for w in (1, 2)}
    assert folders[1] == folders[2] and len(folders[1]) == 3  # no temp dirs left behind
    for task in ["alpha", "beta", "gamma"]:
        for key, tensor in built[1].experts[task].items():
            torch.testing.assert_close(built[2].experts[task][key], tensor, rtol=1e-5, atol=1e-6, msg=f"{task} {key}")
        for key, tensor in built[1].heads[task].state_dict().items():
            torch.testing.assert_close(built[2].heads[task].state_dict()[key], tensor, rtol=1e-5, atol=1e-6)
    # cached and new experts mixed: the cached load here, the new one trains in a worker, the order stays the jobs'
    messages = []
    bench, info = text_benchmark(cfg.model_copy(update={"expert_workers": 2}), model_dir,
                                 [tasks[0], synthetic_task("delta", 2, 4), *tasks[1:]], progress=False,
                                 log=messages.append)
    assert bench.task_names == ["alpha", "delta", "beta", "gamma"]
    assert [info["experts"][t]["cached"] for t in bench.task_names] == [True, False, True, True]
    assert [m for m in messages if "worker process" in m] == ["expert delta: fine-tuning in a worker process"]


def test_expert_workers_on_a_gpu_are_refused_in_the_config(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as the config can tell
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TextSuiteConfig(device="cuda").expert_workers == 1
    with pytest.raises(ValueError, match="expert_workers > 1 trains experts in CPU processes; on 'cuda'"):
        TextSuiteConfig(device="cuda", expert_workers=2)


def test_a_failing_worker_names_its_task_and_leaves_no_half_written_expert(tmp_path, monkeypatch):
    from symerge.suites.text import text_benchmark

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_bert_dir(tmp_path / "tiny-bert")
    cfg = TextSuiteConfig(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12, expert_workers=2,
                          methods=BENCH_ONLY, expert={"steps": 2, "batch_size": 16, "loss": "hinge"})
    with pytest.raises(RuntimeError, match="expert alpha: fine-tuning in a worker process failed: ValueError: "
                                           "fine-tuning loss must be one of"):
        text_benchmark(cfg, model_dir, [synthetic_task("alpha", 3, 1), synthetic_task("beta", 2, 2)],
                       progress=False, log=lambda _: None)
    experts = tmp_path / "cache" / "experts" / "text"
    assert not experts.exists() or not any(experts.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_each_expert_is_reported_as_soon_as_it_is_ready(tmp_path, monkeypatch, workers):
    """The log says 'expert X: fine-tuned' before the next tasks' jobs are made (not all at the end), in order."""
    import symerge.suites.text as text_suite

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    messages: list[str] = []
    made = text_suite.tokenized_task

    def logged(name, *args, **kwargs):
        messages.append(f"made {name}")
        return made(name, *args, **kwargs)

    monkeypatch.setattr(text_suite, "tokenized_task", logged)
    cfg = TextSuiteConfig(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12, expert_workers=workers,
                          methods=BENCH_ONLY, expert={"steps": 2, "batch_size": 16})
    tasks = [synthetic_task(n, 2, i) for i, n in enumerate(["a", "b", "c", "d"])]
    text_suite.text_benchmark(cfg, tiny_bert_dir(tmp_path / "tiny-bert"), tasks, progress=False,
                              log=messages.append)
    events = [m.split(":")[0] for m in messages if m.startswith("made") or "fine-tuned in" in m]
    if workers == 1:  # one after another: each reported before the next job is made
        assert events == ["made a", "expert a", "made b", "expert b", "made c", "expert c", "made d", "expert d"]
    else:  # at most workers + 1 submitted before the first is reported
        assert events[:4] == ["made a", "made b", "made c", "expert a"] and events[-1] == "expert d"


def test_a_task_layer_the_model_lacks_fails_before_any_expert_trains(tmp_path, monkeypatch):
    """The suite's default SyMerge layer (MiniLM's `body.encoder.layer.3`) does not exist in a 2-block model: the run
    stops in seconds, naming the row and the module, with no expert fine-tuned or cached."""
    from symerge.errors import ValidationError
    from symerge.suites.text import TEXT_TASK_LAYER, text_benchmark

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    tasks = [synthetic_task("alpha", 3, 1), synthetic_task("beta", 2, 2)]
    cfg = TextSuiteConfig(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=12,
                          expert={"steps": 30, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2},
                          methods=["individual", "task_arithmetic", "symerge"])
    messages: list[str] = []
    with pytest.raises(ValidationError, match=f"method 'symerge': task_layer '{TEXT_TASK_LAYER}': no encoder tensor"):
        text_benchmark(cfg, tiny_bert_dir(tmp_path / "tiny-bert"), tasks, progress=False, log=messages.append)
    assert not any("expert" in m for m in messages)
    assert not (tmp_path / "cache" / "experts").exists()
