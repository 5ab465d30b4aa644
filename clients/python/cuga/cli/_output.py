"""What every ``cuga`` command shares: exit codes, errors, ``--json`` lines, consoles.

The conventions live here and in :mod:`cuga.cli.main` so each command module inherits them:

* exit codes (:class:`ExitCode`, documented in the README): a command returns one or
  raises, and :func:`cuga.cli.main.invoke` turns exceptions into the matching code and
  one line on stderr (a JSON object with ``--json``);
* ``--json``: one compact object per line on stdout (:func:`json_line`);
* output never wraps when stdout is not a terminal (:func:`out`, and ``COLUMNS`` set by
  ``main`` for consoles made elsewhere), so ids and trace ids can be copied and parsed.
"""

from __future__ import annotations

import enum
import json
import math
import sys
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console

#: The width consoles use when their stream is not a terminal: no line is ever folded.
UNWRAPPED_WIDTH = 100_000


class ExitCode(enum.IntEnum):
    """The ``cuga`` exit codes: distinct, the same for every command (README)."""

    OK = 0
    """Done; for ``run``/``watch``/``resume``: the run is COMPLETE."""
    FAILED = 1
    """What the command checked or ran failed: a run FAILED, ``audit verify`` found a
    broken chain, a service of ``cuga up`` exited."""
    USAGE = 2
    """Bad command line: unknown command or option, a missing or malformed argument."""
    CANCELLED = 3
    """The run was CANCELLED."""
    CALL_ERROR = 4
    """A call failed: a service unreachable, the call refused (UNAUTHENTICATED,
    PERMISSION_DENIED) or answered with an error (NOT_FOUND, INVALID_ARGUMENT, ...)."""
    CONFIG = 5
    """Configuration or environment: a bad configuration file or key, an unreadable file,
    a port already in use, a tool refused at start."""
    INTERNAL = 6
    """A bug in ``cuga``: one line; ``--debug`` prints the traceback."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT)."""
    PIPE_CLOSED = 141
    """stdout was closed by its reader (``| head``), as 128 + SIGPIPE; nothing is printed."""


class CommandError(Exception):
    """A failure a command reports as one line and an exit code (never a traceback).

    Args:
        message: what went wrong, for a person.
        code: the exit code.
        hint: what to do about it (printed on a second line).
    """

    def __init__(self, message: str, code: ExitCode, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


class UsageError(CommandError):
    """An argument's value is wrong in a way argparse cannot see (exit code 2)."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, ExitCode.USAGE, hint=hint)


class ConfigProblem(CommandError):
    """A file, setting or local resource stops the command (exit code 5)."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message, ExitCode.CONFIG, hint=hint)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def out() -> Console:
    """A console on stdout that folds no line when stdout is not a terminal."""
    terminal = _is_terminal(sys.stdout)
    return Console(soft_wrap=not terminal, width=None if terminal else UNWRAPPED_WIDTH)


def err() -> Console:
    """A console on stderr that folds no line when stderr is not a terminal."""
    terminal = _is_terminal(sys.stderr)
    return Console(stderr=True, soft_wrap=not terminal, width=None if terminal else UNWRAPPED_WIDTH)


def plain(value: Any) -> Any:
    """A JSON value with integral floats as ints: a ``google.protobuf.Struct`` holds only
    doubles, so a tool's ``42`` comes back as ``42.0``; people and scripts expect ``42``."""
    if isinstance(value, float) and value.is_integer() and math.fabs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def as_dict(item: Message | dict[str, Any]) -> dict[str, Any]:
    """A message with its .proto field names (or a dict) as a plain JSON object."""
    data = (
        json_format.MessageToDict(item, preserving_proto_field_name=True)
        if isinstance(item, Message)
        else item
    )
    result: dict[str, Any] = plain(data)
    return result


def json_line(item: Message | dict[str, Any]) -> None:
    """Write one JSON object (a message with its .proto field names, or a dict) and a newline."""
    sys.stdout.write(json.dumps(as_dict(item), sort_keys=True) + "\n")
    sys.stdout.flush()


__all__ = [
    "UNWRAPPED_WIDTH",
    "CommandError",
    "ConfigProblem",
    "ExitCode",
    "UsageError",
    "as_dict",
    "err",
    "json_line",
    "out",
    "plain",
]
