"""The suites' task pool: per task, its data splits and its scorer — apart from the model pool (pretrained encoder,
experts, heads), as FusionBench separates method, model pool and task pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from symerge.batching import Inputs
from symerge.errors import ValidationError
from symerge.evaluation.metrics import TaskScore, classification_score
from symerge.result import MergeResult


@dataclass
class TaskData:
    name: str
    class_names: list[str]
    adapt: Inputs
    test: Inputs
    test_labels: Tensor
    val: Inputs
    val_labels: Tensor
    sizes: dict[str, int] = field(default_factory=dict)
    scorer: Callable[[Tensor, Tensor], TaskScore] = classification_score  # (outputs, labels) -> TaskScore
    adapt_labels: Tensor | None = None  # true labels of `adapt`: never shown to methods, only to studies' upper bounds
    objective: str = "classification"  # what adaptive objectives treat the outputs as ("regression": L1)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


SCORED_SPLITS = {"test": "test", "val": "labeled validation"}  # the labeled splits a result is scored on (report name)


class TaskPool(Mapping[str, TaskData]):
    """Task name -> `TaskData`, in task order; scores any `MergeResult` with each task's own scorer."""

    def __init__(self, tasks: Mapping[str, TaskData]):
        self._tasks = dict(tasks)

    def __getitem__(self, task: str) -> TaskData:
        return self._tasks[task]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def adapt_inputs(self, protocol: str) -> dict[str, Inputs]:
        """Unlabeled adaptation inputs per task: the adaptation split ("held-out") or the test inputs
        ("transductive")."""
        return {t: (d.adapt if protocol == "held-out" else d.test) for t, d in self._tasks.items()}

    def adapt_targets(self, protocol: str) -> dict[str, Tensor]:
        """True labels of `adapt_inputs(protocol)` (studies' label-using references only; never given to methods)."""
        missing = [t for t, d in self._tasks.items() if protocol == "held-out" and d.adapt_labels is None]
        if missing:
            raise ValidationError(f"task '{missing[0]}' has no adaptation labels (TaskData.adapt_labels): this needs them")
        return {t: (d.adapt_labels if protocol == "held-out" else d.test_labels) for t, d in self._tasks.items()}

    def score(self, result: MergeResult, device: str, split: str = "test") -> dict[str, TaskScore]:
        """Each task's TaskScore (its data's scorer) on the test (or validation) split."""
        if split not in SCORED_SPLITS:
            raise ValidationError(f"cannot score split {split!r}: the labeled splits are "
                                  f"{', '.join(repr(name) for name in SCORED_SPLITS)}")
        scores = {}
        for task in result.tasks:
            data = self._tasks[task]
            inputs, labels = (data.test, data.test_labels) if split == "test" else (data.val, data.val_labels)
            scores[task] = data.scorer(result.predict(task, inputs, device=device), labels)
        return scores
