"""The text suite on sentence-pair and regression tasks, end to end on a tiny random BERT (no downloads): the
tokenized task data, the experts' recipes, and merging methods scoring every kind of task."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from symerge.batching import take
from symerge.data.text_corpus import TextTask, build_pair_task, build_regression_task
from hf_tiny import word_bert_dir
from symerge.suites.runner import AdaptSettings
from symerge.suites.text import TextSuiteConfig, text_benchmark, tokenized_task

WORDS = [f"w{i}" for i in range(60)]


def tiny_pair_bert_dir(path: Path) -> Path:
    """A random 2-layer BERT and a word-level tokenizer that encodes pairs as `[CLS] a [SEP] b [SEP]`."""
    return word_bert_dir(path, WORDS, 400, pairs=True)


def fake_class_task(n: int = 160) -> TextTask:
    """3 classes, each with its own keywords among filler words."""
    rng = random.Random(1)
    texts, labels = [], []
    for i in range(n):
        words = rng.sample(WORDS[30:], 4) + [WORDS[3 * (i % 3) + rng.randrange(3)]]
        rng.shuffle(words)
        texts.append(" ".join(words) + f" n{i}")
        labels.append(i % 3)
    return TextTask("topic", texts, labels, ["c0", "c1", "c2"], "synthetic")


def fake_pair_task(n: int = 160) -> TextTask:
    """Does the second text repeat the first's keyword (`match`) or another one (`other`)?"""
    rng = random.Random(2)
    rows = []
    for i in range(n):
        key = rng.choice(WORDS[10:20])
        other = rng.choice([w for w in WORDS[10:20] if w != key])
        label = "match" if i % 2 else "other"
        rows.append((label, f"{key} {rng.choice(WORDS[40:])} n{i}", f"{key if label == 'match' else other} "
                     f"{rng.choice(WORDS[40:])} n{200 + i}"))
    return build_pair_task("pairs", rows, "synthetic", class_order=["other", "match"])


def fake_regression_task(n: int = 160) -> TextTask:
    """The target counts the 'positive' words minus the 'negative' ones, plus noise."""
    rng = random.Random(3)
    rows = []
    for i in range(n):
        pos, neg = rng.randrange(4), rng.randrange(4)
        words = rng.sample(WORDS[20:25], pos) + rng.sample(WORDS[25:30], neg) + rng.sample(WORDS[40:], 2)
        rng.shuffle(words)
        rows.append((pos - neg + rng.gauss(0, 0.3), " ".join(words) + f" n{i}"))
    return build_regression_task("intensity", rows, "synthetic")


def small_config(**overrides) -> TextSuiteConfig:
    base = dict(max_test=40, max_adapt=40, max_train=80, n_val=16, max_len=16,
                expert={"steps": 40, "batch_size": 16, "lr": 1e-3, "head_lr": 1e-2}, freeze_word_embeddings=False,
                adapt=AdaptSettings(steps=6, batch_size=8, curve=[3, 6]), cross_task_samples=20,
                methods=["pretrained", "individual", "weight_averaging", "task_arithmetic", "task_arithmetic_val",
                         "adamerging", "surgery", "symerge", "wemoe"])
    return TextSuiteConfig(**{**base, **overrides})


def test_tokenized_pair_and_regression_tasks(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_pair_bert_dir(tmp_path / "bert")))
    cfg = small_config()
    pair = fake_pair_task()
    data, train = tokenized_task(pair.name, pair.class_names, pair, tokenizer, cfg)
    assert data.objective == "classification" and data.num_classes == 2
    assert set(data.test) == {"input_ids", "attention_mask", "token_type_ids"}
    ids, types = data.test["input_ids"][0], data.test["token_type_ids"][0]
    assert int((ids == 3).sum()) == 2 and int(types.max()) == 1  # two [SEP]; the second text has type 1
    assert data.test["input_ids"].shape[1] == cfg.max_len and train["labels"].dtype == torch.int64
    assert data.sizes == {"n_train": 64, "n_val": 16, "n_adapt": 40, "n_test": 40}

    reg = fake_regression_task()
    data, train = tokenized_task(reg.name, reg.class_names, reg, tokenizer, cfg)
    assert data.objective == "regression" and data.num_classes == 1 and data.class_names == ["score"]
    assert train["labels"].shape == (64, 1) and train["labels"].dtype == torch.float32
    assert data.test_labels.shape == (40, 1) and data.val_labels.shape == (16, 1) and data.adapt_labels.shape == (40, 1)
    truth = dict(zip(reg.texts, reg.targets))
    decoded = tokenizer.decode(data.test["input_ids"][0], skip_special_tokens=True)
    assert data.test_labels[0, 0].item() == pytest.approx(truth[decoded])
    perfect = data.scorer(data.test_labels.clone(), data.test_labels)
    assert perfect.primary == pytest.approx(1.0) and perfect.ece is None


