"""Exception types: every error names the task and the tensor (or file / field) at fault."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class SymergeError(Exception):
    """Base class for errors raised by symerge."""


class ValidationError(SymergeError, ValueError):
    """Inputs (weights, configs, data) are inconsistent; raised before any work is done.

    `about` / `task`, when set, say which input the error is about — "pretrained", "expert" (its weights or head)
    or "class_names" — and of which task, so a caller can name its own field for it (the merge config names
    `model.experts.<task>`) without reading the message."""

    about: str | None = None
    task: str | None = None


class FieldError(SymergeError):
    """An input problem raised with the config field it is about (`field`: dotted path, `why`: the reason).

    Not a `ValueError` on purpose: raised inside a pydantic validator it passes through pydantic unchanged, and
    the config loader reports it as `invalid config <file>: <field>: <why>`."""

    def __init__(self, field: str, why: object):
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = str(why)


@contextlib.contextmanager
def subject(about: str, task: str | None = None) -> Iterator[None]:
    """`ValidationError`s raised inside are about `about` (and `task`), unless an inner block said so already."""
    try:
        yield
    except ValidationError as err:
        if err.about is None:
            err.about, err.task = about, task
        raise
