"""Input validation against a tool's JSON schema (Draft 2020-12)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from cuga.shared.errors import InvalidArgumentError


def json_path(prefix: str, parts: Iterable[str | int]) -> str:
    """``prefix`` followed by a dotted/indexed path: ``step.input.items[2].name``."""
    path = prefix
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def validate_input(
    parameters: Mapping[str, Any], inputs: Any, *, field: str = "step.input"
) -> None:
    """Check ``inputs`` against the schema ``parameters``.

    Raises:
        InvalidArgumentError: naming the JSON path of the most relevant violation, e.g.
            ``step.input.amount: -5 is less than the minimum of 0``.
    """
    check_input(jsonschema.Draft202012Validator(dict(parameters)), inputs, field=field)


def check_input(validator: Any, inputs: Any, *, field: str = "step.input") -> None:
    """:func:`validate_input` with a validator made once (``ToolSpec.validator``).

    Raises:
        InvalidArgumentError: as :func:`validate_input`.
    """
    error = best_match(validator.iter_errors(inputs))
    if error is None:
        return
    message = error.message
    if len(message) > 300:  # schema messages quote the offending value; keep them readable
        message = message[:300] + "..."
    raise InvalidArgumentError(
        json_path(field, error.absolute_path), message, metadata={"schema_rule": error.validator}
    )
