"""Request validation: every RPC checks its input with these and names the field.

The messages of ``cuga.common.v1`` that several services receive (``ExecutionContext``,
``PlanStep``, ``ToolBudget``, ``RetryPolicy``, ``PartialResult``) and every request's
``request_id`` are checked by one function each here, called at every server boundary
that receives them, so each limit written in the protos holds the same everywhere.
Service-specific rules (the coordinator assigns ``trace_id``; approval needs a
``run_id``) are checked by the service on top.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Iterable, Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cuga.common.v1 import common_pb2
from cuga.shared.config import Limits
from cuga.shared.errors import InvalidArgumentError

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
STEP_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
TRACE_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
#: Capability names: the tool SDK's token alphabet (colons allowed, ``payments:write``).
CAPABILITY_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
DEFAULT_PAGE_SIZE = 100
#: Longest ``ExecutionContext.user_id``, characters.
MAX_USER_ID_CHARS = 256
#: Longest ``ExecutionContext.delegate_id`` (an identity name), characters.
MAX_DELEGATE_ID_CHARS = 128
#: Most ``ExecutionContext.metadata`` entries, and their longest key and value.
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 1024
#: Longest ``PlanStep.reason``, characters.
MAX_STEP_REASON_CHARS = 1024
#: ``RetryPolicy.max_attempts`` range (0 means the configured default).
MAX_RETRY_ATTEMPTS = 20
#: The configured limits' defaults, for callers that have none of their own.
_DEFAULTS = Limits()
#: 9999-12-31T23:59:59Z, the last second a google.protobuf.Timestamp may hold.
MAX_TIMESTAMP_SECONDS = 253_402_300_799
#: The largest google.protobuf.Duration: 10,000 years.
MAX_DURATION_SECONDS = 315_576_000_000


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


def check_duration(field: str, value: Duration, max_seconds: float | None = None) -> float:
    """Check a non-negative Duration (within the type's range, and ``max_seconds`` when
    given); return it in seconds."""
    if (
        not 0 <= value.seconds <= MAX_DURATION_SECONDS
        or not 0 <= value.nanos <= 999_999_999
        or (value.seconds == MAX_DURATION_SECONDS and value.nanos)
    ):
        raise InvalidArgumentError(field, "must be a non-negative duration")
    total = value.seconds + value.nanos / 1e9
    if max_seconds is not None and total > max_seconds:
        raise InvalidArgumentError(field, f"is {total:.0f} s, the limit is {max_seconds:.0f} s")
    return total


def check_map(
    field: str,
    entries: Mapping[str, str],
    *,
    max_entries: int,
    max_key_chars: int,
    max_value_chars: int,
) -> None:
    """Check a ``map<string, string>``: entry count, non-empty keys, key and value lengths.

    A key's problem names the map (``context.metadata``), a value's names its entry
    (``context.metadata['env']``).
    """
    check_count(field, entries, max_entries)
    for key, value in entries.items():
        if not key:
            raise InvalidArgumentError(field, "keys must not be empty")
        if len(key) > max_key_chars:
            raise InvalidArgumentError(
                field, f"key {key[:40]!r}... is {len(key)} characters, the limit is {max_key_chars}"
            )
        check_length(f"{field}[{key!r}]", value, max_value_chars)


def check_request_id(value: str, field: str = "request_id") -> None:
    """An idempotency key: empty (no deduplication) or at most 128 characters of
    ``[A-Za-z0-9._:-]``."""
    check_id(field, value, required=False)


def derived_id(*parts: str, sep: str = ":", max_chars: int = 128) -> str:
    """An id a service builds from others (``<run_id>:plan``) that still fits the id limit.

    The parts joined by ``sep``; when that is longer than ``max_chars`` (a run id may
    itself take all 128), its first characters, a dot and its SHA-256 in hex, exactly
    ``max_chars`` long. The same parts always give the same id, so it stays an
    idempotency key.
    """
    key = sep.join(parts)
    if len(key) <= max_chars:
        return key
    return f"{key[: max_chars - 65]}.{hashlib.sha256(key.encode()).hexdigest()}"


def check_enum(field: str, value: int, enum_type: EnumTypeWrapper) -> None:
    """Check an enum field holds one of ``enum_type``'s values (UNSPECIFIED included)."""
    if value not in enum_type.values():
        raise InvalidArgumentError(field, f"{value} is not a valid {enum_type.DESCRIPTOR.name}")


