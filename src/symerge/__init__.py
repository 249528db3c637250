"""symerge: multi-task model merging with SyMerge, AdaMerging, Representation Surgery and static baselines."""

from os import PathLike
from typing import TYPE_CHECKING

from symerge.errors import SymergeError, ValidationError
from symerge.pool import ModelPool
from symerge.taskvectors import TaskVectors

if TYPE_CHECKING:
    from symerge.result import MergeResult

__all__ = ["ModelPool", "TaskVectors", "SymergeError", "ValidationError", "load", "__version__"]
__version__ = "0.1.0"


def load(directory: "str | PathLike[str]", verify: bool = True) -> "MergeResult":
    """Load a `symerge merge` output directory as a `MergeResult` (see `symerge.export.load`; imported lazily).
    `verify=False` skips checking the files against the sha256 recorded in symerge.json."""
    from symerge.export import load as _load

    return _load(directory, verify=verify)
