"""Failure classification: the one table that maps gRPC status codes to FailureModes.

Domain code raises a :class:`CugaError` subclass; the server's error interceptor turns it
into a status with a ``google.rpc.ErrorInfo`` detail (``reason`` = the failure mode name or
an UPPER_SNAKE reason, ``domain`` = ``cuga.<service>``); typed clients turn the status back
into the same exception class. So an error means the same thing on both sides of the wire
and the engine classifies local and remote failures with one function.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from typing import ClassVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

GRPC_DETAILS_METADATA_KEY = "grpc-status-details-bin"
#: ErrorInfo metadata key carrying a failure mode that differs from the status's default.
FAILURE_MODE_KEY = "failure_mode"


class FailureMode(enum.IntEnum):
    """Why a step failed; decides whether it is retried (values match ``cuga.common.v1``)."""

    UNSPECIFIED = 0
    """No failure, or not classified."""
    AGENT = 1
    """The tool or agent misbehaved (INTERNAL, UNKNOWN; any other exception in a tool).
    Retried."""
    SYSTEM = 2
    """Infrastructure was unavailable (UNAVAILABLE, ABORTED; ``ConnectionError``). Retried."""
    RESOURCE = 3
    """A deadline or quota was hit (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; ``TimeoutError``).
    Retried with backoff."""
    POLICY = 4
    """A rule refused the action (PERMISSION_DENIED, UNAUTHENTICATED, a denied approval;
    ``PermissionError``). Never retried."""
    USER = 5
    """The request itself was wrong (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE,
    FAILED_PRECONDITION; ``ValueError``). Never retried."""

    @property
    def retryable(self) -> bool:
        """AGENT, SYSTEM and RESOURCE are retried; POLICY and USER never."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({FailureMode.AGENT, FailureMode.SYSTEM, FailureMode.RESOURCE})

#: DESIGN.md's table. CANCELLED maps to no mode and is never retried.
STATUS_FAILURE_MODES: Mapping[grpc.StatusCode, FailureMode] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: FailureMode.RESOURCE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: FailureMode.RESOURCE,
    grpc.StatusCode.UNAVAILABLE: FailureMode.SYSTEM,
    grpc.StatusCode.ABORTED: FailureMode.SYSTEM,
    grpc.StatusCode.INTERNAL: FailureMode.AGENT,
    grpc.StatusCode.UNKNOWN: FailureMode.AGENT,
    grpc.StatusCode.INVALID_ARGUMENT: FailureMode.USER,
    grpc.StatusCode.NOT_FOUND: FailureMode.USER,
    grpc.StatusCode.OUT_OF_RANGE: FailureMode.USER,
    grpc.StatusCode.FAILED_PRECONDITION: FailureMode.USER,
    grpc.StatusCode.ALREADY_EXISTS: FailureMode.USER,
    grpc.StatusCode.PERMISSION_DENIED: FailureMode.POLICY,
    grpc.StatusCode.UNAUTHENTICATED: FailureMode.POLICY,
}

#: The status a failure mode crosses the wire as, when a tool raised it.
FAILURE_MODE_STATUS: Mapping[FailureMode, grpc.StatusCode] = {
    FailureMode.AGENT: grpc.StatusCode.INTERNAL,
    FailureMode.SYSTEM: grpc.StatusCode.UNAVAILABLE,
    FailureMode.RESOURCE: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailureMode.POLICY: grpc.StatusCode.PERMISSION_DENIED,
    FailureMode.USER: grpc.StatusCode.INVALID_ARGUMENT,
}

#: Status codes (by name) after which a batch of writes is worth sending again unchanged:
#: the callee may not have seen it, or could not take it yet (the audit forwarder and the
#: client's buffered audit trail resend on these; any other answer is final).
RESEND_STATUS_NAMES: frozenset[str] = frozenset(
    {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "INTERNAL",
        "UNKNOWN",
        "CANCELLED",
    }
)

