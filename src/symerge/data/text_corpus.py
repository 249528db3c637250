"""What a text task is and how one is built from parsed rows: `TextTask` (single sentences or sentence pairs,
classification or regression), `TaskSplit`, cleaning, deduplication and the seeded, capped subsample.

Each task is deduplicated (first label wins, so one text never carries two labels and can never land in two
splits) and capped at ``MAX_TEXTS`` with a seeded subsample (class-balanced for classification). The sources that
feed these builders are in ``symerge.data.text_sources``; the registry, cache and splits in
``symerge.data.text_tasks``.
"""

from __future__ import annotations

import math
import random
import unicodedata
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


MAX_TEXTS = 4000
"""Upper bound on texts per task: keeps loading and tokenisation fast."""
CAP_SEED = 0
"""Seed of the capping subsample; fixed so a task's content never depends on the run."""
CACHE_VERSION = 1
"""Bump when parsing changes, so stale JSON caches are rebuilt."""

REGRESSION_BINS = 5
"""Quantile bins of a regression task's targets: its ``labels``, used only to stratify splits."""

Pairs = list[tuple[str, str]]
"""(label name, text) pairs, the common output of the parsers."""
PairRows = list[tuple[str, str, str]]
"""(label name, first text, second text) rows of sentence-pair tasks."""
ScoredTexts = list[tuple[float, str]]
"""(target, text) rows of regression tasks."""


@dataclass(frozen=True)
class TextTask:
    """A deduplicated text task: single sentences, or sentence pairs when ``texts_b`` is set.

    Classification: ``labels`` index ``class_names``. Regression (``targets`` set): the targets
    are the truth, ``labels`` are their quantile bins (only to stratify the splits) and
    ``class_names`` is ``["score"]`` (one output).
    """

    name: str
    texts: list[str]
    labels: list[int]
    class_names: list[str]
    source: str
    texts_b: list[str] | None = None
    targets: list[float] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        for field_name in ("labels", "texts_b", "targets"):
            values = getattr(self, field_name)
            if values is not None and len(values) != n:
                raise ValueError(f"text task {self.name!r}: {len(values)} {field_name} for {n} texts")

    @property
    def kind(self) -> str:
        """``classification`` or ``regression``: the one place a task's kind is decided."""
        return "regression" if self.targets is not None else "classification"

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (the model reads ``texts[i]`` with ``texts_b[i]``)."""
        return self.texts_b is not None

    @property
    def class_counts(self) -> dict[str, int]:
        """Texts per class name (for reports); a regression task's one 'class' holds every text."""
        if self.kind == "regression":
            return {self.class_names[0]: len(self.texts)}
        counts = Counter(self.labels)
        return {c: counts.get(i, 0) for i, c in enumerate(self.class_names)}


@dataclass(frozen=True)
class TaskSplit:
    """Disjoint train / adapt (unlabelled test-time data) / test splits of one task.

    Each split is ``(texts, labels)``; pair tasks add the second texts and regression tasks the
    targets, per split name, in the same order.
    """

    train: tuple[list[str], list[int]]
    adapt: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    texts_b: dict[str, list[str]] | None = None
    targets: dict[str, list[float]] | None = None


# --------------------------------------------------------------------------- cleaning


_CONTROL_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def clean_text(text: str) -> str:
    """Drop control/format characters and collapse whitespace (dedup keys depend on it)."""
    joined = " ".join(text.split())
    if joined.isprintable():  # fast path: nothing left to drop
        return joined
    chars = (" " if ch.isspace() else ch for ch in text)
    kept = "".join(ch for ch in chars if unicodedata.category(ch) not in _CONTROL_CATEGORIES)
    return " ".join(kept.split())


def dedup_first(pairs: Iterable[tuple[str, str]]) -> Pairs:
    """Clean texts, drop empty ones and keep only the first label of each distinct text."""
    seen: set[str] = set()
    out: Pairs = []
    for label, text in pairs:
        t = clean_text(text)
        if t and t not in seen:
            seen.add(t)
            out.append((label, t))
    return out