def check_context(
    field: str, ctx: common_pb2.ExecutionContext, *, run_id_required: bool = False
) -> None:
    """Check an ``ExecutionContext`` against common.proto's limits.

    ``trace_id``: empty or 32 lowercase hex; ``run_id`` and ``profile``: at most 128 of
    ``[A-Za-z0-9._:-]`` (``run_id`` required when ``run_id_required``); ``user_id``: at most
    256 characters; ``delegate_id``: at most 128; ``metadata``: at most 64 entries, keys 1 to
    128 and values at most 1024 characters; ``deadline``: a valid timestamp when set.
    """
    if _context_ok(ctx, run_id_required):
        return
    # Something is wrong: the checks one by one, in order, name the first problem.
    check_id(f"{field}.trace_id", ctx.trace_id, required=False, pattern=TRACE_ID_PATTERN)
    check_id(f"{field}.run_id", ctx.run_id, required=run_id_required)
    check_id(f"{field}.profile", ctx.profile, required=False)
    check_length(f"{field}.user_id", ctx.user_id, MAX_USER_ID_CHARS)
    check_map(
        f"{field}.metadata",
        ctx.metadata,
        max_entries=MAX_METADATA_ENTRIES,
        max_key_chars=MAX_METADATA_KEY_CHARS,
        max_value_chars=MAX_METADATA_VALUE_CHARS,
    )
    if ctx.HasField("deadline"):
        check_timestamp(f"{field}.deadline", ctx.deadline)
    check_length(f"{field}.delegate_id", ctx.delegate_id, MAX_DELEGATE_ID_CHARS)


def check_plan_step(
    field: str,
    step: common_pb2.PlanStep,
    *,
    max_input_bytes: int = _DEFAULTS.max_input_bytes,
    max_depends_on: int = _DEFAULTS.max_steps,
) -> None:
    """Check one ``PlanStep`` on its own (that ``depends_on`` names steps of the plan, and
    that ids are unique, is the plan's check, planning's).

    ``step_id``: 1 to 64 of ``[A-Za-z0-9_.-]``; ``tool``: 1 to 128 of ``[A-Za-z0-9_.-]``;
    ``input``: at most ``max_input_bytes`` serialised; ``depends_on``: at most
    ``max_depends_on`` step ids; ``capability``: empty or 1 to 128 of ``[A-Za-z0-9_.:-]``;
    ``estimated_cost``: a finite number >= 0; ``reason``: at most 1024 characters.
    """
    if _plan_step_ok(step, max_input_bytes, max_depends_on):
        return
    # Something is wrong: the checks one by one, in order, name the first problem.
    check_id(f"{field}.step_id", step.step_id, pattern=STEP_ID_PATTERN)
    check_id(f"{field}.tool", step.tool, pattern=TOOL_NAME_PATTERN)
    check_size(f"{field}.input", step.input, max_input_bytes)
    check_count(f"{field}.depends_on", step.depends_on, max_depends_on)
    for i, dep in enumerate(step.depends_on):
        check_id(f"{field}.depends_on[{i}]", dep, pattern=STEP_ID_PATTERN)
    check_id(f"{field}.capability", step.capability, required=False, pattern=CAPABILITY_PATTERN)
    if not math.isfinite(step.estimated_cost) or step.estimated_cost < 0:
        raise InvalidArgumentError(
            f"{field}.estimated_cost", f"must be a finite number >= 0, got {step.estimated_cost}"
        )
    check_length(f"{field}.reason", step.reason, MAX_STEP_REASON_CHARS)


# Fast paths. A step and its context are checked on every hop of every step (the
# coordinator, routing, approval and the worker each check them) and nearly always pass:
# these say "passes" with the same tests and no field names built; anything they do not
# pass goes through the checks one by one, which name the first problem. They must only
# ever pass what those checks pass (tests/unit/test_validation_fast_path.py).


def _context_ok(ctx: common_pb2.ExecutionContext, run_id_required: bool) -> bool:
    trace_id, run_id, profile = ctx.trace_id, ctx.run_id, ctx.profile
    if trace_id and not TRACE_ID_PATTERN.fullmatch(trace_id):
        return False
    if run_id:
        if not ID_PATTERN.fullmatch(run_id):
            return False
    elif run_id_required:
        return False
    if profile and not ID_PATTERN.fullmatch(profile):
        return False
    if len(ctx.user_id) > MAX_USER_ID_CHARS or len(ctx.delegate_id) > MAX_DELEGATE_ID_CHARS:
        return False
    metadata = ctx.metadata
    if metadata:
        if len(metadata) > MAX_METADATA_ENTRIES:
            return False
        for key in metadata:  # keys then lookups: the map's items() view is slow
            if (
                not key
                or len(key) > MAX_METADATA_KEY_CHARS
                or len(metadata[key]) > MAX_METADATA_VALUE_CHARS
            ):
                return False
    if ctx.HasField("deadline"):
        deadline = ctx.deadline
        if (
            not 0 <= deadline.seconds <= MAX_TIMESTAMP_SECONDS
            or not 0 <= deadline.nanos <= 999_999_999
        ):
            return False
    return True


def _plan_step_ok(step: common_pb2.PlanStep, max_input_bytes: int, max_depends_on: int) -> bool:
    if not STEP_ID_PATTERN.fullmatch(step.step_id) or not TOOL_NAME_PATTERN.fullmatch(step.tool):
        return False
    if step.input.ByteSize() > max_input_bytes:
        return False
    depends_on = step.depends_on
    if len(depends_on) > max_depends_on:
        return False
    for dep in depends_on:
        if not STEP_ID_PATTERN.fullmatch(dep):
            return False
    capability = step.capability
    if capability and not CAPABILITY_PATTERN.fullmatch(capability):
        return False
    cost = step.estimated_cost
    if not math.isfinite(cost) or cost < 0:
        return False
    return len(step.reason) <= MAX_STEP_REASON_CHARS


