"""PostgreSQL services keep answering while the database is slow (issue 25).

The approval service runs through the production bootstrap on PostgreSQL reached through
:class:`~tests.support.pgproxy.HoldingProxy`, which holds what the service sends to the
database for as long as the test likes. While one call's query is held:

* the same service keeps answering: health, a call refused before any query, and (with
  a pool of several connections) calls on other connections once the hold ends;
* with the pool at its bound (``approval.pool.max_size``), one more call waits for a
  connection and gets it when one is given back, or fails RESOURCE_EXHAUSTED after
  ``approval.pool.timeout_s`` naming the key.

The audit service (synchronous backends on worker threads, :mod:`cuga.services.audit.backend`)
draws a connection per call from its pool too: while one connection's query is held,
another call of the replica is answered on another connection. Planning, on the same
asynchronous pool as approval, answers health while a GetPlan's query is held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient, PlanningClient
from cuga.planning.v1 import planning_pb2
from cuga.services.audit.app import build as build_audit
from cuga.services.planning.app import build as build_planning
from cuga.shared.clock import FakeClock
from cuga.shared.config import Settings
from cuga.shared.errors import NotFoundError, ResourceExhaustedError, UnauthenticatedError
from tests.service.test_approval_service import Harness, approval_settings, request, start
from tests.support.pgproxy import HoldingProxy
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import as_identity, make_settings, running_service

pytestmark = pytest.mark.timeout(90)

#: A hold ends by itself after this long: on code that blocks the event loop, the test's
#: own checks can run only then, and fail.
MAX_HOLD_S = 5.0


@pytest.fixture
def proxy(postgres_dsn: str) -> Iterator[HoldingProxy]:  # noqa: F811
    parts = dict(p.split("=", 1) for p in postgres_dsn.split())
    with HoldingProxy(parts["host"], int(parts["port"]), max_hold_s=MAX_HOLD_S) as running:
        yield running


@asynccontextmanager
async def approval_via(
    proxy: HoldingProxy, dsn: str, settings: Settings, tmp_path: Path, **pool: Any
) -> AsyncIterator[Harness]:
    config = approval_settings(
        settings,
        tmp_path,
        store="postgres",
        dsn=proxy.dsn(dsn),
        recheck_s=300,
        **({"pool": pool} if pool else {}),
    )
    async with asynccontextmanager(start)(config, FakeClock()) as harness:
        yield harness


async def health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(resp.status)


def get(h: Harness, approval_id: str, who: str = "rita") -> asyncio.Future[Any]:
    return asyncio.ensure_future(
        h[who].get_request(approval_pb2.GetRequestRequest(approval_id=approval_id), timeout=60)
    )


def assert_still_held(proxy: HoldingProxy, what: str) -> None:
    assert not proxy.auto_released and proxy.holding, (
        f"{what} was answered only after the database traffic was let through"
        f" ({MAX_HOLD_S:g} s hold ended by itself): it waited for the held query (the"
        " service's event loop, or its one connection, was blocked meanwhile)"
    )


async def test_the_service_answers_while_a_query_is_held(
    proxy: HoldingProxy,
    postgres_dsn: str,  # noqa: F811
    settings: Settings,
    tmp_path: Path,
) -> None:
    async with approval_via(proxy, postgres_dsn, settings, tmp_path) as h:
        req = await request(h, request_id="k1")
        proxy.hold()
        held = get(h, req.approval_id)
        await proxy.until_held(1)
        # Health: answered at once, the query still waiting.
        assert await health(h.server.address) == health_pb2.HealthCheckResponse.SERVING
        assert_still_held(proxy, "a health check")
        # A call refused before any query (no credentials) is answered too.
        with pytest.raises(UnauthenticatedError):
            await h["anonymous"].get_request(
                approval_pb2.GetRequestRequest(approval_id=req.approval_id), timeout=5
            )
        assert_still_held(proxy, "a refused call")
        assert not held.done()
        proxy.release()
        assert (await asyncio.wait_for(held, 30)).request == req


async def test_calls_beyond_the_pool_wait_for_a_connection(
    proxy: HoldingProxy,
    postgres_dsn: str,  # noqa: F811
    settings: Settings,
    tmp_path: Path,
) -> None:
    async with approval_via(
        proxy, postgres_dsn, settings, tmp_path, min_size=1, max_size=2, timeout_s=60
    ) as h:
        req = await request(h, request_id="k1")
        pool = h.manager.store.pool  # type: ignore[attr-defined]
        proxy.hold()
        calls = [
            get(h, req.approval_id, who) for who in ("rita", "rob", "fiona", "ursula", "coord")
        ]
        await proxy.until_held(2)  # both connections of the pool are taken
        await asyncio.wait_for(pool.until_callers(5), 30)
        # (The service's expiry sweep may be one of the callers.) At most two hold a
        # connection; every other one waits for a connection to be given back.
        stats = pool.stats()
        assert stats["pool_size"] == 2, stats
        assert stats["requests_waiting"] >= pool.callers - 2 >= 3, (stats, pool.callers)
        assert_still_held(proxy, "the pool's state")
        proxy.release()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert [a.request for a in answers] == [req] * 5
        assert pool.stats()["pool_size"] <= 2


async def test_a_call_that_waits_longer_than_the_pool_timeout_is_refused(
    proxy: HoldingProxy,
    postgres_dsn: str,  # noqa: F811
    settings: Settings,
    tmp_path: Path,
) -> None:
    async with approval_via(
        proxy, postgres_dsn, settings, tmp_path, min_size=1, max_size=1, timeout_s=0.2
    ) as h:
        req = await request(h, request_id="k1")
        proxy.hold()
        first = get(h, req.approval_id)
        await proxy.until_held(1)  # the one connection waits for the database
        with pytest.raises(ResourceExhaustedError) as refused:
            await h["rob"].get_request(
                approval_pb2.GetRequestRequest(approval_id=req.approval_id), timeout=30
            )
        assert refused.value.reason == "DATABASE_POOL_EXHAUSTED"
        assert "approval.pool.max_size 1" in str(refused.value), refused.value
        assert "approval.pool.timeout_s 0.2" in str(refused.value), refused.value
        assert_still_held(proxy, "the refusal")
        proxy.release()
        # `first` held the connection, or (if the service's expiry sweep took it first)
        # waited behind it and was refused the same way.
        (outcome,) = await asyncio.wait_for(asyncio.gather(first, return_exceptions=True), 30)
        if isinstance(outcome, ResourceExhaustedError):
            assert outcome.reason == "DATABASE_POOL_EXHAUSTED"
        else:
            assert not isinstance(outcome, BaseException), outcome
            assert outcome.request == req, outcome
        # The connection is back: the next call is served.
        again = await h["rob"].get_request(
            approval_pb2.GetRequestRequest(approval_id=req.approval_id), timeout=30
        )
        assert again.request == req


async def test_audit_answers_on_another_connection_while_one_query_is_held(
    proxy: HoldingProxy,
    postgres_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {
        "CUGA_AUDIT__BACKEND": "postgres",
        "CUGA_AUDIT__DSN": proxy.dsn(postgres_dsn),
        "CUGA_AUDIT__POOL__MAX_SIZE": "4",
    }
    async with running_service("audit", build_audit, make_settings(tmp_path, env)) as server:
        client = AuditClient(server.address, metadata=as_identity("tester"))
        try:
            record = audit_pb2.AuditRecord(
                record_id="r1", trace_id="c" * 32, run_id="run-1", kind="plan", actor="coordinator"
            )
            await client.record(audit_pb2.RecordRequest(record=record), timeout=30)
            proxy.hold(connections=1)
            held = asyncio.ensure_future(client.query(audit_pb2.QueryRequest(), timeout=60))
            await proxy.until_held(1)
            other = await client.query(audit_pb2.QueryRequest(), timeout=30)
            assert [r.record_id for r in other.records] == ["tester/r1"]
            assert_still_held(proxy, "a second query")
            assert await health(server.address) == health_pb2.HealthCheckResponse.SERVING
            assert not held.done()
            proxy.release()
            assert [r.record_id for r in (await asyncio.wait_for(held, 30)).records] == [
                "tester/r1"
            ]
        finally:
            await client.close()


async def test_planning_answers_health_while_a_query_is_held(
    proxy: HoldingProxy,
    postgres_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {"CUGA_PLANNING__STORE": "postgres", "CUGA_PLANNING__DSN": proxy.dsn(postgres_dsn)}
    async with running_service("planning", build_planning, make_settings(tmp_path, env)) as server:
        client = PlanningClient(server.address, metadata=as_identity("coordinator"))
        try:
            proxy.hold()
            held = asyncio.ensure_future(
                client.get_plan(planning_pb2.GetPlanRequest(plan_id="p-1"), timeout=60)
            )
            await proxy.until_held(1)
            assert await health(server.address) == health_pb2.HealthCheckResponse.SERVING
            assert_still_held(proxy, "a health check")
            assert not held.done()
            proxy.release()
            with pytest.raises(NotFoundError):
                await asyncio.wait_for(held, 30)
        finally:
            await client.close()
