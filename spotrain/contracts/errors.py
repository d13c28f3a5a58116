"""One line for a pydantic validation error: where, which key, what is wrong."""

from __future__ import annotations

from pydantic import ValidationError


def validation_error_line(source: object, error: ValidationError) -> str:
    """`source: key.path: message` for the first error (a spec or user-data file names its own problem)."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        message = f"{message} (got {first['input']!r})"
    return f"{source}: {key}: {message}" if key else f"{source}: {message}"
