"""The text-task registry (``TEXT_TASKS``, the named sets ``TASK_SETS``: ``text8``, ``text8_v1``, ``text14``,
``text20``, ``all``), the JSON cache under ``<cache>/tasks/<name>.json`` (a second load is instant) and the seeded,
stratified, disjoint splits of a task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from symerge.atomic import atomic_file
from symerge.data.fetch import cache_root, load_cached_task
from symerge.data import text_sources, text_sources_extra
from symerge.data.splits import stratified_split
from symerge.data.text_corpus import CACHE_VERSION, MAX_TEXTS, TaskSplit, TextTask

TEXT8_V1: list[str] = [
    "bbc_topic", "airline_sentiment", "chatterbot_topic", "trec_question", "sms_spam", "language_id",
    "wordnet_supersense", "movie_sentiment",
]  # fmt: skip
"""The first benchmark (single-sentence classification), the default until issue 17: with its near-trivial
``sms_spam`` (task arithmetic keeps 99 % of the expert) and a second sentiment task (``airline_sentiment`` beside
``movie_sentiment``), merging barely interferes there (task arithmetic 89 % normalized over 3 seeds)."""
MORE_CLASSIFICATION: list[str] = [
    "trec_fine", "verb_supersense", "fortune_topic", "tweet_domain", "apple_sentiment", "deflategate_sentiment",
]  # fmt: skip
"""Single-sentence classification tasks added to ``text8_v1`` in ``text14``."""
TEXT8: list[str] = [
    "bbc_topic", "chatterbot_topic", "trec_question", "language_id", "wordnet_supersense", "movie_sentiment",
    "fortune_topic", "tweet_domain",
]  # fmt: skip
"""The default benchmark: one task per kind of text, as the paper's 8 vision tasks are one per kind of image (news,
dialog, questions, languages, word senses, film reviews, quotations, tweets). ``text8_v1`` with its spam and its
second sentiment task swapped for fortune topics and tweet domains (issue 17's difficulty targets)."""
REGRESSION: list[str] = ["vader_tweets", "vader_nyt", "vader_amazon"]
PAIR_TASKS: list[str] = ["gloss_match_verb", "gloss_match_noun", "dialog_reply"]

TEXT_TASKS: dict[str, Callable[[], TextTask]] = {
    **{name: getattr(text_sources, f"load_{name}") for name in TEXT8_V1},
    **{name: getattr(text_sources_extra, f"load_{name}") for name in MORE_CLASSIFICATION + REGRESSION + PAIR_TASKS},
}
"""Registry name -> uncached builder (fetches what it needs). Prefer ``load_text_task``."""

DEFAULT_TASKS: list[str] = list(TEXT8)

TASK_SETS: dict[str, list[str]] = {
    "text8": list(TEXT8),
    "text8_v1": list(TEXT8_V1),
    "text14": TEXT8_V1 + MORE_CLASSIFICATION,
    "text20": TEXT8_V1 + MORE_CLASSIFICATION + REGRESSION + PAIR_TASKS,
    "all": list(TEXT_TASKS),
}
"""Named task lists a run may ask for instead of task names (``all`` = every registered task)."""


def expand_task_names(names: Sequence[str]) -> list[str]:
    """Task names with set names (``TASK_SETS``) replaced by their tasks.

    A task a set already brought in is not added again; a task NAMED twice stays twice, so the
    config's repeat check still reports it. Unknown names raise ``ValueError`` listing both kinds.
    """
    out: list[str] = []
    named: set[str] = set()
    for name in names:
        if name in TASK_SETS:
            out.extend(t for t in TASK_SETS[name] if t not in out)
        elif name in TEXT_TASKS:
            if name in named or name not in out:
                out.append(name)
            named.add(name)
        else:
            raise ValueError(
                f"unknown text task '{name}' (nor a task set); tasks: {', '.join(TEXT_TASKS)}; "
                f"sets: {', '.join(TASK_SETS)}"
            )
    return out


# --------------------------------------------------------------------------- caching


def _read_cached(path: Path) -> TextTask | None:
    """The cached task, or None if missing, unreadable or built by other settings."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if data.get("version") != CACHE_VERSION or data.get("max_texts") != MAX_TEXTS:
        return None
    try:
        return TextTask(
            name=data["name"],
            texts=data["texts"],
            labels=data["labels"],
            class_names=data["class_names"],
            source=data["source"],
            texts_b=data.get("texts_b"),
            targets=data.get("targets"),
        )
    except (KeyError, TypeError, ValueError):  # damaged file: rebuild
        return None


def _write_cached(path: Path, task: TextTask) -> None:
    """Atomic JSON write (temp file + rename) so readers never see a partial file.

    Unset optional fields are left out, so single-sentence classification caches keep their
    original layout.
    """
    fields = {k: v for k, v in asdict(task).items() if v is not None}
    payload = {"version": CACHE_VERSION, "max_texts": MAX_TEXTS, **fields}
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, ensure_ascii=False)


def load_text_task(name: str) -> TextTask:
    """Load a registered task, from the JSON cache when present (fetching data otherwise)."""
    return load_cached_task("text", name, TEXT_TASKS, cache_root() / "tasks" / f"{name}.json", _read_cached,
                            _write_cached)


# --------------------------------------------------------------------------- splitting


def split_task(task: TextTask, n_train: int, n_adapt: int, n_test: int, seed: int) -> TaskSplit:
    """Seeded, stratified, disjoint train/adapt/test splits of ``task``.

    Sizes are capped (scaled down proportionally) to what the task holds. Identical texts (for
    pair tasks: identical pairs) are collapsed first (first row wins), so one can never appear in
    two splits. Pairs stay together and regression targets follow their texts; regression tasks
    are stratified by their target bins.
    """
    keys: Sequence[Hashable] = task.texts if task.texts_b is None else list(zip(task.texts, task.texts_b))
    first: dict[Hashable, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    rows = list(first.values())
    labels = [task.labels[i] for i in rows]
    chosen = stratified_split(task.name, labels, {"test": n_test, "adapt": n_adapt, "train": n_train}, seed,
                              unit="texts" if task.texts_b is None else "pairs")  # test first: kept most faithfully
    picked = {split: [rows[j] for j in idx] for split, idx in chosen.items()}

    def pick(split: str) -> tuple[list[str], list[int]]:
        return [task.texts[i] for i in picked[split]], [task.labels[i] for i in picked[split]]

    def per_split(values: list[Any] | None) -> dict[str, list[Any]] | None:
        return None if values is None else {s: [values[i] for i in picked[s]] for s in ("train", "adapt", "test")}

    return TaskSplit(train=pick("train"), adapt=pick("adapt"), test=pick("test"), texts_b=per_split(task.texts_b),
                     targets=per_split(task.targets))