_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The status code of a number (google.rpc.Code); UNKNOWN for one gRPC lacks."""
    return _CODES_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def failure_mode_for_status(code: grpc.StatusCode) -> FailureMode:
    """The failure mode of a status code (UNSPECIFIED for OK and CANCELLED)."""
    return STATUS_FAILURE_MODES.get(code, FailureMode.UNSPECIFIED)


class CugaError(Exception):
    """Root of every error the orchestrator raises or receives over the wire.

    Attributes:
        message: what went wrong, for a person (also ``str(error)``).
        code: the gRPC status code the error crosses the wire as.
        reason: UPPER_SNAKE machine-readable reason (the failure mode name by default).
        failure_mode: classification deciding retry.
        domain: ``cuga.<service>`` that raised it.
        metadata: extra string facts (e.g. ``field``).
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        failure_mode: FailureMode | None = None,
        domain: str = "cuga",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.failure_mode = (
            failure_mode if failure_mode is not None else failure_mode_for_status(self.code)
        )
        self.reason = reason or (self.failure_mode.name if self.failure_mode else self.code.name)
        self.domain = domain
        self.metadata = dict(metadata or {})

    @property
    def retryable(self) -> bool:
        """Whether the coordinator may retry the failed step."""
        return self.failure_mode.retryable and self.code is not grpc.StatusCode.CANCELLED


class InvalidArgumentError(CugaError):
    """A request field is missing or malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, **kwargs: object) -> None:
        meta = dict(kwargs.pop("metadata", None) or {})  # type: ignore[call-overload]
        meta.setdefault("field", field)
        super().__init__(f"{field}: {problem}", metadata=meta, **kwargs)  # type: ignore[arg-type]
        self.field = field


class NotFoundError(CugaError):
    """The named entity does not exist (or the caller may not know it exists)."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(CugaError):
    """An id is taken by a different entity."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(CugaError):
    """The entity is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(CugaError):
    """A value is past a valid range (e.g. a page token past the end)."""

    code = grpc.StatusCode.OUT_OF_RANGE


