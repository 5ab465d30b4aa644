"""The worker's domain: validate a step, run its tool once per key, classify failures.

:class:`WorkerAgent` is used by the gRPC servicer and, through :class:`LocalWorkerPool`,
by the coordinator engine in embedded mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2

from cuga.common.v1 import common_pb2
from cuga.services.worker.config import ProfileTools
from cuga.services.worker.processes import ToolProcessPool
from cuga.services.worker.runners import (
    Slot,
    ToolOutputNotJson,
    ToolOutputTooLarge,
    ToolProcessFailed,
    ToolProcessUnavailable,
    ToolRaised,
    ToolRunner,
    ToolThreads,
    runs_in_process,
)
from cuga.services.worker.store import IdempotencyStore, StoredExecution
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.errors import (
    AlreadyExistsError,
    CugaError,
    DeadlineExceededError,
    FailureMode,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ToolExecutionError,
    UnavailableError,
    classify_failure,
    from_rpc_error,
)
from cuga.shared.files import private_dir
from cuga.shared.messages import seconds, struct_to_dict, to_value
from cuga.shared.validation import (
    check_context,
    check_length,
    check_plan_step,
    check_timestamp,
    decode_page_token,
    encode_page_token,
    page_size,
)
from cuga.tools import ToolContext, ToolRegistry, ToolSpec, check_input, to_proto
from cuga.worker.v1 import worker_pb2

log = logging.getLogger("cuga.worker")

DOMAIN = "cuga.worker"
MAX_IDEMPOTENCY_KEY_CHARS = 256
#: Longest error message a tool's exception contributes (they are shown to people).
MAX_ERROR_MESSAGE_CHARS = 1000
#: Weight of the newest sample in the latency EWMA reported in heartbeats.
LATENCY_EWMA_ALPHA = 0.2


class ToolPolicy:
    """Per-profile tool allow/deny lists: deny wins; an allow list denies everything else.

    Args:
        profiles: lists by profile name; ``*`` applies to profiles without an entry.
    """

    def __init__(self, profiles: Mapping[str, ProfileTools] | None = None) -> None:
        self._profiles = dict(profiles or {})

    def allowed(self, profile: str, tool: str) -> bool:
        """Whether ``profile`` may call ``tool``."""
        rules = self._profiles.get(profile) or self._profiles.get("*")
        if rules is None:
            return True
        if any(fnmatch.fnmatchcase(tool, pattern) for pattern in rules.deny):
            return False
        if rules.allow is None:
            return True
        return any(fnmatch.fnmatchcase(tool, pattern) for pattern in rules.allow)

    def check(self, profile: str, tool: str) -> None:
        """Raise PERMISSION_DENIED (POLICY) when ``profile`` may not call ``tool``."""
        if not self.allowed(profile, tool):
            raise PermissionDeniedError(
                f"profile {profile!r} may not call tool {tool!r}",
                reason="TOOL_NOT_ALLOWED",
                failure_mode=FailureMode.POLICY,
                domain=DOMAIN,
                metadata={"profile": profile, "tool": tool},
            )


@dataclass(frozen=True)
class WorkerLimits:
    """Size limits the worker enforces (from ``settings.common.limits``)."""

    max_input_bytes: int = 64 * 1024
    """Largest step input, serialised bytes."""
    max_output_bytes: int = 1024 * 1024
    """Largest tool output, serialised bytes."""
    max_page_size: int = 1000
    """Largest ListTools page."""
    max_in_flight: int = 256
    """Executions running at once."""


@dataclass
class _InFlight:
    fingerprint: str
    done: asyncio.Future[common_pb2.StepResult]
    """The execution's outcome, for callers that join it (and for :meth:`close`)."""
    joined: asyncio.Event = field(default_factory=asyncio.Event)


#: ``json.dumps(data, sort_keys=True, separators=(",", ":"))``'s encoder, made once:
#: ``dumps`` builds a new one for every call with arguments (one per step here).
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def fingerprint(step: common_pb2.PlanStep, data: dict[str, Any]) -> str:
    """What makes two executions "the same step": tool, step id and canonical input
    (``data``: the step's input as :func:`struct_to_dict` gives it)."""
    canonical = _CANONICAL_JSON.encode(data)
    return hashlib.sha256(f"{step.tool}\0{step.step_id}\0{canonical}".encode()).hexdigest()


