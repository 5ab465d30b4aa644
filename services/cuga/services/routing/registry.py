"""The worker registry: who can run steps, where they listen, and whether they are alive.

Registrations are kept in memory and written through to a :class:`WorkerStore` (SQLite
under the data directory in the service) so a restarted routing service keeps its
workers. Heartbeats touch memory only: a write per heartbeat would cost far more than
the liveness it records, and liveness does not survive a restart anyway (loaded workers
count as last seen at load time, so they stay routable for one heartbeat timeout and then
depend on their own heartbeats, exactly like a fresh registration).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cuga.shared.clock import Clock
from cuga.shared.errors import NotFoundError, ResourceExhaustedError
from cuga.shared.sqlite import Transaction, open_sqlite

log = logging.getLogger("cuga.routing")


@dataclass(frozen=True)
class WorkerRecord:
    """A registered worker and what it last reported.

    Attributes:
        worker_id: unique id.
        address: host:port of its WorkerService.
        tools: tool names it runs (sorted, unique).
        capabilities: capabilities it offers (sorted, unique).
        labels: free-form labels.
        registered_at: epoch seconds of its first registration.
        last_seen: epoch seconds of its last heartbeat or registration.
        in_flight: calls in flight it last reported.
        recent_latency_s: recent step latency it last reported, seconds.
    """

    worker_id: str
    address: str
    tools: frozenset[str]
    capabilities: frozenset[str]
    labels: Mapping[str, str] = field(default_factory=dict)
    registered_at: float = 0.0
    last_seen: float = 0.0
    in_flight: int = 0
    recent_latency_s: float = 0.0


class WorkerStore(Protocol):
    """Durable registrations (not liveness)."""

    def load(self) -> list[WorkerRecord]:
        """Every stored registration."""
        ...

    def upsert(self, record: WorkerRecord) -> None:
        """Store or replace one registration."""
        ...

    def delete(self, worker_id: str) -> None:
        """Forget one registration (no error when absent)."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


class SQLiteWorkerStore:
    """Registrations in one SQLite file (``routing.db``)."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        self._conn = open_sqlite(path, synchronous=synchronous)
        with Transaction(self._conn) as conn:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS workers (
                    worker_id TEXT PRIMARY KEY,
                    address TEXT NOT NULL,
                    tools TEXT NOT NULL,
                    capabilities TEXT NOT NULL,
                    labels TEXT NOT NULL,
                    registered_at REAL NOT NULL
                )"""
            )

    def load(self) -> list[WorkerRecord]:
        """Every stored registration, liveness fields zeroed."""
        rows = self._conn.execute(
            "SELECT worker_id, address, tools, capabilities, labels, registered_at"
            " FROM workers ORDER BY worker_id"
        ).fetchall()
        return [
            WorkerRecord(
                worker_id=row["worker_id"],
                address=row["address"],
                tools=frozenset(json.loads(row["tools"])),
                capabilities=frozenset(json.loads(row["capabilities"])),
                labels=dict(json.loads(row["labels"])),
                registered_at=float(row["registered_at"]),
            )
            for row in rows
        ]

    def upsert(self, record: WorkerRecord) -> None:
        """Store or replace one registration in one transaction."""
        with Transaction(self._conn) as conn:
            conn.execute(
                """INSERT INTO workers
                     (worker_id, address, tools, capabilities, labels, registered_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(worker_id) DO UPDATE SET
                     address = excluded.address, tools = excluded.tools,
                     capabilities = excluded.capabilities, labels = excluded.labels""",
                (
                    record.worker_id,
                    record.address,
                    json.dumps(sorted(record.tools)),
                    json.dumps(sorted(record.capabilities)),
                    json.dumps(dict(record.labels), sort_keys=True),
                    record.registered_at,
                ),
            )

    def delete(self, worker_id: str) -> None:
        """Forget one registration."""
        with Transaction(self._conn) as conn:
            conn.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def close(self) -> None:
        """Close the connection."""
        try:
            self._conn.close()
        except sqlite3.Error:  # closing twice or after a failed open is harmless
            log.debug("routing store already closed")


