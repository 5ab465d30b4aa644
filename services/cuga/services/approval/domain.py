"""The approval authority's domain: policy decisions, the pending store and the waiters.

:class:`ApprovalManager` is the local implementation of
:class:`cuga.shared.authorities.ApprovalManager` (the coordinator engine uses it embedded;
the servicer exposes it over gRPC). It speaks the contract's messages:
``ApprovalRequest`` is ``cuga.approval.v1.ApprovalRequest`` and ``ApprovalResponse`` (a
reviewer's answer) is ``cuga.approval.v1.ReviewerDecision``.

Waiting costs nothing: each pending request has one :class:`asyncio.Event`; every
``await_decision`` on it awaits that event, and a decision or expiry sets it once, releasing
all of them. Expiry is driven by the injected :class:`~cuga.shared.clock.Clock`: one
background task sleeps until the earliest ``expires_at`` (re-armed when a request arrives)
and every read checks expiry lazily too, so a request is never seen PENDING past its time.

Several replicas may share one (PostgreSQL) store: every write is a compare-and-swap on
the stored request's version, so racing decisions and expiries are decided once and the
loser is re-evaluated against the winner; decisions and new requests of other replicas
arrive through :meth:`~cuga.services.approval.store.SqlApprovalStore.listen` and wake the
local waiters and expiry task. Because a notification can be lost (a broken listening
connection), waiters and the expiry task on a shared store also re-read every
``recheck_s`` seconds: a lost notification delays, never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.services.approval.policy import ApprovalPolicy
from cuga.services.approval.store import REQUESTED, SqlApprovalStore, StoredRequest, step_key
from cuga.shared.auth import Identity
from cuga.shared.clock import Clock
from cuga.shared.config import Limits
from cuga.shared.errors import (
    AbortedError,
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from cuga.shared.messages import seconds, struct_to_dict, timestamp
from cuga.shared.metrics import OUTCOME, ApprovalMetrics
from cuga.shared.sqldb import LISTEN_READY_S
from cuga.shared.validation import (
    TOOL_NAME_PATTERN,
    check_context,
    check_count,
    check_id,
    check_length,
    check_plan_step,
    check_request_id,
    decode_page_token,
    encode_page_token,
)
from cuga.shared.validation import (
    page_size as effective_page_size,
)

log = logging.getLogger("cuga.approval")

ApprovalRequest = approval_pb2.ApprovalRequest
"""A request and where it stands (the contract's message)."""
ApprovalResponse = approval_pb2.ReviewerDecision
"""One reviewer's answer to a request (the contract's ``ReviewerDecision``)."""

Status = common_pb2.ApprovalStatus
NOT_REQUIRED = common_pb2.APPROVAL_STATUS_NOT_REQUIRED
PENDING = common_pb2.APPROVAL_STATUS_PENDING
APPROVED = common_pb2.APPROVAL_STATUS_APPROVED
DENIED = common_pb2.APPROVAL_STATUS_DENIED
EXPIRED = common_pb2.APPROVAL_STATUS_EXPIRED
WITHDRAWN = common_pb2.APPROVAL_STATUS_WITHDRAWN
#: Final states a resumed run may ask afresh after (RequestApproval ``supersedes``).
SUPERSEDABLE = frozenset({DENIED, EXPIRED, WITHDRAWN})
DEFAULT_PROFILE = "default"
MAX_REASON_CHARS = 1024
#: Compare-and-swap attempts of one decision or expiry before giving up with ABORTED
#: (only ever reached under pathological contention from other replicas).
_MAX_ATTEMPTS = 16


def status_name(status: int) -> str:
    """``PENDING``, ``APPROVED`` ... for a status value."""
    return common_pb2.ApprovalStatus.Name(status).removeprefix("APPROVAL_STATUS_")


class ApprovalManager:
    """Decides whether steps need sign-off, keeps pending requests, collects decisions."""

    def __init__(
        self,
        store: SqlApprovalStore,
        policy: ApprovalPolicy,
        *,
        clock: Clock,
        limits: Limits | None = None,
        max_pending_per_profile: int = 1000,
        metrics: ApprovalMetrics | None = None,
        recheck_s: float = 5.0,
    ) -> None:
        """Args:
        store: durable storage of requests (shared by replicas when ``store.shared``).
        policy: the rules.
        clock: time source for creation, expiry and the expiry task.
        limits: input limits (step input size, batch size, page size).
        max_pending_per_profile: PENDING requests one profile may hold.
        metrics: requested/decided/expired counters (no-op when ``None``).
        recheck_s: on a shared store, how often (event-loop seconds) a waiter re-reads
            its request and the expiry task sweeps, in case a notification was lost.
        """
        self._store = store
        self._policy = policy
        self._clock = clock
        self._limits = limits or Limits()
        self._max_pending = max_pending_per_profile
        self._metrics = metrics or ApprovalMetrics()
        # Refreshed on the event loop after each change: the metric reader's thread must
        # not touch the SQLite connection.
        self._pending = 0  # read by start(), refreshed after each change
        self._waiters: dict[str, asyncio.Event] = {}
        # AwaitDecision calls per request: the last one leaving drops the request's event.
        self._waiter_counts: dict[str, int] = {}
        self._recheck_s: float | None = recheck_s if store.shared else None
        self._rearm = asyncio.Event()
        self._expiry_task: asyncio.Task[None] | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._recount: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._closed = False
        self._waiting = 0
        self._waiting_changed = asyncio.Event()

    @property
    def store(self) -> SqlApprovalStore:
        """The requests' storage."""
        return self._store

    @property
    def pending(self) -> int:
        """PENDING requests of every profile (a gauge)."""
        return self._pending

    @property
    def waiting(self) -> int:
        """AwaitDecision calls blocked right now (a gauge; costs nothing while they wait)."""
        return self._waiting

    async def until_waiting(self, count: int) -> None:
        """Return once at least ``count`` AwaitDecision calls are blocked (tests, drains)."""
        while self._waiting < count:
            self._waiting_changed.clear()
            await self._waiting_changed.wait()

    @property
    def policy(self) -> ApprovalPolicy:
        """The rules in force."""
        return self._policy

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the expiry task (expires what fell due while the service was down) and,
        on a shared store, listen for the other replicas' changes."""
        self._pending = await self._store.count_all_pending()
        if self._store.shared and self._listener_task is None:
            self._listener_task = asyncio.create_task(
                self._store.listen(self._on_change, self._on_listening), name="approval-listener"
            )
            # Serve once other replicas' decisions can reach the waiters; if the listener
            # is slow to connect, the periodic re-check covers the gap.
            try:
                await asyncio.wait_for(self._listening.wait(), LISTEN_READY_S)
            except TimeoutError:
                log.warning(
                    "approval listener not ready after %gs; relying on re-checks", LISTEN_READY_S
                )
        if self._expiry_task is None:
            self._expiry_task = asyncio.create_task(self._expiry_loop(), name="approval-expiry")

    async def close(self) -> None:
        """Stop the background tasks and release every waiter (they return the request
        as is)."""
        self._closed = True
        for task in (self._expiry_task, self._listener_task, self._recount):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._expiry_task = self._listener_task = None
        self._wake_all()

    def _wake_all(self) -> None:
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()

    def _on_listening(self) -> None:
        """The listener is (again) in place: what changed while it was not is unknown,
        so every waiter re-reads its request and the expiry task sweeps."""
        self._listening.set()
        self._wake_all()
        self._rearm.set()

    def _on_change(self, payload: str) -> None:
        """A notification from a replica (this one's own included)."""
        if payload == REQUESTED:
            self._rearm.set()
            return
        self._notify(payload)
        if self._recount is None or self._recount.done():
            # The listener calls back synchronously: count on a task of its own.
            self._recount = asyncio.create_task(self._count_pending(), name="approval-recount")

    async def _count_pending(self) -> None:
        try:
            self._pending = await self._store.count_all_pending()
        except Exception:  # a gauge; the next change or sweep counts again
            log.exception("counting pending approvals failed")

    async def _expiry_loop(self) -> None:
        # Ends on close() by cancellation, and also by `_closed`: a cancellation that
        # arrives while a pooled connection is being handed over can be lost inside
        # psycopg_pool's getconn (psycopg/psycopg#1345), and the loop would then wait on.
        while not self._closed:
            self._rearm.clear()
            try:
                await self._expire_due()
                earliest = await self._store.earliest_expiry()
            except Exception:  # a storage hiccup must not end expiry for good
                log.exception("expiring approval requests failed")
                if not self._closed:
                    await self._clock.sleep(1.0)
                continue
            if self._closed:
                return
            if earliest is not None and earliest <= self._clock.now():
                # Fell due while the sweep's queries were awaited (the clock moved on
                # meanwhile): sweep again rather than sleep past it.
                continue
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._rearm.wait())]
            if earliest is not None:
                waits.append(asyncio.ensure_future(self._sleep_until(earliest)))
            try:
                # On a shared store, sweep every recheck_s anyway: another replica's
                # request may expire first, and its notification may have been lost.
                await asyncio.wait(
                    waits, timeout=self._recheck_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                for waiter in waits:
                    waiter.cancel()

    async def _sleep_until(self, when: float) -> None:
        # The delay is taken when the task runs, not when it was made: the clock may have
        # moved in between (a fake clock's sleep of 0 would wait for its next advance).
        delay = when - self._clock.now()
        if delay > 0:
            await self._clock.sleep(delay)

    async def _expire_due(self) -> None:
        now = self._clock.now()
        for approval_id in await self._store.due(now):
            stored = await self._store.get(approval_id)
            if stored is not None:
                await self._expire(stored)
        if self._store.shared:
            # Other replicas change the count too; keep the gauge near the truth.
            self._pending = await self._store.count_all_pending()

    async def _expire(self, stored: StoredRequest) -> StoredRequest:
        """Expire a PENDING request that fell due; exactly one writer (of all replicas)
        succeeds, the others get the stored state."""
        for _ in range(_MAX_ATTEMPTS):
            request = stored.request
            if request.status != PENDING:
                return stored  # someone decided or expired it first: the stored state wins
            expired = ApprovalRequest()
            expired.CopyFrom(request)
            expired.status = EXPIRED
            expired.decided_at.CopyFrom(request.expires_at)
            if await self._store.update(expired, version=stored.version):
                self._metrics.expired.add(1)
                self._pending = await self._store.count_all_pending()
                log.info(
                    "approval expired: %s (run %s step %s, rule %s)",
                    expired.approval_id,
                    expired.run_id,
                    expired.step_id,
                    expired.rule,
                )
                self._notify(expired.approval_id)
                return StoredRequest(expired, stored.user_id, stored.request_id, stored.version + 1)
            current = await self._store.get(request.approval_id)
            if current is None:
                return stored
            stored = current
        raise AbortedError(
            f"approval {stored.request.approval_id!r} kept changing while expiring; retry",
            reason="CONCURRENT_DECISIONS",
        )

    def _notify(self, approval_id: str) -> None:
        event = self._waiters.pop(approval_id, None)
        if event is not None:
            event.set()

    async def _load(self, approval_id: str) -> StoredRequest | None:
        """A stored request, expired first if its time has come (lazy expiry)."""
        stored = await self._store.get(approval_id)
        if stored is None:
            return None
        request = stored.request
        if request.status == PENDING and self._clock.now() >= seconds(request.expires_at):
            return await self._expire(stored)
        return stored

    # ------------------------------------------------------------------ requests

    async def request_approval(
        self,
        request: approval_pb2.RequestApprovalRequest,
        *,
        requester: str = "",
        asked_by: str = "",
        timeout: float | None = None,
    ) -> ApprovalRequest:
        """Ask whether one step needs approval; create a PENDING request if it does.

        Idempotent by ``request_id`` and by ``(run_id, step_id)``: a repeat returns the
        stored request (whatever its state). A NOT_REQUIRED answer is not stored.

        Args:
            request: the RequestApproval message.
            requester: who started the run (the authenticated ``context.user_id`` the
                coordinator relays); default ``context.user_id``.
            asked_by: the identity that called (the coordinator); neither it nor the
                requester may decide the request.
            timeout: unused (local calls do not block).
        """
        check_request_id(request.request_id)
        self._check_context(request.context, request.HasField("context"))
        self._check_step("step", request.step, request.HasField("step"))
        check_id("supersedes", request.supersedes, required=False)
        ctx = request.context
        if request.request_id:
            existing = await self._store.by_request_id(request.request_id)
            if existing is not None:
                _check_request_id(request.request_id, ctx.run_id, request.step.step_id, existing)
                return await self._reload(existing)
        results = await self._decide_steps(
            ctx,
            [request.step],
            {request.step.tool} if request.sensitive else set(),
            requester,
            request.request_id,
            asked_by,
            {request.step.step_id: request.supersedes} if request.supersedes else {},
        )
        return results[0]

    async def request_approval_batch(
        self,
        request: approval_pb2.RequestApprovalBatchRequest,
        *,
        requester: str = "",
        asked_by: str = "",
        timeout: float | None = None,
    ) -> list[ApprovalRequest]:
        """The same as :meth:`request_approval` for several steps of one run, in order.

        All new PENDING requests are stored in one transaction: on any error nothing is.
        """
        check_request_id(request.request_id)
        self._check_context(request.context, request.HasField("context"))
        check_count("steps", request.steps, self._limits.max_steps, minimum=1)
        seen: set[str] = set()
        for i, step in enumerate(request.steps):
            self._check_step(f"steps[{i}]", step, True)
            if step.step_id in seen:
                raise InvalidArgumentError(f"steps[{i}].step_id", f"{step.step_id!r} repeats")
            seen.add(step.step_id)
        check_count("sensitive_tools", request.sensitive_tools, self._limits.max_steps)
        for i, tool in enumerate(request.sensitive_tools):
            check_id(f"sensitive_tools[{i}]", tool, pattern=TOOL_NAME_PATTERN)
        step_ids = {step.step_id for step in request.steps}
        for sid, previous in request.supersedes.items():
            if sid not in step_ids:
                raise InvalidArgumentError(f"supersedes[{sid!r}]", "names no step of this request")
            check_id(f"supersedes[{sid!r}]", previous)
        return await self._decide_steps(
            request.context,
            list(request.steps),
            set(request.sensitive_tools),
            requester,
            "",
            asked_by,
            dict(request.supersedes),
        )

    async def _check_supersedable(self, previous: str, run_id: str, step_id: str) -> None:
        """A fresh request may replace only a final, negative answer of the same step.

        Raises:
            InvalidArgumentError: ``previous`` is not a request of this run's step.
            FailedPreconditionError: it is still PENDING or was APPROVED.
        """
        stored = await self._load(previous)
        if stored is None or (stored.request.run_id, stored.request.step_id) != (
            run_id,
            step_id,
        ):
            raise InvalidArgumentError(
                "supersedes", f"{previous!r} is no approval request of step {step_id!r}"
            )
        status = stored.request.status
        if status not in SUPERSEDABLE:
            raise FailedPreconditionError(
                f"approval {previous!r} is {status_name(status)}; only a DENIED, EXPIRED or"
                " WITHDRAWN request can be superseded",
                reason="NOT_SUPERSEDABLE",
            )

    # ------------------------------------------------------------------ withdrawals

    async def withdraw_approvals(
        self,
        request: approval_pb2.WithdrawApprovalsRequest,
        *,
        viewer: Identity | None = None,
        timeout: float | None = None,
    ) -> list[ApprovalRequest]:
        """Withdraw every PENDING request of a run (it was cancelled): each becomes
        WITHDRAWN, a final state nobody may decide, and its waiters return.

        Idempotent: a repeat finds nothing PENDING and withdraws nothing. A request that
        a reviewer decided (or that expired) a moment earlier keeps that outcome.

        Args:
            request: the run and the reason.
            viewer: the caller; requests of profiles it may not act on are left alone.
            timeout: unused (local calls do not block).

        Returns:
            The requests this call withdrew.
        """
        check_request_id(request.request_id)
        check_id("run_id", request.run_id)
        check_length("reason", request.reason, MAX_REASON_CHARS)
        withdrawn: list[ApprovalRequest] = []
        for stored in await self._store.pending_of_run(request.run_id):
            if viewer is not None and not viewer.may_access_profile(stored.request.profile):
                continue
            done = await self._withdraw(stored, request.reason)
            if done is not None:
                withdrawn.append(done)
        if withdrawn:
            self._pending = await self._store.count_all_pending()
        return withdrawn

    async def _withdraw(self, stored: StoredRequest, reason: str) -> ApprovalRequest | None:
        """Withdraw one request if still PENDING (compare-and-swap, as :meth:`_expire`)."""
        for _ in range(_MAX_ATTEMPTS):
            request = stored.request
            if request.status != PENDING:
                return None  # decided or expired first: that outcome stands
            withdrawn = ApprovalRequest()
            withdrawn.CopyFrom(request)
            withdrawn.status = WITHDRAWN
            withdrawn.withdraw_reason = reason
            withdrawn.decided_at.CopyFrom(timestamp(self._clock.now()))
            if await self._store.update(withdrawn, version=stored.version):
                self._metrics.decided.add(1, {OUTCOME: status_name(WITHDRAWN)})
                log.info(
                    "approval withdrawn: %s (run %s step %s): %s",
                    withdrawn.approval_id,
                    withdrawn.run_id,
                    withdrawn.step_id,
                    reason,
                )
                self._notify(withdrawn.approval_id)
                return withdrawn
            current = await self._store.get(request.approval_id)
            if current is None:
                return None
            stored = current
        raise AbortedError(
            f"approval {stored.request.approval_id!r} kept changing while withdrawing; retry",
            reason="CONCURRENT_DECISIONS",
        )

    def _check_context(self, ctx: common_pb2.ExecutionContext, present: bool) -> None:
        if not present:
            raise InvalidArgumentError("context", "is required (context.run_id at least)")
        check_context("context", ctx, run_id_required=True)

    def _check_step(self, field: str, step: common_pb2.PlanStep, present: bool) -> None:
        if not present:
            raise InvalidArgumentError(field, "is required")
        check_plan_step(
            field,
            step,
            max_input_bytes=self._limits.max_input_bytes,
            max_depends_on=self._limits.max_steps,
        )

    async def _reload(self, stored: StoredRequest) -> ApprovalRequest:
        current = await self._load(stored.request.approval_id)
        return (current or stored).request

    async def _decide_steps(
        self,
        ctx: common_pb2.ExecutionContext,
        steps: Sequence[common_pb2.PlanStep],
        sensitive_tools: set[str],
        requester: str,
        request_id: str,
        asked_by: str = "",
        supersedes: Mapping[str, str] | None = None,
    ) -> list[ApprovalRequest]:
        profile = ctx.profile or DEFAULT_PROFILE
        supersedes = supersedes or {}
        context = {
            "run_id": ctx.run_id,
            "profile": profile,
            "user_id": ctx.user_id,
            "trace_id": ctx.trace_id,
            "metadata": dict(ctx.metadata),
        }
        now = self._clock.now()
        results: list[ApprovalRequest] = []
        new: list[tuple[ApprovalRequest, str, str]] = []
        keys = [step_key(step.step_id, supersedes.get(step.step_id, "")) for step in steps]
        stored_before = await self._store.by_steps(ctx.run_id, keys)
        for step, key in zip(steps, keys, strict=True):
            previous = supersedes.get(step.step_id, "")
            existing = stored_before.get(key)
            if existing is not None:
                _check_same_step(step.tool, existing)
                results.append(await self._reload(existing))
                continue
            if previous:
                await self._check_supersedable(previous, ctx.run_id, step.step_id)
            decision = self._policy.decide(
                tool=step.tool,
                profile=profile,
                sensitive=step.tool in sensitive_tools,
                input=struct_to_dict(step.input),
                context=context,
            )
            rule = decision.rule
            out = ApprovalRequest(
                run_id=ctx.run_id,
                step_id=step.step_id,
                tool=step.tool,
                profile=profile,
                requester=requester or ctx.user_id,
                rule=rule.name if rule is not None else "",
                trace_id=ctx.trace_id,
                supersedes=previous,
            )
            out.input.CopyFrom(step.input)
            out.created_at.CopyFrom(timestamp(now))
            if not decision.required or rule is None:
                out.status = NOT_REQUIRED
                results.append(out)
                continue
            out.approval_id = f"apr_{uuid.uuid4().hex}"
            out.status = PENDING
            out.reviewer_group = rule.reviewer_group
            out.required_approvals = rule.approvers
            out.expires_at.CopyFrom(timestamp(now + rule.timeout_s))
            # The stored row keeps who asked, the request names the requester: SubmitDecision
            # refuses both (separation of duties).
            new.append((out, asked_by or ctx.user_id, request_id))
            results.append(out)
        if new:

            def check(new_request: ApprovalRequest, existing: StoredRequest) -> None:
                # Stored first by a concurrent call (maybe on another replica).
                if (existing.request.run_id, existing.request.step_id) == (
                    new_request.run_id,
                    new_request.step_id,
                ):
                    _check_same_step(new_request.tool, existing)
                else:
                    _check_request_id(request_id, new_request.run_id, new_request.step_id, existing)

            outcome = await self._store.insert(
                new, profile=profile, max_pending=self._max_pending, check=check
            )
            stored_first = {
                req.approval_id: other
                for (req, _, _), other in zip(new, outcome, strict=True)
                if other is not None
            }
            if stored_first:
                results = [
                    await self._reload(stored_first[r.approval_id])
                    if r.approval_id in stored_first
                    else r
                    for r in results
                ]
            created = [req for req, _, _ in new if req.approval_id not in stored_first]
            if not created:
                return results
            self._metrics.requested.add(len(created))
            self._pending = await self._store.count_all_pending()
            self._rearm.set()
            for req in created:
                log.info(
                    "approval requested: %s (run %s step %s tool %s, rule %s, %d approver(s)"
                    " until %s)",
                    req.approval_id,
                    req.run_id,
                    req.step_id,
                    req.tool,
                    req.rule,
                    req.required_approvals,
                    req.expires_at.ToJsonString(),
                )
        return results

    # ------------------------------------------------------------------ waiting

    async def await_decision(
        self, approval_id: str, *, timeout: float | None = None
    ) -> ApprovalRequest:
        """Wait until the request is decided or expires, or ``timeout`` seconds pass.

        Returns:
            The request: decided, EXPIRED, or still PENDING when the timeout came first.
        """
        check_id("approval_id", approval_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        self._waiter_counts[approval_id] = self._waiter_counts.get(approval_id, 0) + 1
        blocked = False
        try:
            # The event is registered before each read, not after it: a read is awaited
            # (on PostgreSQL the loop serves other calls meanwhile), and a decision
            # committed while it is in flight must still wake this waiter.
            event = self._waiters.setdefault(approval_id, asyncio.Event())
            stored = await self._load(approval_id)
            if stored is None:
                raise NotFoundError(f"approval {approval_id!r} not found")
            current = stored.request
            while current.status == PENDING and not self._closed:
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    break
                if self._recheck_s is not None:
                    wait = self._recheck_s if wait is None else min(wait, self._recheck_s)
                if not blocked:
                    blocked = True
                    self._waiting += 1
                    self._waiting_changed.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait)
                event = self._waiters.setdefault(approval_id, asyncio.Event())
                reloaded = await self._load(approval_id)
                if reloaded is None:
                    break
                current = reloaded.request
        finally:
            if blocked:
                self._waiting -= 1
            left = self._waiter_counts[approval_id] - 1
            if left:
                self._waiter_counts[approval_id] = left
            else:
                del self._waiter_counts[approval_id]
                self._waiters.pop(approval_id, None)
        return current

    # ------------------------------------------------------------------ decisions

    async def submit_decision(
        self,
        approval_id: str,
        verdict: int,
        reason: str,
        reviewer: Identity | None,
        *,
        request_id: str = "",
    ) -> ApprovalRequest:
        """Record one reviewer's verdict.

        Approved once ``required_approvals`` distinct reviewers approved; denied at the first
        denial. A refused decision changes nothing.

        Args:
            approval_id: the request.
            verdict: ``VERDICT_APPROVE`` or ``VERDICT_DENY``.
            reason: why (required to deny; at most 1024 characters).
            reviewer: the caller's authenticated identity (never a message field).
            request_id: idempotency key: the same reviewer repeating it gets the current
                request back instead of a refusal.

        Raises:
            UnauthenticatedError: no identity.
            PermissionDeniedError: no deciding role, wrong group, own request.
            NotFoundError: unknown request, or one of a profile the reviewer may not see.
            FailedPreconditionError: already decided or expired, or already approved by
                this reviewer (also when another replica decided it a moment earlier).
            AbortedError: the request kept changing under concurrent writers (retry).
        """
        if reviewer is None:
            raise UnauthenticatedError(
                "deciding an approval needs credentials (a bearer token)",
                reason="CREDENTIALS_REQUIRED",
            )
        check_request_id(request_id)
        check_id("approval_id", approval_id)
        if verdict not in (approval_pb2.VERDICT_APPROVE, approval_pb2.VERDICT_DENY):
            raise InvalidArgumentError("verdict", "must be VERDICT_APPROVE or VERDICT_DENY")
        check_length(
            "reason", reason, MAX_REASON_CHARS, required=verdict == approval_pb2.VERDICT_DENY
        )
        # Permission before existence: a caller who may decide nothing learns nothing.
        if not any(reviewer.has_role(role) for role in self._policy.deciding_roles):
            raise PermissionDeniedError(
                f"{reviewer.name!r} holds no reviewer role", reason="NOT_A_REVIEWER"
            )
        for _ in range(_MAX_ATTEMPTS):
            attempt = await self._try_decide(approval_id, verdict, reason, reviewer, request_id)
            if attempt is None:
                continue  # changed by another writer (another replica): decide again
            if isinstance(attempt, ApprovalRequest):
                return attempt
            updated, approvals = attempt
            break
        else:
            raise AbortedError(
                f"approval {approval_id!r} kept changing while deciding; retry",
                reason="CONCURRENT_DECISIONS",
            )
        log.info(
            "approval decided: %s %s by %s (%d/%d approvals) reason=%r",
            approval_id,
            approval_pb2.Verdict.Name(verdict).removeprefix("VERDICT_").lower(),
            reviewer.name,
            approvals,
            updated.required_approvals,
            reason,
        )
        if updated.status != PENDING:
            self._metrics.decided.add(1, {OUTCOME: status_name(updated.status)})
            self._pending = await self._store.count_all_pending()
            self._notify(approval_id)
        return updated

    async def _try_decide(
        self,
        approval_id: str,
        verdict: int,
        reason: str,
        reviewer: Identity,
        request_id: str,
    ) -> tuple[ApprovalRequest, int] | ApprovalRequest | None:
        """One attempt at recording a verdict against the request as stored now.

        Returns:
            ``(updated, approvals)`` when written; the current request for a repeated
            ``request_id``; None when another writer changed the request since it was
            read (the caller tries again against the new state).
        """
        if request_id:
            decided = await self._store.decision_key(request_id, reviewer.name)
            if decided is not None:
                if decided != approval_id:
                    raise AlreadyExistsError(
                        f"request_id {request_id!r} was used for another approval",
                        reason="REQUEST_ID_REUSED",
                    )
                repeat = await self._load(approval_id)
                if repeat is not None:
                    return repeat.request
        stored = await self._load(approval_id)
        if stored is None:
            raise NotFoundError(f"approval {approval_id!r} not found")
        request = stored.request
        if not reviewer.may_access_profile(request.profile):
            # Another profile's request does not exist for this reviewer: the same answer
            # as an unknown id, so nothing leaks across profiles.
            raise NotFoundError(f"approval {approval_id!r} not found")
        role = request.reviewer_group or "reviewer"
        if not reviewer.has_role(role):
            raise PermissionDeniedError(
                f"deciding approval {approval_id!r} needs role {role!r}", reason="WRONG_GROUP"
            )
        if reviewer.name in {request.requester, stored.user_id} - {""}:
            raise PermissionDeniedError(
                f"{reviewer.name!r} asked for this approval and cannot decide it",
                reason="SELF_APPROVAL",
            )
        if request.status != PENDING:
            raise FailedPreconditionError(
                f"approval {approval_id!r} is already {status_name(request.status)}",
                reason=f"ALREADY_{status_name(request.status)}",
            )
        if any(
            d.reviewer == reviewer.name and d.verdict == approval_pb2.VERDICT_APPROVE
            for d in request.decisions
        ):
            raise FailedPreconditionError(
                f"{reviewer.name!r} already approved {approval_id!r}; another reviewer must",
                reason="ALREADY_APPROVED_BY_REVIEWER",
            )
        now = self._clock.now()
        updated = ApprovalRequest()
        updated.CopyFrom(request)
        decision = updated.decisions.add(reviewer=reviewer.name, verdict=verdict, reason=reason)
        decision.decided_at.CopyFrom(timestamp(now))
        approvals = sum(1 for d in updated.decisions if d.verdict == approval_pb2.VERDICT_APPROVE)
        if verdict == approval_pb2.VERDICT_DENY:
            updated.status = DENIED
        elif approvals >= max(1, updated.required_approvals):
            updated.status = APPROVED
        if updated.status != PENDING:
            updated.decided_at.CopyFrom(timestamp(now))
        key = (request_id, reviewer.name) if request_id else None
        if await self._store.update(updated, version=stored.version, decision_key=key):
            return updated, approvals
        return None

    # ------------------------------------------------------------------ reads

    async def get_request(
        self, approval_id: str, *, viewer: Identity | None = None
    ) -> ApprovalRequest:
        """One request; a viewer restricted to other profiles gets NOT_FOUND."""
        check_id("approval_id", approval_id)
        stored = await self._load(approval_id)
        if stored is None or (
            viewer is not None and not viewer.may_access_profile(stored.request.profile)
        ):
            raise NotFoundError(f"approval {approval_id!r} not found")
        return stored.request

    async def list_pending(
        self,
        *,
        profile: str = "",
        page_size: int = 0,
        page_token: str = "",
        viewer: Identity | None = None,
    ) -> tuple[list[ApprovalRequest], str]:
        """PENDING requests, oldest first, one page at a time.

        Returns:
            The page and the token of the next one (empty on the last page).
        """
        check_id("profile", profile, required=False)
        size = effective_page_size("page_size", page_size, self._limits.max_page_size)
        after = _decode_position(page_token)
        profiles: tuple[str, ...] | None = None
        if viewer is not None and viewer.profiles:
            if profile and not viewer.may_access_profile(profile):
                raise PermissionDeniedError(
                    f"{viewer.name!r} may not see profile {profile!r}",
                    reason="PROFILE_NOT_ALLOWED",
                )
            profiles = (profile,) if profile else viewer.profiles
        elif profile:
            profiles = (profile,)
        await self._expire_due()
        page = await self._store.list_pending(profiles=profiles, after=after, limit=size + 1)
        token = ""
        if len(page) > size:
            page = page[:size]
            last = page[-1]
            token = encode_page_token(f"{seconds(last.created_at)!r}|{last.approval_id}")
        return page, token


def _check_same_step(tool: str, existing: StoredRequest) -> None:
    """A step asked about again must name the same tool."""
    if existing.request.tool != tool:
        raise AlreadyExistsError(
            f"step {existing.request.step_id!r} of run {existing.request.run_id!r} was asked"
            f" about tool {existing.request.tool!r}, not {tool!r}",
            reason="STEP_REUSED",
        )


def _check_request_id(request_id: str, run_id: str, step_id: str, existing: StoredRequest) -> None:
    """A RequestApproval request id names one step."""
    if (existing.request.run_id, existing.request.step_id) != (run_id, step_id):
        raise AlreadyExistsError(
            f"request_id {request_id!r} was used for another step", reason="REQUEST_ID_REUSED"
        )


def _decode_position(token: str) -> tuple[float, str] | None:
    position = decode_page_token("page_token", token)
    if not position:
        return None
    created, sep, approval_id = position.partition("|")
    try:
        value = float(created)
    except ValueError:
        value = float("nan")
    if not sep or not approval_id or value != value:
        raise InvalidArgumentError("page_token", "is not a token this service issued")
    return value, approval_id


__all__ = [
    "ApprovalManager",
    "ApprovalRequest",
    "ApprovalResponse",
    "status_name",
]