def _normalise(value: Any) -> Any:
    """JSON from a Struct has only floats; give handlers ints where the number is integral."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def _duration(secs: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(0.0, secs) * 1e9))
    return d


class WorkerAgent:
    """Executes steps with the tools of a :class:`ToolRegistry`, exactly once per key.

    Args:
        registry: the tools.
        store: finished executions by idempotency key.
        worker_id: reported in results.
        sandbox_dir: the directory file tools may use (created if missing).
        policy: per-profile allow/deny lists.
        limits: size and concurrency limits.
        clock: time source (deadlines, durations).
        executor: threads for synchronous handlers that run in threads (the agent owns it
            and shuts it down); default ``max_threads`` threads.
        max_threads: synchronous calls that may run in threads at once.
        processes: tool processes for synchronous handlers that can run in one (the agent
            owns the pool and closes it); ``None``: every synchronous handler runs in a
            thread, which cannot be stopped past its timeout.
    """

    def __init__(
        self,
        registry: ToolRegistry,
        store: IdempotencyStore,
        *,
        worker_id: str = "worker-1",
        sandbox_dir: Path = Path("sandbox"),
        policy: ToolPolicy | None = None,
        limits: WorkerLimits | None = None,
        clock: Clock | None = None,
        executor: concurrent.futures.ThreadPoolExecutor | None = None,
        max_threads: int = 32,
        processes: ToolProcessPool | None = None,
    ) -> None:
        self._registry = registry
        self._store = store
        self.worker_id = worker_id
        self._sandbox = sandbox_dir
        private_dir(self._sandbox)  # owner-only, whatever the umask
        self._policy = policy or ToolPolicy()
        self._limits = limits or WorkerLimits()
        self._clock: Clock = clock or SystemClock()
        self._threads = ToolThreads(max_threads, executor)
        self._processes = processes
        self._runners: dict[str, ToolRunner] = {}
        # Whether a spec's handler is async, by tool name, with the spec it was read from:
        # inspect's test is ~1 us, and it was asked on every step.
        self._async_specs: dict[str, tuple[ToolSpec, bool]] = {}
        for spec in registry.specs():
            self._runner(spec)  # decided (and any fallback to threads logged) at start
        self._warming: asyncio.Future[None] | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._latency: float | None = None

    @property
    def registry(self) -> ToolRegistry:
        """The tools this agent runs."""
        return self._registry

    @property
    def in_flight(self) -> int:
        """Executions running now, plus calls already answered (past their deadline)
        whose handler still occupies a tool process or thread: the load, as routing
        should see it."""
        lingering = self._threads.lingering
        if self._processes is not None:
            lingering += self._processes.lingering
        return len(self._inflight) + lingering

    async def wait_released(self) -> None:
        """Until no call already answered still occupies a tool process or thread (lets
        tests and probes observe a slot coming back)."""
        await self._threads.wait_for(lambda c: c.lingering == 0)
        if self._processes is not None:
            await self._processes.wait_for(lambda c: c.lingering == 0)

    def warm_up(self) -> None:
        """Start the tool processes' zygote and one process in the background (when any
        tool runs in one), so the first calls do not pay for it (~0.2 s of CPU)."""
        if self._processes is None or self._processes not in self._runners.values():
            return
        if self._warming is None:
            self._warming = asyncio.ensure_future(self._processes.start())
            self._warming.add_done_callback(_log_warm_up_failure)

    def _runner(self, spec: ToolSpec) -> ToolRunner | None:
        """Where a tool's handler runs: ``None`` (on the loop, ``async``), a tool process
        (a plain function a process can import), else a thread."""
        known = self._async_specs.get(spec.name)
        if known is None or known[0] is not spec:
            known = self._async_specs[spec.name] = (spec, spec.is_async)
        if known[1]:
            return None
        runner = self._runners.get(spec.name)
        if runner is None:
            if self._processes is not None and runs_in_process(spec.handler):
                runner = self._processes
            else:
                runner = self._threads
                if self._processes is not None:
                    log.warning(
                        "tool %r: its handler is not a function a tool process can import "
                        "(a closure, lambda, bound method or callable object), so it runs "
                        "in a thread, which cannot be stopped past its timeout",
                        spec.name,
                    )
            self._runners[spec.name] = runner
        return runner

    @property
    def recent_latency(self) -> float:
        """EWMA of execution durations, seconds (0 before the first execution)."""
        return self._latency or 0.0

    async def wait_joined(self, key: str) -> None:
        """Until a second call joins the running execution of ``key`` (returns at once
        when nothing runs under ``key``). Lets tests and probes observe deduplication."""
        running = self._inflight.get(key)
        if running is not None:
            await running.joined.wait()

    # -- ListTools -------------------------------------------------------------------

    def list_tools(self) -> list[common_pb2.ToolSpec]:
        """Every tool as the contract's ToolSpec, ordered by name."""
        return [to_proto(spec) for spec in self._registry.specs()]

    def list_tools_page(self, request: worker_pb2.ListToolsRequest) -> worker_pb2.ListToolsResponse:
        """One page of tools ordered by name."""
        size = page_size("page_size", request.page_size, self._limits.max_page_size)
        after = decode_page_token("page_token", request.page_token)
        names = [n for n in self._registry.names() if n > after]
        page, rest = names[:size], names[size:]
        return worker_pb2.ListToolsResponse(
            tools=[to_proto(self._registry.get(n)) for n in page],
            next_page_token=encode_page_token(page[-1]) if rest else "",
        )

    # -- ExecuteStep -----------------------------------------------------------------

    def _validate(self, request: worker_pb2.ExecuteStepRequest) -> ToolSpec:
        check_length("idempotency_key", request.idempotency_key, MAX_IDEMPOTENCY_KEY_CHARS)
        if not request.idempotency_key.strip():
            raise InvalidArgumentError("idempotency_key", "is required")
        if not request.HasField("step"):
            raise InvalidArgumentError("step", "is required")
        step = request.step
        check_plan_step("step", step, max_input_bytes=self._limits.max_input_bytes)
        check_context("context", request.context)
        if request.HasField("attempt_deadline"):
            check_timestamp("attempt_deadline", request.attempt_deadline)
        # Permission before existence: a profile learns nothing about tools it may not call.
        self._policy.check(request.context.profile or "default", step.tool)
        return self._registry.get(step.tool)

    async def execute(
        self,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
        in_caller_task: bool = False,
    ) -> common_pb2.StepResult:
        """Run the step's tool, or answer from the idempotency store.

        Args:
            request: the step, its context, the idempotency key and the attempt.
            timeout: seconds left of the caller's deadline (``None``: none); the tool runs
                under the shortest of this, the tool's timeout and the run's deadline.
            in_caller_task: run the tool in the calling task instead of a task of its own.
                Only for a caller that is never cancelled before this returns (the step
                stream's per-request tasks): a cancelled execution writes no record.

        Raises:
            InvalidArgumentError: a malformed request or an input failing the tool's schema
                (the message names the JSON path).
            NotFoundError: the tool is not registered here.
            PermissionDeniedError: the profile may not call the tool.
            AlreadyExistsError: the key was used for a different step.
            ResourceExhaustedError: too many executions in flight, or the output is too big.
            ToolExecutionError: the tool failed (``failure_mode`` per DESIGN.md; a timeout
                is RESOURCE and crosses the wire as DEADLINE_EXCEEDED).
        """
        spec = self._validate(request)
        key = request.idempotency_key
        data = struct_to_dict(request.step.input)  # converted once: fingerprint and inputs
        fp = fingerprint(request.step, data)
        running = self._inflight.get(key)
        if running is not None:
            self._check_fingerprint(key, running.fingerprint, fp)
            running.joined.set()
            result = await asyncio.shield(running.done)
            joined = common_pb2.StepResult()
            joined.CopyFrom(result)
            joined.replayed = True  # this caller did not run the tool
            return joined
        stored = self._store.get(key)
        if stored is not None:
            self._check_fingerprint(key, stored.fingerprint, fp)
            return self._replay(stored)
        if (
            request.HasField("attempt_deadline")
            and seconds(request.attempt_deadline) <= self._clock.now()
        ):
            # Arrived after its caller stopped waiting (a partition held it): the caller
            # may already have sent the step elsewhere, so it must not run here now.
            # Not stored: a later attempt with the same key may still run it.
            raise DeadlineExceededError(
                f"step {request.step.step_id} arrived after its attempt deadline; not run",
                reason="ATTEMPT_DEADLINE_PASSED",
                domain=DOMAIN,
                metadata={"step_id": request.step.step_id},
            )
        inputs = _normalise(data)
        check_input(spec.validator, inputs, field="step.input")
        in_flight = self.in_flight
        if in_flight >= self._limits.max_in_flight:
            raise ResourceExhaustedError(
                f"worker {self.worker_id} is running {in_flight} steps, "
                f"the limit is {self._limits.max_in_flight}",
                reason="WORKER_BUSY",
                domain=DOMAIN,
            )
        slot = self._admit(spec)
        done: asyncio.Future[common_pb2.StepResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = _InFlight(fp, done)
        run = self._run(spec, request, inputs, fp, timeout, slot)
        if in_caller_task:
            try:
                result = await run
            except BaseException as exc:
                self._settle(key, done, exc)
                raise
            finally:
                if slot is not None:
                    slot.discard()
            self._settle(key, done, result)
            return result
        # The execution is a task of its own: a caller that goes away (deadline, dropped
        # connection) does not cancel it half-way, and its record is still written.
        task = asyncio.create_task(run)
        task.add_done_callback(functools.partial(self._finished, key, done, slot))
        return await asyncio.shield(task)

    def _admit(self, spec: ToolSpec) -> Slot | None:
        """A slot for a synchronous tool's call, or RESOURCE_EXHAUSTED (WORKER_SATURATED)
        at once when every slot is taken: queued, the call would wait behind calls that
        may be stuck until their deadline, and another worker may be free now."""
        runner = self._runner(spec)
        if runner is None:
            return None
        slot = runner.acquire()
        if slot is None:
            raise ResourceExhaustedError(
                f"worker {self.worker_id} is saturated: all {runner.size} {runner.kind} "
                f"slots for synchronous tools are taken ({runner.lingering} by calls past "
                "their deadline)",
                reason="WORKER_SATURATED",
                domain=DOMAIN,
                metadata={
                    "tool": spec.name,
                    "slots": str(runner.size),
                    "lingering": str(runner.lingering),
                },
            )
        return slot

    def _finished(
        self,
        key: str,
        done: asyncio.Future[common_pb2.StepResult],
        slot: Slot | None,
        task: asyncio.Task[common_pb2.StepResult],
    ) -> None:
        if slot is not None:
            slot.discard()  # a task cancelled before it ran never took its slot
        if task.cancelled():
            self._settle(key, done, asyncio.CancelledError())
        else:
            error = task.exception()
            self._settle(key, done, task.result() if error is None else error)

    def _settle(
        self,
        key: str,
        done: asyncio.Future[common_pb2.StepResult],
        outcome: common_pb2.StepResult | BaseException,
    ) -> None:
        """End an execution: joiners get its outcome; it no longer counts as in flight."""
        self._inflight.pop(key, None)
        if done.done():
            return
        if isinstance(outcome, asyncio.CancelledError):
            done.cancel()
        elif isinstance(outcome, BaseException):
            done.set_exception(outcome)
            done.exception()  # retrieved: a failure nobody joined is not logged as lost
        else:
            done.set_result(outcome)

    @staticmethod
    def _check_fingerprint(key: str, stored: str, current: str) -> None:
        if stored != current:
            raise AlreadyExistsError(
                f"idempotency_key: {key!r} was already used for a different tool, step or input",
                reason="IDEMPOTENCY_KEY_REUSED",
                failure_mode=FailureMode.USER,
                domain=DOMAIN,
                metadata={"field": "idempotency_key"},
            )

    def _replay(self, stored: StoredExecution) -> common_pb2.StepResult:
        if stored.result is not None:
            result = common_pb2.StepResult.FromString(stored.result)
            result.replayed = True
            return result
        meta = {**stored.error_metadata, "replayed": "true"}
        mode = FailureMode(stored.failure_mode)
        if stored.tool_error:
            raise ToolExecutionError(
                stored.error_message,
                failure_mode=mode,
                reason=stored.error_reason or None,
                domain=DOMAIN,
                metadata=meta,
            )
        error = from_rpc_error(grpc.StatusCode[stored.error_code], stored.error_message, None)
        error.reason, error.failure_mode, error.metadata = stored.error_reason, mode, meta
        error.domain = DOMAIN
        raise error

    def _budget(
        self, spec: ToolSpec, request: worker_pb2.ExecuteStepRequest, timeout: float | None
    ) -> float:
        budget = spec.timeout
        if timeout is not None:
            budget = min(budget, timeout)
        if request.context.HasField("deadline"):
            budget = min(budget, seconds(request.context.deadline) - self._clock.now())
        if request.HasField("attempt_deadline"):
            budget = min(budget, seconds(request.attempt_deadline) - self._clock.now())
        return budget

    async def _run(
        self,
        spec: ToolSpec,
        request: worker_pb2.ExecuteStepRequest,
        inputs: dict[str, Any],
        fp: str,
        timeout: float | None,
        slot: Slot | None,
    ) -> common_pb2.StepResult:
        step = request.step
        attempt = request.attempt or 1
        budget = self._budget(spec, request, timeout)
        meta = {"tool": spec.name, "step_id": step.step_id}
        started = self._clock.monotonic()
        try:
            if budget <= 0:
                raise TimeoutError("no time left before the deadline")
            context = ToolContext(
                run_id=request.context.run_id,
                step_id=step.step_id,
                profile=request.context.profile or "default",
                user_id=request.context.user_id,
                attempt=attempt,
                deadline=self._clock.now() + budget,
                sandbox_dir=self._sandbox,
                metadata=dict(request.context.metadata),
            )
            # asyncio.timeout, not wait_for: the tool runs in this task, not one more.
            async with asyncio.timeout(budget):
                output = await self._call(spec, inputs, context, slot)
        except asyncio.CancelledError:
            raise
        except TimeoutError as exc:
            self._observe(started)
            # Not stored: RESOURCE is retryable, and a retry with the same key must run.
            raise ToolExecutionError(
                f"tool {spec.name!r} did not finish within {max(budget, 0.0):.3f}s ({exc or 'timeout'})",
                failure_mode=FailureMode.RESOURCE,
                domain=DOMAIN,
                metadata={**meta, "exception": "TimeoutError"},
            ) from None
        except CugaError as exc:
            self._observe(started)
            self._remember_failure(request, fp, exc, tool_error=False)
            raise
        except ToolOutputNotJson as exc:
            self._observe(started)
            raise self._not_json(spec, exc.type_name) from None
        except ToolOutputTooLarge as exc:
            self._observe(started)
            raise self._too_large(spec, exc.size) from None
        except ToolProcessFailed as exc:
            self._observe(started)
            # A tool that kills its own process is a bug in the tool: retryable, not stored.
            raise ToolExecutionError(
                f"tool {spec.name!r} failed: {exc}"[:MAX_ERROR_MESSAGE_CHARS],
                failure_mode=FailureMode.AGENT,
                reason="TOOL_PROCESS_FAILED",
                domain=DOMAIN,
                metadata=meta,
            ) from None
        except ToolProcessUnavailable as exc:
            self._observe(started)
            raise UnavailableError(
                f"tool {spec.name!r} not run: {exc}"[:MAX_ERROR_MESSAGE_CHARS],
                reason="TOOL_PROCESS_UNAVAILABLE",
                domain=DOMAIN,
                metadata=meta,
            ) from None
        except Exception as exc:
            self._observe(started)
            if isinstance(exc, ToolRaised):  # raised in a tool process
                name, mode, message = exc.type_name, exc.failure_mode, exc.message
            else:
                name, mode, message = type(exc).__name__, classify_failure(exc), str(exc)
            text = f"tool {spec.name!r} failed: {name}: {message}"
            error = ToolExecutionError(
                text[:MAX_ERROR_MESSAGE_CHARS],
                failure_mode=mode,
                domain=DOMAIN,
                metadata={**meta, "exception": name},
            )
            self._remember_failure(request, fp, error, tool_error=True)
            raise error from None
        duration = self._observe(started)
        if isinstance(output, struct_pb2.Value) and self._runner(spec) is self._processes:
            value = self._check_size(spec, output)  # converted in the tool process
        else:
            value = self._output(spec, output)
        result = common_pb2.StepResult(
            step_id=step.step_id,
            output=value,
            worker_id=self.worker_id,
            attempt=attempt,
            duration=_duration(duration),
            replayed=False,
            cost=spec.cost,
        )
        self._remember(
            StoredExecution(
                key=request.idempotency_key,
                fingerprint=fp,
                tool=spec.name,
                step_id=step.step_id,
                result=result.SerializeToString(),
                created_at=self._clock.now(),
            )
        )
        return result

    async def _call(
        self, spec: ToolSpec, inputs: dict[str, Any], context: ToolContext, slot: Slot | None
    ) -> Any:
        if slot is None:
            return await spec.handler(inputs, context)
        runner = self._runner(spec)
        assert runner is not None
        return await runner.run(slot, spec.handler, inputs, context)

    def _output(self, spec: ToolSpec, output: Any) -> struct_pb2.Value:
        try:
            value = to_value(output)
        except Exception as exc:  # not JSON: a bug in the tool
            raise self._not_json(spec, type(exc).__name__) from None
        return self._check_size(spec, value)

    def _check_size(self, spec: ToolSpec, value: struct_pb2.Value) -> struct_pb2.Value:
        size = value.ByteSize()
        if size > self._limits.max_output_bytes:
            raise self._too_large(spec, size)
        return value

    @staticmethod
    def _not_json(spec: ToolSpec, why: str) -> ToolExecutionError:
        return ToolExecutionError(
            f"tool {spec.name!r} returned a value that is not JSON ({why})",
            failure_mode=FailureMode.AGENT,
            reason="OUTPUT_NOT_JSON",
            domain=DOMAIN,
            metadata={"tool": spec.name},
        )

    def _too_large(self, spec: ToolSpec, size: int) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"tool {spec.name!r} output is {size} bytes serialised, "
            f"the limit is {self._limits.max_output_bytes}",
            reason="OUTPUT_TOO_LARGE",
            domain=DOMAIN,
            metadata={"tool": spec.name, "size": str(size)},
        )

    def _observe(self, started: float) -> float:
        duration = max(0.0, self._clock.monotonic() - started)
        self._latency = (
            duration
            if self._latency is None
            else LATENCY_EWMA_ALPHA * duration + (1 - LATENCY_EWMA_ALPHA) * self._latency
        )
        return duration

    def _remember_failure(
        self, request: worker_pb2.ExecuteStepRequest, fp: str, error: CugaError, *, tool_error: bool
    ) -> None:
        # Retryable failures are not stored: the coordinator's RETRY strategy re-sends the
        # same key and expects the tool to run again. USER and POLICY failures would fail
        # the same way, so they are answered from the store.
        if error.failure_mode.retryable or error.failure_mode is FailureMode.UNSPECIFIED:
            return
        self._remember(
            StoredExecution(
                key=request.idempotency_key,
                fingerprint=fp,
                tool=request.step.tool,
                step_id=request.step.step_id,
                error_code=(
                    error.wire_code if isinstance(error, ToolExecutionError) else error.code
                ).name,
                error_message=error.message,
                error_reason=error.reason,
                failure_mode=int(error.failure_mode),
                error_metadata=dict(error.metadata),
                tool_error=tool_error,
                created_at=self._clock.now(),
            )
        )

    def _remember(self, record: StoredExecution) -> None:
        try:
            self._store.put(record)
        except Exception:
            # The step did finish; failing the call now would make the caller retry a step
            # whose side effect happened. Log loudly instead.
            log.exception("could not store the outcome of %s", record.key)

    async def close(self) -> None:
        """Wait for running executions (so their records are written), kill the tool
        processes (lingering calls' included) and wait until they are gone, then close
        the store. Threads still running a lingering call are left to end on their own."""
        running: list[asyncio.Future[Any]] = [entry.done for entry in self._inflight.values()]
        if self._warming is not None:
            running.append(self._warming)
        if running:
            await asyncio.wait(running)
        await self._threads.close()
        if self._processes is not None:
            await self._processes.close()
        self._store.close()


def _log_warm_up_failure(warming: asyncio.Future[None]) -> None:
    if not warming.cancelled() and warming.exception() is not None:
        log.warning(
            "could not start a tool process ahead of calls (the first call tries again): %s",
            warming.exception(),
        )


class LocalWorkerPool:
    """The ``WorkerPool`` of embedded mode: every step runs on one in-process agent."""

    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent

    @property
    def agent(self) -> WorkerAgent:
        """The agent steps run on."""
        return self._agent

    async def execute_step(
        self,
        target: common_pb2.WorkerTarget,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
    ) -> common_pb2.StepResult:
        """Run one step (``target`` is ignored: there is one worker)."""
        return await self._agent.execute(request, timeout=timeout)

    async def list_tools(
        self, target: common_pb2.WorkerTarget, *, timeout: float | None = None
    ) -> list[common_pb2.ToolSpec]:
        """The tools of the in-process worker."""
        return self._agent.list_tools()


def remaining(timeout: float | None) -> float | None:
    """A caller's remaining time as a number or ``None`` (gRPC gives ``None`` or a float)."""
    if timeout is None or math.isinf(timeout):
        return None
    return max(0.0, timeout)
