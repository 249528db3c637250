"""`symerge bench text`: the offline text benchmark on all-MiniLM-L6-v2 (packaged on PyPI) and packaged tasks (the 8
defaults, `--tasks text14` / `text20` / `all` for more: sentence-pair classification and regression too).

Pipeline: load tasks -> seeded disjoint splits (train for experts only / unlabeled adaptation / labeled test, plus
a small labeled validation split carved from train for `task_arithmetic_val`) -> fine-tune one expert per task
(MiniLM + linear head on mean-pooled tokens, one output and L1 for regression; pairs read as one `[CLS] a [SEP] b`
sequence; cached by content hash) -> run the methods -> evaluate, diagnose, report.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, ConfigDict, Field

from symerge.suites.base import (CLASSIFICATION_METHODS, ClassificationSuiteConfig, ExpertJob, check_task_layers,
                                 fine_tune_experts, run_and_report, with_rows_after)
from symerge.suites.finetune import FinetuneConfig
from symerge.suites.runner import AdaptSettings, Benchmark, TaskData, known_names

# SyMerge runs unfiltered in the NLP regime as in the paper; the filtered row (its vision setting) and the row with
# the paper's classifier head as the task layer beside it.
TEXT_METHODS = with_rows_after(CLASSIFICATION_METHODS, {"symerge": ["symerge_filtered", "symerge_head"]})
QUICK_TASKS = ["bbc_topic", "trec_question", "sms_spam", "language_id"]
# `make demo` (`--preset demo`): the full suite's settings and numbers for the paper's main rows; the variant rows
# (`adamerging_summed`, `symerge_filtered`, `symerge_head`, `task_arithmetic_val`, weight averaging) and WEMoE are
# left to the full run.
DEMO_METHODS = ["pretrained", "individual", "task_arithmetic", "ties", "adamerging", "surgery", "symerge"]
# ... and its adaptive rows stop at 50 iterations, a mark of the full run's curve, so each demo row equals the full
# report's 50-iteration row (seed 0: SyMerge 98.2 % normalized against 98.3 at 100, Surgery 91.7 against 93.6). At
# 100 the warm demo took 11:08 to 13:59 on the same machine within a day; 50 keeps it well under 12 minutes.
DEMO_STEPS = 50
# Test-time baselines as their papers / official code run them, with the suite's iterations and batch (the paper gives
# every test-time method the same samples):
# - AdaMerging: the SyMerge paper's NLP rate 5e-4 (it runs every test-time method with its own settings per domain);
#   `adamerging_summed` beside it updates once per iteration on the summed task losses, as AdaMerging's code does.
# - WEMoE: FusionBench's configuration for its language models (Flan-T5): Adam lr 1e-4, routing weights averaged
#   over the batch (`batch_reduce`), task losses accumulated into one update per iteration. `symerge study tuning`
#   measured it on this suite (docs/studies/text/wemoe-tuning): 92.0 / 91.4 / 91.4 % normalized at 50 / 100 / 200
#   iterations, against task arithmetic's 91.1 %; per-sample routing updated per task at lr 1e-3 fell to 83.0 %.
# - Surgery: its adapters at lr 1e-2, the best of `symerge study tuning --suite text --option method=surgery`
#   (docs/studies/text/surgery-tuning, 100 iterations): 3e-2 → 92.6 % normalized, 1e-2 → 97.0, 3e-3 → 96.4,
#   1e-3 (the official code's) → 93.5.
# SyMerge's one task-specific layer is MiniLM's 4th block (`body.encoder.layer.3`, 1.8 M weights per task) at lr
# 4e-4, its classifier-head row at 1e-2. The block's lr was picked on the labeled validation split, never on the test
# split (`symerge study tuning --option split=val`, docs/studies/text/symerge-block-lr-val, 100 iterations): 4e-4 led
# 1e-4 on all three seeds, 97.7 / 98.5 / 97.7 % normalized against 96.7 / 97.9 / 97.4 for seeds 0 / 1 / 2.
# On the test split, with CE, the 3-seed mean stayed where it was (97.88 ± 0.52 % against 97.87 ± 0.42;
# docs/text/hard-labels/seeds and docs/text/block-lr-1e-4/seeds).
# Its objective is KL to the experts' soft predictions (`loss: kl`, paper Fig. C's soft labels) instead of CE to their
# hard labels, also picked on the validation split (docs/studies/text/symerge-kl-val, block at 4e-4, 100 iterations):
# 98.25 / 98.23 / 99.17 % normalized for seeds 0 / 1 / 2 against CE's 97.66 / 98.52 / 97.73. The filtered row keeps
# it; the `symerge_head` row is the paper's SyMerge as published (classifier head, CE to hard labels), and so are the
# studies that reproduce the paper's head (`studies.runner.paper_head_settings`). On the test split (docs/text/seeds)
# SyMerge moved from 97.88 ± 0.52 % (CE) to 98.23 ± 0.45 over the 3 seeds.
# `symerge study ablation --option block_lr=1e-4` (docs/studies/text/ablation-block-lr, earlier experts) had every
# block but the last above the head, the 4th the best single one; on the suite's experts, seed 0, 100 iterations
# (`symerge study tuning --option method=symerge`, docs/studies/text/task-layer): block 98.7 % normalized against the
# head's 97.5 (the paper's Table B finds any block ≈ the classifier on ViT-B/32).
TEXT_TASK_LAYER = "block:body.encoder.layer.3"
SYMERGE_BLOCK_LR = 4e-4
HEAD_LR = 1e-2  # the suite's task-layer lr (heads); the symerge_head row resets the block's lr to it
TEXT_PER_METHOD: dict[str, dict[str, Any]] = {"adamerging": {"lr": 5e-4}, "wemoe": {"lr": 1e-4, "update": "summed"},
                                              "symerge": {"layer_lr": SYMERGE_BLOCK_LR},
                                              "symerge_head": {"layer_lr": HEAD_LR}}
TEXT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"wemoe": {"batch_reduce": True}, "surgery": {"adapter_lr": 1e-2},
                                                  "symerge": {"task_layer": TEXT_TASK_LAYER, "loss": "kl"},
                                                  "symerge_head": {"loss": "ce"}}


def text_task_names() -> list[str]:
    from symerge.data.text_tasks import TEXT_TASKS

    return list(TEXT_TASKS)


def expand_task_sets(value: Any) -> Any:
    """`tasks` as given -> task names: a single string is one name, set names (`all`, `text8`, `text8_v1`, `text14`,
    `text20`) become their tasks; anything else is left to the field's own checks."""
    from symerge.data.text_tasks import expand_task_names

    names = [value] if isinstance(value, str) else value
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return expand_task_names(names)
    return value