def test_text_suite_merges_pair_regression_and_classification_tasks(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from symerge.suites.runner import run_methods

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    model_dir = tiny_pair_bert_dir(tmp_path / "bert")
    tasks = [fake_class_task(), fake_pair_task(), fake_regression_task()]
    cfg = small_config()
    bench, info = text_benchmark(cfg, model_dir=model_dir, tasks=tasks, progress=False, log=lambda _: None)
    assert [bench.tasks[t].objective for t in bench.task_names] == ["classification", "classification", "regression"]
    assert bench.heads["intensity"].out_features == 1 and bench.heads["pairs"].out_features == 2
    assert info["finetune"]["intensity"]["loss"] == "l1" and "loss" not in info["finetune"]["topic"]
    outcomes = run_methods(bench, cfg.methods, cfg.protocol, cfg.adapt_settings(), progress=False,
                           log=lambda _: None)
    for name in cfg.methods:
        per_task = outcomes[name].per_task
        assert set(per_task) == {"topic", "pairs", "intensity"}, name
        assert all(math.isfinite(v) for v in per_task.values()), (name, per_task)
    for name in ("task_arithmetic", "symerge"):
        metrics = outcomes[name].metrics
        assert {"pearson", "spearman", "mae"} <= set(metrics["intensity"]) and "mcc" in metrics["pairs"]
    # the single-text experts learned their easy synthetic tasks (matching words across a pair is beyond a random
    # 2-layer BERT in 40 steps: the pair task is checked for its plumbing only)
    individual = outcomes["individual"].per_task
    assert individual["topic"] > 0.5 and individual["intensity"] > 0.5, individual
    # a second build finds every expert in the cache
    messages: list[str] = []
    text_benchmark(cfg, model_dir=model_dir, tasks=tasks, progress=False, log=messages.append)
    assert sum("cached" in m for m in messages) == 3


def test_diagnostics_score_regression_heads_with_their_own_scorer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The cross-task matrix reads every head with its task's scorer: a 1-output regression head once crashed it
    (top-1 accuracy asked for ≥ 2 classes)."""
    from symerge.suites.diagnostics import run_diagnostics
    from symerge.suites.runner import run_methods

    monkeypatch.setenv("SYMERGE_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)
    tasks = [fake_class_task(), fake_regression_task()]
    cfg = small_config(methods=["individual", "task_arithmetic", "symerge"])
    bench, _ = text_benchmark(cfg, model_dir=tiny_pair_bert_dir(tmp_path / "bert"), tasks=tasks, progress=False,
                              log=lambda _: None)
    outcomes = run_methods(bench, cfg.methods, cfg.protocol, cfg.adapt_settings(), progress=False, log=lambda _: None)
    diagnostics = run_diagnostics(bench, outcomes, 20, "cpu", progress=False)
    original = diagnostics["cross_task"]["original"]
    # the diagonal is each expert's own primary score (Pearson r for the regression task) on those 20 samples
    for i, task in enumerate(bench.task_names):
        data = bench.tasks[task]
        expert = outcomes["individual"].result
        own = data.scorer(expert.predict(task, take(data.test, slice(0, 20)), device="cpu"), data.test_labels[:20])
        assert original[i][i] == pytest.approx(own.primary, abs=1e-5), task