class WorkerRegistry:
    """Registered workers with their liveness, read through an injected clock.

    A worker is *available* while ``now - last_seen <= heartbeat_timeout_s``; after that it
    is unavailable (kept, listed, never routed to) until its next heartbeat or
    registration. Mutations are serialised by one lock so a store write and the matching
    memory update are never interleaved with another mutation of the same worker.

    Args:
        clock: the time source.
        heartbeat_timeout_s: seconds without a heartbeat after which a worker is
            unavailable.
        max_workers: most registered workers; a new id beyond it is RESOURCE_EXHAUSTED.
        store: durable registrations; ``None`` keeps them in memory only.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        heartbeat_timeout_s: float = 6.0,
        max_workers: int = 10_000,
        store: WorkerStore | None = None,
    ) -> None:
        self._clock = clock
        self._timeout = heartbeat_timeout_s
        self._max_workers = max_workers
        self._store = store
        self._lock = asyncio.Lock()
        self._workers: dict[str, WorkerRecord] = {}
        self._ids: list[str] = []  # sorted, for paging
        if store is not None:
            now = clock.now()
            for record in store.load():
                self._put(replace(record, last_seen=now))
            if self._workers:
                log.info("loaded %d registered worker(s)", len(self._workers))

    @property
    def heartbeat_timeout_s(self) -> float:
        """Seconds without a heartbeat after which a worker is unavailable."""
        return self._timeout

    def now(self) -> float:
        """The registry's current time (epoch seconds)."""
        return self._clock.now()

    def is_available(self, record: WorkerRecord, now: float | None = None) -> bool:
        """Whether ``record`` has been seen within the heartbeat timeout."""
        now = self._clock.now() if now is None else now
        return now - record.last_seen <= self._timeout

    def get(self, worker_id: str) -> WorkerRecord | None:
        """One worker, or ``None``."""
        return self._workers.get(worker_id)

    def __len__(self) -> int:
        return len(self._workers)

    def workers(self) -> list[WorkerRecord]:
        """Every registered worker, ordered by id."""
        return [self._workers[i] for i in self._ids]

    def page(
        self, *, after: str = "", limit: int = 100, tool: str = ""
    ) -> tuple[list[WorkerRecord], bool]:
        """Workers with id > ``after`` (offering ``tool`` when set), and whether more follow."""
        start = bisect.bisect_right(self._ids, after) if after else 0
        out: list[WorkerRecord] = []
        for worker_id in self._ids[start:]:
            record = self._workers[worker_id]
            if tool and tool not in record.tools:
                continue
            if len(out) == limit:
                return out, True
            out.append(record)
        return out, False

    async def register(
        self,
        worker_id: str,
        address: str,
        tools: Iterable[str],
        capabilities: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
    ) -> WorkerRecord:
        """Register or re-register a worker (idempotent by id).

        Re-registering keeps ``registered_at`` and the last reported load, replaces address,
        tools, capabilities and labels, and makes the worker available again.
        """
        async with self._lock:
            now = self._clock.now()
            old = self._workers.get(worker_id)
            if old is None and len(self._workers) >= self._max_workers:
                raise ResourceExhaustedError(
                    f"the registry holds {len(self._workers)} workers, the limit is "
                    f"{self._max_workers}; deregister stopped workers first",
                    reason="TOO_MANY_WORKERS",
                )
            record = WorkerRecord(
                worker_id=worker_id,
                address=address,
                tools=frozenset(tools),
                capabilities=frozenset(capabilities),
                labels=dict(labels or {}),
                registered_at=old.registered_at if old else now,
                last_seen=now,
                in_flight=old.in_flight if old else 0,
                recent_latency_s=old.recent_latency_s if old else 0.0,
            )
            changed = old is None or _registration(old) != _registration(record)
            if changed and self._store is not None:
                # Write first: a failed write leaves memory as it was (no half-registration).
                await asyncio.to_thread(self._store.upsert, record)
            self._put(record)
            if old is None:
                log.info("worker %s registered at %s", worker_id, address)
            elif changed:
                log.info("worker %s re-registered at %s", worker_id, address)
            return record

    def heartbeat(self, worker_id: str, in_flight: int, recent_latency_s: float) -> WorkerRecord:
        """Record a worker's load and mark it seen now (memory only).

        Raises:
            NotFoundError: the id is not registered; the worker should register again.
        """
        old = self._workers.get(worker_id)
        if old is None:
            raise NotFoundError(
                f"worker {worker_id!r} is not registered; register it again",
                reason="WORKER_NOT_REGISTERED",
            )
        if not self.is_available(old):
            log.info("worker %s is available again", worker_id)
        record = replace(
            old,
            last_seen=self._clock.now(),
            in_flight=in_flight,
            recent_latency_s=recent_latency_s,
        )
        self._workers[worker_id] = record
        return record

    async def deregister(self, worker_id: str) -> bool:
        """Remove a worker; ``False`` when it was not registered."""
        async with self._lock:
            if worker_id not in self._workers:
                return False
            if self._store is not None:
                await asyncio.to_thread(self._store.delete, worker_id)
            del self._workers[worker_id]
            self._ids.remove(worker_id)
            log.info("worker %s deregistered", worker_id)
            return True

    def _put(self, record: WorkerRecord) -> None:
        if record.worker_id not in self._workers:
            bisect.insort(self._ids, record.worker_id)
        self._workers[record.worker_id] = record


def _registration(record: WorkerRecord) -> tuple[object, ...]:
    return (
        record.address,
        record.tools,
        record.capabilities,
        tuple(sorted(record.labels.items())),
    )


__all__ = ["SQLiteWorkerStore", "WorkerRecord", "WorkerRegistry", "WorkerStore"]