class TextSuiteConfig(ClassificationSuiteConfig):
    """Everything that defines a text-suite run; the defaults are the documented benchmark."""

    model_config = ConfigDict(extra="forbid")

    tasks: Annotated[list[str], BeforeValidator(expand_task_sets), known_names("text task", text_task_names)] = Field(
        default_factory=list,
        description="task names or set names (text8, text8_v1, text14, text20, all); empty = text8")
    methods: list[str] = Field(default_factory=lambda: list(TEXT_METHODS))
    max_train: int = 2000
    n_val: int = 100
    max_len: int = 64
    # The paper's regime (issue 17): the head trains at the encoder's lr from a random init, so the task knowledge
    # sits in the encoder (as CLIP experts keep a frozen zero-shot head) and the pretrained encoder with the experts'
    # heads is near chance (29.5 % normalized on `text8` over 3 seeds; 82 % on `text8_v1` with the earlier head lr
    # 2e-3). 2e-4 gave the most accurate experts of 1e-4 / 2e-4 in a probe (trec 96.0 vs 94.8 %). On `text8_v1` task
    # arithmetic stayed near 89 % normalized with 2e-4, 5e-4 or a frozen random head alike
    # (docs/benchmarks/expert_regime.jsonl); on the default `text8` it is 84.1 ± 3.3 % (docs/text/seeds).
    expert: dict[str, Any] = Field(default_factory=lambda: {"steps": 150, "batch_size": 32, "lr": 2e-4, "head_lr": 2e-4})
    freeze_word_embeddings: bool = True
    # 100 iterations (one batch of 16 per task each): the quality/time knee measured on this suite; the report's
    # iteration table shows 25 / 50 / 100. At 200 (docs/studies/text/iterations-200, block lr 1e-4) SyMerge moves
    # 97.9 -> 98.0 % normalized over 3 seeds, Surgery 93.4 -> 94.4, AdaMerging stays. λ and head learning rates
    # 1e-2 (measured better than the paper's NLP 5e-4).
    adapt: AdaptSettings = Field(default_factory=lambda: AdaptSettings(regime="nlp", steps=100, batch_size=16,
                                                                        lr=1e-2, layer_lr=HEAD_LR,
                                                                        curve=[25, 50, 100],
                                                                        per_method=copy.deepcopy(TEXT_PER_METHOD),
                                                                        method_options=copy.deepcopy(
                                                                            TEXT_METHOD_OPTIONS)))

    @classmethod
    def presets(cls) -> dict[str, Callable[..., Any]]:
        return {**super().presets(), "demo": cls.demo_preset}

    @classmethod
    def demo_preset(cls, **overrides: Any) -> "TextSuiteConfig":
        """`make demo`: the default suite with its main rows only (`DEMO_METHODS`), adaptive rows stopped at
        `DEMO_STEPS` iterations (a mark of the full run's curve: each row scores as the full run does there) and
        evaluated once, at the end (each curve point is one more test pass, ≈ 15 s on 2 cores), and a 50-sample
        cross-task matrix."""
        base = cls()
        values = {"methods": list(DEMO_METHODS), "cross_task_samples": 50,
                  "adapt": base.adapt.model_copy(update={"steps": DEMO_STEPS, "curve": []}), **overrides}
        return cls(**values)

    @classmethod
    def quick_preset(cls, **overrides: Any) -> "TextSuiteConfig":
        """A ≤ 3-minute smoke run: 4 tasks, small splits, short training."""
        base = dict(tasks=list(QUICK_TASKS), max_test=100, max_adapt=100, max_train=300, n_val=40, max_len=48,
                    expert={"steps": 40, "batch_size": 16, "lr": 2e-4, "head_lr": 2e-4},
                    adapt=AdaptSettings(regime="nlp", steps=30, batch_size=16, lr=1e-2, layer_lr=HEAD_LR, curve=[10, 30],
                                        per_method=copy.deepcopy(TEXT_PER_METHOD),
                                        method_options=copy.deepcopy(TEXT_METHOD_OPTIONS)),
                    cross_task_samples=60, quick=True)
        return cls(**{**base, **overrides})


