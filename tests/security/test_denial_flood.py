"""Refused calls cannot flood the audit log or write into a chosen trace (issue 20, item 5).

The attack, before: 1,001 unauthenticated calls made 1,001 ``access_denied`` records in two
seconds, and a ``traceparent`` header put them into a run's trace of the caller's choice.
Now refusals are counted per (caller, method, code, reason) over ``auth.denial_interval_s``
and each key becomes one record carrying the count, in a trace the server makes up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.shared.errors import NotFoundError
from tests.support.servers import Cluster, as_identity, make_settings, running_cluster

#: The trace an attacker picks (a run's, say) and names in its W3C traceparent.
CHOSEN = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = (("traceparent", f"00-{CHOSEN}-00f067aa0ba902b7-01"),)
FLOOD = 1001


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


async def _flood(address: str, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        async def one() -> None:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"", timeout=10, metadata=metadata)
            assert refused.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )

        for start in range(0, FLOOD, 100):
            await asyncio.gather(*(one() for _ in range(min(100, FLOOD - start))))


async def _denials(cluster: Cluster) -> list[audit_pb2.AuditRecord]:
    for server in cluster.servers.values():
        assert await server.flush_denials(timeout=10)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        page = await audit.query(
            audit_pb2.QueryRequest(
                filter=audit_pb2.RecordFilter(kinds=["access_denied"]), page_size=1000
            )
        )
    return list(page.records)


@pytest.mark.parametrize(
    ("service", "method", "who"),
    [
        # No credentials at all, at a service that sends its refusals to audit...
        ("routing", "/cuga.routing.v1.RoutingService/ListWorkers", ()),
        # ...and at the audit service itself (written locally), with a role it lacks.
        ("audit", "/cuga.audit.v1.AuditService/Query", as_identity("client")),
    ],
)
async def test_a_flood_of_refusals_is_counted_not_recorded_one_by_one(
    cluster: Cluster, service: str, method: str, who: tuple[tuple[str, str], ...]
) -> None:
    await _flood(cluster.address(service), method, who + TRACEPARENT)
    records = [r for r in await _denials(cluster) if r.payload["method"] == method]
    # One record per key and interval: the whole flood fits in an interval or two here.
    assert 1 <= len(records) <= 3, f"{len(records)} records for {FLOOD} refusals"
    assert sum(int(r.payload["count"]) for r in records) == FLOOD
    record = records[0]
    assert record.payload["service"] == service
    assert record.actor == ("client" if who else "anonymous")
    assert record.payload["peer"] and 1 <= len(record.payload["peers"]) <= 5
    assert record.payload["first_at"] <= record.payload["last_at"]
    # Never in the caller's trace.
    assert all(r.trace_id != CHOSEN for r in records)
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        chosen = await audit.query(
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=CHOSEN))
        )
        assert not chosen.records
        with pytest.raises(NotFoundError):
            await audit.verify(audit_pb2.VerifyRequest(trace_id=CHOSEN))
