"""symerge: multi-task model merging with SyMerge, AdaMerging, Representation Surgery and static baselines."""

from symerge.errors import SymergeError, ValidationError
from symerge.pool import ModelPool
from symerge.taskvectors import TaskVectors

__all__ = ["ModelPool", "TaskVectors", "SymergeError", "ValidationError", "__version__"]
__version__ = "0.1.0"