def split_sizes(n: int, cfg: TextSuiteConfig) -> tuple[int, int, int]:
    """(train, adapt, test) sizes: test ≤ 25 %, adapt ≤ 30 % of the task, the rest (≤ max_train) trains experts."""
    n_test = min(cfg.max_test, n // 4)
    n_adapt = min(cfg.max_adapt, (3 * n) // 10)
    return min(cfg.max_train, n - n_test - n_adapt), n_adapt, n_test


def task_kind(task: Any) -> str:
    """`classification` or `regression`, as the task's data says (`TextTask.kind`)."""
    return str(getattr(task, "kind", "classification"))


def split_part(split: Any, part: str, regression: bool) -> tuple[list[str], list[str] | None, torch.Tensor]:
    """One split's first texts, second texts (pair tasks) and truth: class indices, or float targets [n, 1]
    (the shape of a 1-output head, which the L1 losses of fine-tuning and adaptation compare against)."""
    texts, labels = getattr(split, part)
    second = split.texts_b[part] if split.texts_b is not None else None
    if regression:
        return texts, second, torch.tensor(split.targets[part], dtype=torch.float32).reshape(-1, 1)
    return texts, second, torch.tensor(labels)


def tokenized_task(name: str, class_names: list[str], texts: Any, tokenizer: Any, cfg: TextSuiteConfig) -> tuple[TaskData, dict[str, Any]]:
    """Tokenize one task's splits (`texts`: the task); returns TaskData and the expert's training inputs / labels
    (class indices, or float targets [n, 1] for regression tasks)."""
    from symerge.data.text_tasks import split_task
    from symerge.evaluation.metrics import classification_score, regression_score
    from symerge.models.text import tokenize

    regression = task_kind(texts) == "regression"
    n_train, n_adapt, n_test = split_sizes(len(texts.texts), cfg)
    split = split_task(texts, n_train, n_adapt, n_test, cfg.seed)
    train_a, train_b, train_y = split_part(split, "train", regression)
    adapt_a, adapt_b, adapt_y = split_part(split, "adapt", regression)
    test_a, test_b, test_y = split_part(split, "test", regression)
    n_val = min(cfg.n_val, len(train_a) // 5)
    head = lambda xs: None if xs is None else xs[:n_val]  # noqa: E731
    tail = lambda xs: None if xs is None else xs[n_val:]  # noqa: E731
    enc = lambda a, b: tokenize(tokenizer, a, cfg.max_len, b)  # noqa: E731
    data = TaskData(
        name=name, class_names=list(class_names), adapt=enc(adapt_a, adapt_b), test=enc(test_a, test_b),
        test_labels=test_y, val=enc(head(train_a), head(train_b)), val_labels=train_y[:n_val],
        adapt_labels=adapt_y,
        sizes={"n_train": len(train_a) - n_val, "n_val": n_val, "n_adapt": len(adapt_a), "n_test": len(test_a)},
        scorer=regression_score if regression else classification_score,
        objective="regression" if regression else "classification",
    )
    return data, {"inputs": enc(tail(train_a), tail(train_b)), "labels": train_y[n_val:]}


def build_text_benchmark(
    cfg: TextSuiteConfig,
    model_dir: Path,
    tasks: Sequence[Any],
    cache_dir: Path,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Benchmark, dict[str, Any]]:
    """Tokenize, fine-tune (or load cached) experts and assemble the Benchmark."""
    from symerge.models.text import linear_head, load_text_encoder

    encoder, tokenizer = load_text_encoder(model_dir)
    check_task_layers(cfg, encoder)
    frozen = ("body.embeddings.word_embeddings.",) if cfg.freeze_word_embeddings else ()
    ft = FinetuneConfig(**cfg.expert, frozen_prefixes=frozen, seed=cfg.seed)
    # regression experts train by L1 on a 1-output head (the suite's `expert` recipe otherwise)
    recipes = {"classification": ft, "regression": dataclasses.replace(ft, loss="l1")}
    kinds = [task_kind(task) for task in tasks]

    def jobs() -> Iterator[ExpertJob]:
        for index, (task, kind) in enumerate(zip(tasks, kinds)):
            data, train = tokenized_task(task.name, task.class_names, task, tokenizer, cfg)
            head = linear_head(encoder.hidden_size, len(task.class_names), cfg.seed * 1000 + index)
            yield ExpertJob(data, head, train["inputs"], train["labels"], recipes[kind])

    # one recipe in the report unless the tasks mix kinds (then one per task, as the dense suite reports)
    return fine_tune_experts(encoder, jobs(), cache_dir, cfg.device, log, progress,
                             per_task_finetune=len(set(kinds)) > 1, workers=cfg.expert_workers)


def load_default_tasks(names: Sequence[str]) -> list[Any]:
    from symerge.data.text_tasks import DEFAULT_TASKS, load_text_task

    return [load_text_task(n) for n in (names or DEFAULT_TASKS)]


def text_benchmark(
    cfg: TextSuiteConfig,
    model_dir: Path | None = None,
    tasks: Sequence[Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Benchmark, dict[str, Any]]:
    """The suite's benchmark without running any method (the bench and `symerge study` share it): model and tasks
    (packaged defaults unless given), experts fine-tuned or loaded from the cache; `info` is JSON-able."""
    from symerge.data.fetch import cache_root, fetch_minilm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(cfg.seed)
    model_dir = Path(model_dir) if model_dir is not None else fetch_minilm()
    task_list = list(tasks) if tasks is not None else load_default_tasks(cfg.tasks)
    log(f"text suite: {len(task_list)} tasks, protocol {cfg.protocol}, model {model_dir}")
    bench, info = build_text_benchmark(cfg, model_dir, task_list, cache_root() / "experts" / "text", log, progress)
    return bench, {**info, "model_dir": str(model_dir), "sources": {t.name: t.source for t in task_list}}


def run_text_suite(
    cfg: TextSuiteConfig,
    out_dir: Path,
    model_dir: Path | None = None,
    tasks: Sequence[Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole suite and write report.json / report.md / plots into `out_dir`; returns the report."""
    start = time.perf_counter()
    bench, info = text_benchmark(cfg, model_dir, tasks, progress, log)
    return run_and_report("text", cfg, bench, out_dir, lambda _outcomes: {
        **info, "total_seconds": time.perf_counter() - start}, progress=progress, log=log,
        cross_task_samples=cfg.cross_task_samples)
