"""Options checked against their declared types (a low module: the static-method registry and `method_options`
both use it, so the registry needs nothing above `merging`)."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Mapping
from typing import Any

import pydantic

from symerge.errors import ValidationError


class OptionError(ValidationError):
    """A bad option; `option` names it (None: the options as a whole)."""

    def __init__(self, option: str | None, why: str):
        super().__init__(why)
        self.option = option


def declared_types(fn: Callable[..., Any], names: list[str]) -> dict[str, Any]:
    """Resolved annotations of `fn`'s parameters `names` (Any where a parameter has none)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is simply not type-checked
        hints = {}
    return {n: hints.get(n, Any) for n in names}


def check_types(method: str, options: Mapping[str, Any], types: Mapping[str, Any]) -> dict[str, Any]:
    """Each option validated (and coerced, e.g. a YAML list to a tuple) against its declared type."""
    out = {}
    for name, value in options.items():
        adapter = pydantic.TypeAdapter(types.get(name, Any), config=pydantic.ConfigDict(arbitrary_types_allowed=True))
        try:
            out[name] = adapter.validate_python(value)
        except pydantic.ValidationError as err:
            expected = getattr(types.get(name), "__name__", None) or str(types.get(name)).replace("typing.", "")
            raise OptionError(name, f"method '{method}': option '{name}': {value!r} is not a valid {expected} "
                                    f"({err.errors()[0]['msg']})") from None
    return out


def blamed_option(message: str, options: Mapping[str, Any]) -> str | None:
    """The option a method's error message is about (its name appears in the message), if any."""
    for name in options:
        if re.search(rf"\b{re.escape(name)}\b", message):
            return name
    return None