class PermissionDeniedError(CugaError):
    """The caller is known but not allowed."""

    code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(CugaError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhaustedError(CugaError):
    """A configured limit or quota was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(CugaError):
    """A deadline or timeout passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(CugaError):
    """A dependency cannot be reached now; retrying later may work."""

    code = grpc.StatusCode.UNAVAILABLE


class AbortedError(CugaError):
    """A concurrent change got in the way; retrying may work."""

    code = grpc.StatusCode.ABORTED


class InternalError(CugaError):
    """A bug or an unexpected failure of a tool or agent."""

    code = grpc.StatusCode.INTERNAL


class UnknownError(CugaError):
    """The peer answered with a status it did not classify."""

    code = grpc.StatusCode.UNKNOWN


class CancelledError(CugaError):
    """The call was cancelled; never retried."""

    code = grpc.StatusCode.CANCELLED


class UnimplementedError(CugaError):
    """The peer does not serve the method (an older version of it, say)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ToolExecutionError(CugaError):
    """A tool raised; its failure mode says how (see :func:`classify_failure`).

    Attributes:
        wire_code: the status code a worker answers with for this failure mode
            (``FAILURE_MODE_STATUS``), so the coordinator classifies it the same way.
    """

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, failure_mode: FailureMode, **kwargs: object) -> None:
        super().__init__(message, failure_mode=failure_mode, **kwargs)  # type: ignore[arg-type]
        self.wire_code = FAILURE_MODE_STATUS.get(failure_mode, grpc.StatusCode.INTERNAL)


_BY_CODE: dict[grpc.StatusCode, type[CugaError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        OutOfRangeError,
        PermissionDeniedError,
        UnauthenticatedError,
        ResourceExhaustedError,
        DeadlineExceededError,
        UnavailableError,
        AbortedError,
        InternalError,
        UnknownError,
        CancelledError,
        UnimplementedError,
    )
}


def wire_code(error: CugaError) -> grpc.StatusCode:
    """The status code an error is sent as."""
    if isinstance(error, ToolExecutionError):
        return error.wire_code
    return error.code


def classify_failure(exc: BaseException) -> FailureMode:
    """Classify an exception raised inside a tool or a call, per DESIGN.md.

    ``TimeoutError`` -> RESOURCE, ``ConnectionError`` -> SYSTEM, ``ValueError`` -> USER,
    ``PermissionError`` -> POLICY, a :class:`CugaError` -> its own mode, anything else ->
    AGENT.
    """
    if isinstance(exc, CugaError):
        return exc.failure_mode
    if isinstance(exc, TimeoutError):
        return FailureMode.RESOURCE
    if isinstance(exc, ConnectionError):
        return FailureMode.SYSTEM
    if isinstance(exc, PermissionError):
        return FailureMode.POLICY
    if isinstance(exc, ValueError):
        return FailureMode.USER
    if isinstance(exc, grpc.RpcError):
        return failure_mode_for_status(exc.code())
    return FailureMode.AGENT


def error_info(error: CugaError) -> error_details_pb2.ErrorInfo:
    """The ``google.rpc.ErrorInfo`` an error crosses the wire with."""
    metadata = dict(error.metadata)
    if (
        error.failure_mode is not failure_mode_for_status(wire_code(error))
        and error.reason != error.failure_mode.name
    ):
        # A mode other than the table's default for this status (e.g. "no eligible worker
        # *right now*" is SYSTEM, though FAILED_PRECONDITION): say so, so it survives the wire.
        metadata[FAILURE_MODE_KEY] = error.failure_mode.name
    return error_details_pb2.ErrorInfo(reason=error.reason, domain=error.domain, metadata=metadata)


def to_status(error: CugaError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """Code, message and trailing metadata (with ErrorInfo) for an error."""
    code = wire_code(error)
    detail = any_pb2.Any()
    detail.Pack(error_info(error))
    status = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    return code, error.message, ((GRPC_DETAILS_METADATA_KEY, status.SerializeToString()),)


def _error_info(trailing: object) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing or ():  # type: ignore[attr-defined]
        if key != GRPC_DETAILS_METADATA_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                return info
    return None


def from_rpc_error(
    code: grpc.StatusCode, details: str | None, trailing_metadata: object
) -> CugaError:
    """Rebuild the typed error a peer sent (its class, reason and failure mode)."""
    return from_error_info(code, details, _error_info(trailing_metadata))


def from_error_info(
    code: grpc.StatusCode, details: str | None, info: error_details_pb2.ErrorInfo | None
) -> CugaError:
    """The typed error of a status code, message and ErrorInfo (what :func:`error_info`
    and :func:`wire_code` made of it on the other side)."""
    cls = _BY_CODE.get(code, UnknownError)
    message = details or code.name
    mode = failure_mode_for_status(code)
    reason = None
    domain = "cuga"
    meta: dict[str, str] = {}
    if info is not None:
        reason, domain, meta = info.reason, info.domain or domain, dict(info.metadata)
        if reason in FailureMode.__members__:
            mode = FailureMode[reason]
        elif meta.get(FAILURE_MODE_KEY) in FailureMode.__members__:
            mode = FailureMode[meta.pop(FAILURE_MODE_KEY)]
    err = CugaError.__new__(cls)
    CugaError.__init__(err, message, reason=reason, failure_mode=mode, domain=domain, metadata=meta)
    if isinstance(err, InvalidArgumentError):
        err.field = meta.get("field", "")
    return err


def from_exception(exc: BaseException, domain: str) -> CugaError:
    """Wrap anything raised in a handler as a CugaError, never leaking a traceback."""
    if isinstance(exc, CugaError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return DeadlineExceededError("operation timed out", domain=domain)
    return InternalError("internal error", domain=domain, reason="INTERNAL")


__all__ = [
    "FAILURE_MODE_STATUS",
    "RESEND_STATUS_NAMES",
    "STATUS_FAILURE_MODES",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "CugaError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FailureMode",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ToolExecutionError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "classify_failure",
    "error_info",
    "failure_mode_for_status",
    "from_error_info",
    "from_exception",
    "from_rpc_error",
    "status_code",
    "to_status",
    "wire_code",
]
