"""Refused calls as audit records: counted per caller, RPC and interval, never per call.

Every refusal (no or bad credentials, a role the matrix does not allow, a step without a
grant) is counted under ``(caller, method, code, reason)``. Once per
``auth.denial_interval_s`` each key seen becomes one ``access_denied`` record carrying the
count, the first and last time and a few of the peers, so a flood of refused calls costs the
audit log a handful of records, whatever its rate. The records of one interval go into a
trace the server makes up for them: never the trace of a refused call, which its caller
chose (``traceparent``).

The audit service writes its own refusals straight into its log; every other service
sends them through its own buffered trail, with its own credentials (so audit being down
never turns a refusal into another error, and a refusal never waits on audit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.shared.auth import Denial
from cuga.shared.clock import Clock, SystemClock

log = logging.getLogger("cuga.auth")

RecordWriter = Callable[[Sequence[audit_pb2.AuditRecord]], Awaitable[None]]
#: Distinct keys counted per interval; refusals past it are counted under one key.
MAX_KEYS = 1000
#: Peers named per key and interval.
MAX_PEERS = 5
OVERFLOW = ("(others)", "*", "*", "*")


@dataclass
class _Count:
    count: int
    first: float
    last: float
    roles: tuple[str, ...]
    peers: list[str] = field(default_factory=list)


class DenialCounter:
    """A :data:`~cuga.shared.auth.DenialSink` that counts refusals and writes them in bulk.

    Args:
        service: the refusing service's name (in every record).
        write: stores a list of records (the audit log, or a buffered trail to it).
        interval_s: how long refusals are counted before they are written.
        clock: wall time and the interval's sleep.
        max_keys: distinct (caller, method, code, reason) keys per interval.
    """

    def __init__(
        self,
        service: str,
        write: RecordWriter,
        *,
        interval_s: float = 10.0,
        clock: Clock | None = None,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._service = service
        self._write = write
        self._interval = interval_s
        self._clock: Clock = clock or SystemClock()
        self._max_keys = max_keys
        self._counts: dict[tuple[str, str, str, str], _Count] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.refused = 0
        """Refusals counted since start."""

    async def __call__(self, denial: Denial) -> None:
        actor = denial.identity.name if denial.identity is not None else "anonymous"
        key = (actor, denial.method, denial.error.code.name, denial.error.reason)
        now = self._clock.now()
        entry = self._counts.get(key)
        if entry is None:
            if len(self._counts) >= self._max_keys:
                key = OVERFLOW
                entry = self._counts.get(key)
            if entry is None:
                roles = denial.identity.roles if denial.identity is not None else ()
                entry = self._counts[key] = _Count(0, now, now, tuple(roles))
        entry.count += 1
        entry.last = now
        peer = denial.peer[:256]
        if peer and peer not in entry.peers and len(entry.peers) < MAX_PEERS:
            entry.peers.append(peer)
        self.refused += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"{self._service}-denials")

    async def _run(self) -> None:
        while True:
            await self._clock.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # retried with the next interval's counts
                log.exception("could not record refused calls")

    def records(self) -> list[audit_pb2.AuditRecord]:
        """Take the counts so far as ``access_denied`` records (one new trace for all)."""
        counts, self._counts = self._counts, {}
        trace_id = uuid.uuid4().hex
        out = []
        for (actor, method, code, reason), entry in counts.items():
            record = audit_pb2.AuditRecord(
                record_id=f"denied-{uuid.uuid4().hex}",
                trace_id=trace_id,
                kind="access_denied",
                actor=actor[:256],
            )
            record.timestamp.FromNanoseconds(int(entry.last * 1e9))
            payload: dict[str, Any] = {
                "service": self._service,
                "method": method,
                "code": code,
                "reason": reason,
                "roles": list(entry.roles),
                "count": entry.count,
                "first_at": _rfc3339(entry.first),
                "last_at": _rfc3339(entry.last),
                "peers": entry.peers,
                "peer": entry.peers[0] if entry.peers else "",
            }
            record.payload.update(payload)
            out.append(record)
        return out

    async def flush(self) -> None:
        """Write the counts so far (nothing when there are none)."""
        async with self._lock:
            records = self.records()
            if not records:
                return
            summary = [
                f"{r.actor} {r.payload['method']} {r.payload['code']} x{r.payload['count']:g}"
                for r in records[:5]
            ]
            log.warning(
                "%s refused calls: %s%s",
                self._service,
                "; ".join(summary),
                " ..." if len(records) > 5 else "",
            )
            await self._write(records)

    async def close(self) -> None:
        """Stop counting in the background and write what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception:
            log.exception("could not record refused calls at shutdown")


def _rfc3339(seconds: float) -> str:
    stamp = audit_pb2.AuditRecord().timestamp
    stamp.FromNanoseconds(int(seconds * 1e9))
    return str(stamp.ToJsonString())


class RemoteDenials:
    """A service's refusals, counted and sent to the audit service through a buffered trail
    (opened once the server is bound, so its spill directory can name the port)."""

    def __init__(self, service: str, *, interval_s: float, clock: Clock | None = None) -> None:
        self._service = service
        self._trail: Any = None
        self.counter = DenialCounter(service, self._send, interval_s=interval_s, clock=clock)

    def open(self, client: Any, spill_dir: Path) -> None:
        """Send through ``client`` (an ``AuditClient``), spilling under ``spill_dir``."""
        # The client package depends on this one; import it only where it is used.
        from cuga.client.audit_buffer import BufferedAuditTrail

        self._trail = BufferedAuditTrail(client, spill_dir=spill_dir)

    async def _send(self, records: Sequence[audit_pb2.AuditRecord]) -> None:
        if self._trail is not None:
            await self._trail.record_batch(list(records))

    async def flush(self, timeout: float | None = None) -> bool:
        """Write the counts so far and wait until the audit service has them."""
        await self.counter.flush()
        return True if self._trail is None else bool(await self._trail.flush(timeout))

    async def close(self) -> None:
        """Write what is left and close the trail."""
        await self.counter.close()
        if self._trail is not None:
            await self._trail.close(timeout=1.0)


__all__ = ["DenialCounter", "RecordWriter", "RemoteDenials"]