def balanced_quotas(sizes: dict[str, int], max_total: int) -> dict[str, int]:
    """Water-filling: equal share per class, a small class's unused share goes to the others."""
    quotas: dict[str, int] = {}
    remaining, left = max_total, len(sizes)
    for label, size in sorted(sizes.items(), key=lambda kv: (kv[1], kv[0])):
        quotas[label] = min(size, remaining // left)
        remaining -= quotas[label]
        left -= 1
    return quotas


def capped_indices(
    labels: Sequence[str], max_total: int, seed: int = CAP_SEED, max_per_class: int | None = None
) -> list[int]:
    """Sorted indices of a seeded class-balanced subsample of at most ``max_total`` rows."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    limit = max_per_class if max_per_class is not None else len(labels)
    sizes = {k: min(len(v), limit) for k, v in by_class.items()}
    quotas = balanced_quotas(sizes, max_total)
    rng = random.Random(seed)
    keep: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        keep.extend(idx if quotas[label] >= len(idx) else rng.sample(idx, quotas[label]))
    return sorted(keep)


def cap_pairs(
    pairs: Pairs, max_total: int, seed: int = CAP_SEED, max_per_class: int | None = None
) -> Pairs:
    """Seeded class-balanced subsample of at most ``max_total`` pairs, in original order."""
    keep = capped_indices([label for label, _ in pairs], max_total, seed, max_per_class)
    return [pairs[i] for i in keep]


def top_labels(pairs: Iterable[tuple[str, str]], k: int) -> list[str]:
    """The ``k`` labels with the most distinct texts (ties by name), sorted by name."""
    counts = Counter(lab for lab, _ in dedup_first(pairs))
    return sorted(lab for lab, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k])


def build_task(
    name: str,
    pairs: Iterable[tuple[str, str]],
    source: str,
    class_order: Sequence[str] | None = None,
    max_total: int = MAX_TEXTS,
    max_per_class: int | None = None,
) -> TextTask:
    """Dedup, cap and integer-encode ``(label, text)`` pairs into a ``TextTask``."""
    unique = dedup_first(pairs)
    if class_order is not None:
        wanted = set(class_order)
        unique = [(lab, t) for lab, t in unique if lab in wanted]
    capped = cap_pairs(unique, max_total, max_per_class=max_per_class)
    classes = list(class_order) if class_order is not None else sorted({lab for lab, _ in capped})
    index = {c: i for i, c in enumerate(classes)}
    return TextTask(
        name=name,
        texts=[t for _, t in capped],
        labels=[index[lab] for lab, _ in capped],
        class_names=classes,
        source=source,
    )


def build_pair_task(
    name: str,
    rows: Iterable[tuple[str, str, str]],
    source: str,
    class_order: Sequence[str],
    max_total: int = MAX_TEXTS,
) -> TextTask:
    """Clean, dedup, cap and encode ``(label, text_a, text_b)`` rows into a pair ``TextTask``.

    Dedup is on the FIRST text (first row wins): each sentence then appears in one pair only, so
    the model never sees its true partner in training and a foil in the test split.
    """
    seen: set[str] = set()
    unique: PairRows = []
    for label, a, b in rows:
        ca, cb = clean_text(a), clean_text(b)
        if ca and cb and ca not in seen:
            seen.add(ca)
            if label in class_order:
                unique.append((label, ca, cb))
    keep = capped_indices([lab for lab, _, _ in unique], max_total)
    index = {c: i for i, c in enumerate(class_order)}
    return TextTask(
        name=name,
        texts=[unique[i][1] for i in keep],
        labels=[index[unique[i][0]] for i in keep],
        class_names=list(class_order),
        source=source,
        texts_b=[unique[i][2] for i in keep],
    )


def quantile_bins(values: Sequence[float], n_bins: int = REGRESSION_BINS) -> list[int]:
    """Bin index (0..n_bins-1) of each value by the values' own quantiles (equal values share a bin)."""
    ordered = sorted(values)
    n = len(ordered)
    upper_edges = sorted({ordered[max(0, (k * n) // n_bins - 1)] for k in range(1, n_bins)}) if n else []
    return [bisect_left(upper_edges, v) for v in values]


def build_regression_task(
    name: str,
    rows: Iterable[tuple[float, str]],
    source: str,
    max_total: int = MAX_TEXTS,
    seed: int = CAP_SEED,
) -> TextTask:
    """Clean, dedup (first target wins), seeded-cap ``(target, text)`` rows into a regression task."""
    seen: set[str] = set()
    unique: ScoredTexts = []
    for target, text in rows:
        t = clean_text(text)
        if t and t not in seen and math.isfinite(target):
            seen.add(t)
            unique.append((float(target), t))
    if len(unique) > max_total:
        unique = [unique[i] for i in sorted(random.Random(seed).sample(range(len(unique)), max_total))]
    targets = [y for y, _ in unique]
    return TextTask(
        name=name,
        texts=[t for _, t in unique],
        labels=quantile_bins(targets),
        class_names=["score"],
        source=source,
        targets=targets,
    )


def read_text_lenient(path: Path) -> str:
    """UTF-8, falling back to latin-1 (a few corpus files are not valid UTF-8)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


