"""Exception types: every error names the task and the tensor (or file / field) at fault."""


class SymergeError(Exception):
    """Base class for errors raised by symerge."""


class ValidationError(SymergeError, ValueError):
    """Inputs (weights, configs, data) are inconsistent; raised before any work is done."""
