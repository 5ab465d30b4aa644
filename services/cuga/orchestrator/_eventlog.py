"""A run's event log: numbering, storing (write-behind, group commit) and publishing.

Every event is written to the run store before anyone can see it: the run's stream and
``Watch`` subscribers, and the audit records that follow stored events (written to the
store's audit outbox in the event's own transaction, shipped by :mod:`._audit`).

Group commit that adapts to the store: deferred events (a step's ROUTE and successful
EXECUTE) are written at the next turn of the event loop while commits are cheap; when a
commit takes long (``sqlite.synchronous: full`` makes every commit an fsync, several ms
on a busy disk), they wait until :data:`GROUP_WAIT_FACTOR` times the last commit's time
has passed since it ended (at most :data:`MAX_GROUP_WAIT_S`), so a commit carries the
steps that ran meanwhile — a step that itself waits for an fsync (a worker's idempotency
record at ``full``) takes about as long as a commit, so one commit per step otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from cuga.common.v1 import common_pb2
from cuga.orchestrator._audit import audit_kind
from cuga.orchestrator._run import LiveRun
from cuga.orchestrator._runstore import RunStore, run_inline
from cuga.shared.clock import Clock
from cuga.shared.messages import timestamp

log = logging.getLogger("cuga.coordinator")

#: An event emitted, not yet stored, and its run.
_Pending: TypeAlias = tuple[LiveRun, common_pb2.OrchestrationEvent]
#: Called with each event once it is stored (in order).
OnStored = Callable[[LiveRun, common_pb2.OrchestrationEvent], None]
#: Longest a deferred event waits for others to share its commit, seconds.
MAX_GROUP_WAIT_S = 0.02
#: Pending events that are written at once, however recent the last commit.
MAX_GROUP_EVENTS = 256
#: A commit (its wall time, smoothed) faster than this is never waited for: the deferred
#: events are written at the next turn of the loop, each step in its own commit.
SLOW_COMMIT_S = 0.0003
#: While commits are slow, deferred events wait until this many times the last commit's
#: time has passed since it ended: the store then spends at most about a fifth of its
#: time committing.
GROUP_WAIT_FACTOR = 4


class EventLog:
    """Numbers, stores and publishes the events of every run of one engine.

    Args:
        store: the run store.
        clock: stamps the events.
        on_stored: called with each event once stored and published (wakes the audit
            forwarder).
        timer: measures how long commits take (the group commit's pacing; real time, not
            the engine's clock: it times the store's I/O). Tests pass their own.
    """

    def __init__(
        self,
        store: RunStore,
        clock: Clock,
        on_stored: OnStored,
        *,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._store = store
        self._timer = timer
        self._clock = clock
        self._on_stored = on_stored
        # Events assigned a seq but not yet stored, in order (see emit).
        self._outbox: list[_Pending] = []
        # The last write started on a store that suspends (each awaits the one before).
        self._writing: asyncio.Future[None] | None = None
        self._flush_scheduled: asyncio.Handle | None = None
        self._waiting = False  # the scheduled flush waits for others to join its commit
        self._commit_s = 0.0  # wall time of a commit, smoothed
        self._committed_at = 0.0  # perf_counter when the last commit ended
        self.commits = 0
        """Commits made (each one transaction of every event pending then)."""

    def emit(
        self,
        r: LiveRun,
        stage: int,
        *,
        step_id: str = "",
        step_result: common_pb2.StepResult | None = None,
        defer: bool = False,
        **payload: Any,
    ) -> common_pb2.OrchestrationEvent:
        """Number, store and publish an event: stored before anyone can see it.

        ``defer`` leaves the write pending: a step's ROUTE and its successful EXECUTE until
        the caller's :meth:`flush_soon` runs, once the next step's request is on its way
        to its worker, so the write (one transaction for every event pending then, of every
        run) happens while the worker runs it; INITIALIZE and AGGREGATE until the event
        right after them. Any other event is written at once, after those pending. A
        deferred event is published only once stored, like any other; a coordinator that
        dies before the flush has published none of them, and a resumed run sends the
        unrecorded steps again under their idempotency keys (the workers replay them, no
        tool runs twice).
        """
        r.seq += 1
        event = common_pb2.OrchestrationEvent(
            run_id=r.run_id,
            trace_id=r.run.trace_id,
            seq=r.seq,
            stage=stage,  # type: ignore[arg-type]
            timestamp=timestamp(self._clock.now()),
            step_id=step_id,
            **payload,
        )
        if step_result is not None:
            event.step_result.CopyFrom(step_result)
        self._outbox.append((r, event))
        if not defer:
            self.flush()
        return event

    def pending(self, r: LiveRun) -> bool:
        """Whether ``r`` has events not yet stored."""
        return any(p is r for p, _ in self._outbox)

    def flush_soon(self) -> None:
        """Write the pending events once the running callback yields to the loop, or —
        while commits are slow — once the last commit's time has passed since it ended
        (see the module's docstring), or at once when :data:`MAX_GROUP_EVENTS` wait."""
        if not self._outbox:
            return
        wait = 0.0
        if self._commit_s >= SLOW_COMMIT_S and len(self._outbox) < MAX_GROUP_EVENTS:
            since = self._timer() - self._committed_at
            wait = min(GROUP_WAIT_FACTOR * self._commit_s, MAX_GROUP_WAIT_S) - since
        if self._flush_scheduled is not None:
            if not self._waiting or wait > 0:
                return  # due at the next turn already, or still waiting for company
            self._flush_scheduled.cancel()  # the wait is over (time, or a full group)
        loop = asyncio.get_running_loop()
        self._waiting = wait > 0
        if self._waiting:
            self._flush_scheduled = loop.call_later(wait, self._flush_deferred)
        else:
            self._flush_scheduled = loop.call_soon(self._flush_deferred)

    def _flush_deferred(self) -> None:
        try:
            self.flush()
        except Exception:
            log.exception("run store refused a write; the runs it held stop")

    def flush(self) -> None:
        """Store every pending event in one transaction, then publish them in order.

        On an :attr:`~cuga.orchestrator.RunStore.inline` store (SQLite) the write happens
        here, synchronously; when the store refuses, the events are dropped unpublished,
        their runs stop (left RUNNING in the store: a restart marks them INTERRUPTED,
        resumable) and the error is raised. On a store that suspends (PostgreSQL) the
        write is awaited by a task of its own, after the writes started before it (the
        log's order), and the events are published once it is stored; a refused write
        stops its runs the same way (their tasks are cancelled, ``store_failed`` set) and
        drops their later pending writes. :meth:`written` waits for those writes.
        """
        if self._flush_scheduled is not None:
            self._flush_scheduled.cancel()  # this flush writes what it was for
            self._flush_scheduled = None
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        if not self._store.inline:
            previous = self._writing
            self._writing = asyncio.ensure_future(self._write_after(previous, batch))
            return
        try:
            self._write(batch, run_inline)
        except BaseException as exc:
            self._stop(batch, exc, asyncio.current_task())
            raise
        self._publish(batch)

    def _write(self, batch: list[_Pending], run: Callable[[Any], Any]) -> Any:
        """The store's call writing ``batch`` (its result through ``run``), timed."""
        writes = [(r.run, event) for r, event in batch]
        # The records these events owe the audit log go into its outbox in the same
        # transaction (issue 22 item 8): no kill can lose one.
        return run(
            self._timed(
                self._store.append_events(
                    writes, [w for w in writes if audit_kind(w[1]) is not None]
                )
            )
        )

    async def _timed(self, write: Awaitable[None]) -> None:
        started = self._timer()
        await write
        self._committed_at = self._timer()
        self._commit_s = (self._commit_s + self._committed_at - started) / 2
        self.commits += 1

    async def _write_after(
        self, previous: asyncio.Future[None] | None, batch: list[_Pending]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its outcome is its own runs' business
        # A run whose earlier write was refused has stopped: its later events are dropped
        # (stored, they would leave a gap in its log).
        batch = [(r, event) for r, event in batch if r.store_failed is None]
        if not batch:
            return
        try:
            await self._write(batch, lambda call: call)
        except Exception as exc:
            log.error("run store refused a write; the runs it held stop: %s", exc)
            self._stop(batch, exc, None)
            return
        self._publish(batch)

    async def written(self) -> None:
        """Return once every write started so far (:meth:`flush`) is stored or refused; at
        once on an inline store."""
        while self._writing is not None and not self._writing.done():
            await asyncio.wait([self._writing])

    @staticmethod
    def _stop(batch: list[_Pending], exc: BaseException, current: asyncio.Task[Any] | None) -> None:
        for r in dict.fromkeys(r for r, _ in batch):
            r.store_failed = exc
            if r.task is not None and r.task is not current and not r.task.done():
                r.task.cancel()

    def _publish(self, batch: list[_Pending]) -> None:
        for r, event in batch:
            for queue in r.subscribers:
                queue.put_nowait(event)
            self._on_stored(r, event)


__all__ = [
    "GROUP_WAIT_FACTOR",
    "MAX_GROUP_EVENTS",
    "MAX_GROUP_WAIT_S",
    "SLOW_COMMIT_S",
    "EventLog",
    "OnStored",
]
