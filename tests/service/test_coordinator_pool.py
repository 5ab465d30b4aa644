"""The coordinator keeps answering while its PostgreSQL run store is slow (issue 25).

The coordinator runs through the production bootstrap on a PostgreSQL run store reached
through :class:`~tests.support.pgproxy.HoldingProxy`. While one GetRun's query is held,
health is answered and a GetRun of another run is served on another connection of the
run store's pool (before, every run store call ran synchronously on the event loop, over
one connection: the whole coordinator waited for the held query). The pool is bounded
(``coordinator.pool.max_size``): calls beyond it wait for a connection, or fail
RESOURCE_EXHAUSTED after ``coordinator.pool.timeout_s`` naming both keys.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from grpc_health.v1 import health_pb2

from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import PostgresRunStore
from cuga.shared.errors import ResourceExhaustedError
from cuga.shared.messages import timestamp
from cuga.shared.sqldb import PoolConfig
from tests.service.test_postgres_pool import assert_still_held, health, proxy  # noqa: F401
from tests.support.pgproxy import HoldingProxy
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import as_identity, builders, make_settings, running_service

pytestmark = pytest.mark.timeout(90)

RUNS = ("run-a", "run-b")


async def _seed(dsn: str) -> None:
    """Two finished runs in the shared store (its tables made by a replica's start),
    written directly (not through the proxy)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for run_id in RUNS:
            run = coordinator_pb2.Run(
                run_id=run_id,
                trace_id="a" * 32,
                goal=f"goal of {run_id}",
                context=common_pb2.ExecutionContext(run_id=run_id, profile="default"),
                state=coordinator_pb2.RUN_STATE_COMPLETED,
                created_at=timestamp(1_700_000_000.0),
            )
            await conn.execute(
                "INSERT INTO runs (run_id, profile, state, created_ns, run, request, owner)"
                " VALUES (%s, 'default', %s, 1, %s, %s, 'gone')",
                (
                    run_id,
                    run.state,
                    run.SerializeToString(),
                    coordinator_pb2.OrchestrateRequest(goal=run.goal).SerializeToString(),
                ),
            )


async def test_the_coordinator_answers_while_a_run_store_query_is_held(
    proxy: HoldingProxy,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {
        "CUGA_COORDINATOR__RUN_STORE": "postgres",
        "CUGA_COORDINATOR__DSN": proxy.dsn(postgres_dsn),
        "CUGA_COORDINATOR__ADOPT_INTERVAL_S": "0",  # no background queries meanwhile
    }
    settings = make_settings(tmp_path, env)
    async with running_service("coordinator", builders()["coordinator"], settings) as server:
        client = CoordinatorClient(server.address, metadata=as_identity("client"))
        await _seed(postgres_dsn)
        try:

            async def get(run_id: str) -> coordinator_pb2.Run:
                got = await client.get_run(coordinator_pb2.GetRunRequest(run_id=run_id), timeout=60)
                return got.run

            assert (await get("run-a")).goal == "goal of run-a"  # started, and served
            proxy.hold(connections=1)
            held = asyncio.ensure_future(get("run-a"))
            await proxy.until_held(1)
            assert await health(server.address) == health_pb2.HealthCheckResponse.SERVING
            assert_still_held(proxy, "a health check")
            # Another run, read on another connection of the pool meanwhile.
            assert (await get("run-b")).goal == "goal of run-b"
            assert_still_held(proxy, "a GetRun of another run")
            assert not held.done()
            proxy.release()
            assert (await asyncio.wait_for(held, 30)).goal == "goal of run-a"
        finally:
            await client.close()


async def test_run_store_calls_beyond_the_pool_wait_or_are_refused(
    proxy: HoldingProxy,  # noqa: F811
    postgres_dsn: str,  # noqa: F811
) -> None:
    bounded = PoolConfig(min_size=1, max_size=2, timeout_s=60)
    store = await PostgresRunStore.connect(proxy.dsn(postgres_dsn), pool=bounded)
    await _seed(postgres_dsn)
    try:
        proxy.hold()
        calls = [asyncio.ensure_future(store.get_run(RUNS[i % 2])) for i in range(5)]
        await proxy.until_held(2)  # both connections of the pool are taken
        await asyncio.wait_for(store.pool.until_callers(5), 30)
        stats = store.pool.stats()
        assert stats["pool_size"] == 2, stats
        assert stats["requests_waiting"] == 3, stats
        assert_still_held(proxy, "the pool's state")
        proxy.release()
        runs = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert [r.run_id for r in runs if r is not None] == [RUNS[i % 2] for i in range(5)]
        assert store.pool.stats()["pool_size"] <= 2
    finally:
        proxy.release()
        await store.close()

    one = PoolConfig(min_size=1, max_size=1, timeout_s=0.2)
    store = await PostgresRunStore.connect(proxy.dsn(postgres_dsn), pool=one)
    try:
        proxy.hold()
        first = asyncio.ensure_future(store.get_run("run-a"))
        await proxy.until_held(1)  # the one connection waits for the database
        with pytest.raises(ResourceExhaustedError) as refused:
            await store.get_run("run-b")
        assert refused.value.reason == "DATABASE_POOL_EXHAUSTED"
        assert "coordinator.pool.max_size 1" in str(refused.value), refused.value
        assert "coordinator.pool.timeout_s 0.2" in str(refused.value), refused.value
        assert_still_held(proxy, "the refusal")
        proxy.release()
        assert (await asyncio.wait_for(first, 30)) is not None
        assert await store.get_run("run-b") is not None  # the connection is back
    finally:
        proxy.release()
        await store.close()
