"""Refusals counted per key and interval (cuga.shared.denials), on a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from cuga.audit.v1 import audit_pb2
from cuga.shared.auth import Denial, Identity
from cuga.shared.clock import FakeClock
from cuga.shared.denials import DenialCounter
from cuga.shared.errors import PermissionDeniedError, UnauthenticatedError


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[audit_pb2.AuditRecord]] = []
        self.wrote = asyncio.Event()

    async def __call__(self, records: Sequence[audit_pb2.AuditRecord]) -> None:
        self.batches.append(list(records))
        self.wrote.set()


def _denial(who: str | None = None, method: str = "/s.S/M", peer: str = "ipv4:1") -> Denial:
    identity = Identity(who, ("client",)) if who else None
    error = (
        PermissionDeniedError("no", reason="ROLE_NOT_ALLOWED")
        if who
        else UnauthenticatedError("who?", reason="CREDENTIALS_REQUIRED")
    )
    return Denial(method, identity, error, peer)


async def test_refusals_are_written_once_per_key_and_interval() -> None:
    clock, sink = FakeClock(), Sink()
    counter = DenialCounter("routing", sink, interval_s=10, clock=clock)
    for i in range(500):
        await counter(_denial(peer=f"ipv4:{i % 7}"))
    await counter(_denial("mallory"))
    await counter(_denial("mallory", "/s.S/Other"))
    assert not sink.batches  # nothing written before the interval ends
    await asyncio.wait_for(clock.until_sleepers(1), 5)  # the interval's timer is running
    clock.advance(10)
    await asyncio.wait_for(sink.wrote.wait(), 5)
    (batch,) = sink.batches
    by_key = {(r.actor, r.payload["method"]): r for r in batch}
    assert len(batch) == 3 and len({r.trace_id for r in batch}) == 1
    anonymous = by_key["anonymous", "/s.S/M"]
    assert anonymous.payload["count"] == 500 and anonymous.payload["code"] == "UNAUTHENTICATED"
    assert len(anonymous.payload["peers"]) == 5  # a few peers, not all of them
    assert by_key["mallory", "/s.S/Other"].payload["roles"] == ["client"]
    assert counter.refused == 502
    # The next interval starts empty, and its records go to a trace of their own.
    sink.wrote.clear()
    await counter(_denial())
    await asyncio.wait_for(clock.until_sleepers(1), 5)
    clock.advance(10)
    await asyncio.wait_for(sink.wrote.wait(), 5)
    assert [r.payload["count"] for r in sink.batches[1]] == [1]
    assert sink.batches[1][0].trace_id != batch[0].trace_id
    await counter.close()


async def test_distinct_keys_are_bounded_and_close_writes_the_rest() -> None:
    sink = Sink()
    counter = DenialCounter("audit", sink, interval_s=3600, clock=FakeClock(), max_keys=3)
    for i in range(10):
        await counter(_denial(f"user-{i}"))
    await counter.close()
    (batch,) = sink.batches
    assert len(batch) == 4  # three keys and one for the rest
    others = next(r for r in batch if r.actor == "(others)")
    assert others.payload["count"] == 7
