"""Request validation helpers: every RPC checks its input with these and names the field."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cuga.shared.errors import InvalidArgumentError

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
STEP_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
TRACE_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_PAGE_SIZE = 100
#: Longest ``ExecutionContext.user_id``, characters.
MAX_USER_ID_CHARS = 256
#: 9999-12-31T23:59:59Z, the last second a google.protobuf.Timestamp may hold.
MAX_TIMESTAMP_SECONDS = 253_402_300_799


def require(field: str, value: object, what: str = "is required") -> None:
    """Raise INVALID_ARGUMENT naming ``field`` when ``value`` is empty."""
    if not value:
        raise InvalidArgumentError(field, what)


def check_id(
    field: str, value: str, *, required: bool = True, pattern: re.Pattern[str] = ID_PATTERN
) -> None:
    """Check an identifier against ``pattern`` (empty allowed when not required)."""
    if not value:
        if required:
            raise InvalidArgumentError(field, "is required")
        return
    if not pattern.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidArgumentError(field, f"{shown!r} is not a valid id (want {pattern.pattern})")


def check_length(field: str, value: str, max_chars: int, *, required: bool = False) -> None:
    """Check a free-text field's length."""
    if required and not value.strip():
        raise InvalidArgumentError(field, "is required")
    if len(value) > max_chars:
        raise InvalidArgumentError(field, f"is {len(value)} characters, the limit is {max_chars}")


def check_size(field: str, message: Message, max_bytes: int) -> None:
    """Check a message's serialised size."""
    size = message.ByteSize()
    if size > max_bytes:
        raise InvalidArgumentError(field, f"is {size} bytes serialised, the limit is {max_bytes}")


def check_count(field: str, items: Iterable[object], max_items: int, *, minimum: int = 0) -> None:
    """Check how many items a repeated field holds."""
    n = sum(1 for _ in items)
    if n < minimum:
        raise InvalidArgumentError(field, f"needs at least {minimum} item(s), got {n}")
    if n > max_items:
        raise InvalidArgumentError(field, f"has {n} items, the limit is {max_items}")


def check_timestamp(field: str, ts: Timestamp) -> None:
    """Check a Timestamp is in the range the type defines (1970 is the floor we accept)."""
    if not 0 <= ts.seconds <= MAX_TIMESTAMP_SECONDS or not 0 <= ts.nanos <= 999_999_999:
        raise InvalidArgumentError(field, "is not a valid timestamp (1970 to 9999)")


def page_size(field: str, value: int, max_size: int) -> int:
    """The effective page size: 0 means the default; above ``max_size`` is refused."""
    if value == 0:
        return min(DEFAULT_PAGE_SIZE, max_size)
    if value > max_size:
        raise InvalidArgumentError(field, f"is {value}, the limit is {max_size}")
    return value


def encode_page_token(position: str) -> str:
    """An opaque page token for a position (a sort key)."""
    return base64.urlsafe_b64encode(position.encode()).decode().rstrip("=")


def decode_page_token(field: str, token: str) -> str:
    """The position a page token stands for; malformed tokens are INVALID_ARGUMENT."""
    if not token:
        return ""
    try:
        # validate=True: characters outside the alphabet are an error, not skipped.
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        position = raw.decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgumentError(field, "is not a token this service issued") from None
    if encode_page_token(position) != token:
        raise InvalidArgumentError(field, "is not a token this service issued")
    return position


__all__ = [
    "ID_PATTERN",
    "MAX_USER_ID_CHARS",
    "STEP_ID_PATTERN",
    "TOOL_NAME_PATTERN",
    "TRACE_ID_PATTERN",
    "check_count",
    "check_id",
    "check_length",
    "check_size",
    "check_timestamp",
    "decode_page_token",
    "encode_page_token",
    "page_size",
    "require",
]
