"""The one stratified splitter of the suites' task data (text and image tasks alike).

`stratified_split(name, labels, sizes, seed)` draws seeded, stratified, disjoint index sets, one per split, in the
order `sizes` gives them (put the evaluation split first: its size is kept most faithfully). Sizes are scaled down
proportionally when the task is too small.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence


def proportional(sizes: Mapping[int, int], k: int) -> dict[int, int]:
    """Split ``k`` over classes proportionally to ``sizes`` (largest remainder), within sizes."""
    total = sum(sizes.values())
    exact = {c: k * s / total for c, s in sizes.items()} if total else {c: 0.0 for c in sizes}
    counts = {c: int(v) for c, v in exact.items()}
    order = sorted(sizes, key=lambda c: (-(exact[c] - counts[c]), c))
    for c in order[: k - sum(counts.values())]:
        counts[c] += 1
    return counts


def capped_sizes(task_name: str, n: int, requested: Mapping[str, int], unit: str = "samples") -> dict[str, int]:
    """Scale requested split sizes down proportionally when the task is too small."""
    for split, size in requested.items():
        if size < 1:
            raise ValueError(
                f"task {task_name!r}: split {split!r} would be empty (requested {size})"
            )
    total = sum(requested.values())
    sizes = dict(requested) if total <= n else {s: v * n // total for s, v in requested.items()}
    empty = [s for s, v in sizes.items() if v < 1]
    if empty:
        raise ValueError(
            f"task {task_name!r} has only {n} {unit}: split(s) {empty} would be empty "
            f"for requested sizes {dict(requested)}"
        )
    return sizes


def stratified_split(task_name: str, labels: Sequence[int], sizes: Mapping[str, int], seed: int,
                     unit: str = "samples") -> dict[str, list[int]]:
    """Split name -> indices into `labels`: seeded, stratified by label, disjoint, drawn in the order of `sizes`."""
    capped = capped_sizes(task_name, len(labels), sizes, unit)
    rng = random.Random(seed)
    pools: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        pools[int(label)].append(i)
    for label in sorted(pools):
        rng.shuffle(pools[label])
    chosen: dict[str, list[int]] = {}
    for split in sizes:
        quotas = proportional({c: len(p) for c, p in pools.items()}, capped[split])
        idx = [i for c in sorted(pools) for i in pools[c][: quotas[c]]]
        pools = {c: p[quotas[c]:] for c, p in pools.items()}
        rng.shuffle(idx)
        chosen[split] = idx
    return chosen