def check_budget(field: str, budget: common_pb2.ToolBudget) -> None:
    """Check a ``ToolBudget``: ``ceiling`` finite and >= 0, ``policy`` a BudgetPolicy,
    ``warn_fraction`` 0 (the default) or in (0, 1]. ``spent`` is output only, not read."""
    if not math.isfinite(budget.ceiling) or budget.ceiling < 0:
        raise InvalidArgumentError(
            f"{field}.ceiling",
            f"must be a finite number >= 0 (0 = unlimited), got {budget.ceiling}",
        )
    check_enum(f"{field}.policy", budget.policy, common_pb2.BudgetPolicy)
    if budget.warn_fraction != 0 and not 0 < budget.warn_fraction <= 1:
        raise InvalidArgumentError(
            f"{field}.warn_fraction",
            f"must be in (0, 1] (0 = default), got {budget.warn_fraction}",
        )


def check_retry_policy(field: str, policy: common_pb2.RetryPolicy) -> None:
    """Check a ``RetryPolicy``: delays are valid durations (``base_delay`` > 0 and
    ``max_delay`` >= ``base_delay`` when set), ``multiplier`` 0 (the default) or a finite
    number >= 1, ``max_attempts`` 0 (the default) to 20."""
    base = max_delay = None
    if policy.HasField("base_delay"):
        base = check_duration(f"{field}.base_delay", policy.base_delay)
        if base <= 0:
            raise InvalidArgumentError(f"{field}.base_delay", "must be > 0 when set")
    if policy.HasField("max_delay"):
        max_delay = check_duration(f"{field}.max_delay", policy.max_delay)
        if base is not None and max_delay < base:
            raise InvalidArgumentError(f"{field}.max_delay", "must be >= base_delay")
    multiplier = policy.multiplier
    if multiplier != 0 and not (math.isfinite(multiplier) and multiplier >= 1):
        raise InvalidArgumentError(
            f"{field}.multiplier", f"must be 0 (default) or a finite number >= 1, got {multiplier}"
        )
    if policy.max_attempts > MAX_RETRY_ATTEMPTS:
        raise InvalidArgumentError(
            f"{field}.max_attempts",
            f"is {policy.max_attempts}, the limit is {MAX_RETRY_ATTEMPTS} (0 = default)",
        )


def check_partial_result(
    field: str,
    partial: common_pb2.PartialResult,
    *,
    max_steps: int = _DEFAULTS.max_steps,
    max_input_bytes: int = _DEFAULTS.max_input_bytes,
    max_output_bytes: int = _DEFAULTS.max_output_bytes,
    max_goal_chars: int = _DEFAULTS.max_goal_chars,
) -> None:
    """Check a ``PartialResult`` sent back to resume a run: its ids, its steps (each as
    :func:`check_plan_step`), outputs, context and budget, as the coordinator wrote them."""
    check_id(f"{field}.run_id", partial.run_id)
    check_count(f"{field}.completed_steps", partial.completed_steps, max_steps)
    for i, done in enumerate(partial.completed_steps):
        check_id(f"{field}.completed_steps[{i}].step_id", done.step_id, pattern=STEP_ID_PATTERN)
        check_size(f"{field}.completed_steps[{i}].output", done.output, max_output_bytes)
    check_id(f"{field}.failed_step", partial.failed_step, required=False, pattern=STEP_ID_PATTERN)
    check_enum(f"{field}.failure_mode", partial.failure_mode, common_pb2.FailureMode)
    check_count(f"{field}.recovery_plan", partial.recovery_plan, max_steps)
    for i, step in enumerate(partial.recovery_plan):
        check_plan_step(
            f"{field}.recovery_plan[{i}]",
            step,
            max_input_bytes=max_input_bytes,
            max_depends_on=max_steps,
        )
    check_length(f"{field}.goal", partial.goal, max_goal_chars)
    check_context(f"{field}.context", partial.context)
    check_id(f"{field}.plan_id", partial.plan_id, required=False)
    check_budget(f"{field}.budget", partial.budget)


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
    "CAPABILITY_PATTERN",
    "ID_PATTERN",
    "MAX_DELEGATE_ID_CHARS",
    "MAX_DURATION_SECONDS",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_CHARS",
    "MAX_METADATA_VALUE_CHARS",
    "MAX_RETRY_ATTEMPTS",
    "MAX_STEP_REASON_CHARS",
    "MAX_TIMESTAMP_SECONDS",
    "MAX_USER_ID_CHARS",
    "STEP_ID_PATTERN",
    "TOOL_NAME_PATTERN",
    "TRACE_ID_PATTERN",
    "check_budget",
    "check_context",
    "check_count",
    "check_duration",
    "check_enum",
    "check_id",
    "check_length",
    "check_map",
    "check_partial_result",
    "check_plan_step",
    "check_request_id",
    "check_retry_policy",
    "check_size",
    "check_timestamp",
    "decode_page_token",
    "derived_id",
    "encode_page_token",
    "page_size",
    "require",
]
