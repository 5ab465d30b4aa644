"""The coordinator's run store: one suite against SQLite and PostgreSQL, plus what only a
shared store does (replica ownership, following a run another replica drives)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import PostgresRunStore, RunStore, SQLiteRunStore, open_run_store
from cuga.orchestrator._runstore import request_key
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.shared.config import ConfigError, build_dataclass
from cuga.shared.errors import FailedPreconditionError
from cuga.shared.messages import timestamp
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401

T0 = 1_700_000_000.0
RUNNING = coordinator_pb2.RUN_STATE_RUNNING

Opener = Callable[[], Awaitable[RunStore]]


@pytest.fixture(params=["sqlite", "postgres"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens a store instance (each call a new one, like another process or replica)."""
    opened: list[RunStore] = []

    async def open_store() -> RunStore:
        store: RunStore
        if request.param == "sqlite":
            store = SQLiteRunStore(tmp_path / "coordinator.db")
        else:
            store = await PostgresRunStore.connect(request.getfixturevalue("postgres_dsn"))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()  # closing twice is harmless on both backends


def new_run(run_id: str, *, at: float = T0, profile: str = "p") -> coordinator_pb2.Run:
    return coordinator_pb2.Run(
        run_id=run_id,
        trace_id="a" * 32,
        goal=f"goal of {run_id}",
        context=common_pb2.ExecutionContext(run_id=run_id, profile=profile),
        state=RUNNING,
        created_at=timestamp(at),
        updated_at=timestamp(at),
    )


async def create(store: RunStore, run_id: str, **kw: object) -> coordinator_pb2.Run:
    run = new_run(run_id, **kw)  # type: ignore[arg-type]
    await store.create_run(
        run,
        coordinator_pb2.OrchestrateRequest(request_id=f"req-{run_id}", goal=run.goal),
        f"{'a' * 32}:{'b' * 16}",
    )
    return run


def event(run_id: str, seq: int, stage: int, step_id: str = "") -> common_pb2.OrchestrationEvent:
    return common_pb2.OrchestrationEvent(
        run_id=run_id,
        trace_id="a" * 32,
        seq=seq,
        stage=stage,  # type: ignore[arg-type]
        timestamp=timestamp(T0 + seq),
        step_id=step_id,
    )


async def test_run_round_trips(opener: Opener) -> None:
    store = await opener()
    run = await create(store, "r1")
    assert await store.get_run("r1") == run
    assert await store.get_run("nope") is None
    # Stored under its key scoped to requester and profile, never the bare request id.
    key = request_key(await store.get_request("r1"))
    assert key is not None and key != "req-r1"
    assert await store.run_for_request(key) == "r1"
    assert await store.run_for_request("req-r1") is None
    other = coordinator_pb2.OrchestrateRequest(request_id="req-r1")
    other.context.user_id = "someone-else"
    assert await store.run_for_request(request_key(other) or "") is None
    assert (await store.get_request("r1")).goal == run.goal
    assert await store.trace_context("r1") == f"{'a' * 32}:{'b' * 16}"
    assert await store.trace_context("nope") == ""
    assert await store.get_plan("r1") is None  # created without one
    plan = common_pb2.Plan(plan_id="plan-1", steps=[common_pb2.PlanStep(step_id="s1", tool="t")])
    planned = new_run("r2")
    planned.plan_id = "plan-1"
    await store.create_run(planned, coordinator_pb2.OrchestrateRequest(goal="g"), "", plan)
    assert await store.get_plan("r2") == plan
    assert (await store.get_run("r2")).plan_id == "plan-1"  # type: ignore[union-attr]


async def test_duplicate_run_id_is_refused(opener: Opener) -> None:
    store = await opener()
    await create(store, "r1")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await create(store, "r1")
    assert await store.events_after("r1", 0) == []


async def test_events_steps_and_state_are_written_together(opener: Opener) -> None:
    store = await opener()
    run = await create(store, "r1")
    await store.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
    first = common_pb2.StepResult(step_id="s1", cost=1.0)
    executed = event("r1", 2, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1")
    executed.step_result.CopyFrom(first)
    await store.append_event(run, executed)
    again = common_pb2.StepResult(step_id="s1", cost=2.0)  # a retried step's final result
    executed = event("r1", 3, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1")
    executed.step_result.CopyFrom(again)
    await store.append_event(run, executed)
    stored = await store.get_run("r1")
    assert stored is not None
    assert (stored.last_seq, stored.stage, stored.state) == (
        3,
        common_pb2.LIFECYCLE_STAGE_EXECUTE,
        RUNNING,
    )
    assert await store.completed_steps("r1") == {"s1": again}
    assert [e.seq for e in await store.events_after("r1", 0)] == [1, 2, 3]
    assert [e.seq for e in await store.events_after("r1", 2)] == [3]
    await store.append_event(run, event("r1", 4, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    assert (await store.get_run("r1")).state == coordinator_pb2.RUN_STATE_COMPLETED  # type: ignore[union-attr]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.append_event(run, event("r1", 4, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    assert [e.seq for e in await store.events_after("r1", 0)] == [1, 2, 3, 4]


async def test_a_group_commit_writes_several_runs_events_at_once(opener: Opener) -> None:
    store = await opener()
    a, b = await create(store, "ra"), await create(store, "rb")
    many = [(a, event("ra", seq, common_pb2.LIFECYCLE_STAGE_ROUTE, "s")) for seq in range(1, 1201)]
    await store.append_events(many)  # more rows than one INSERT statement takes
    done = event("rb", 2, common_pb2.LIFECYCLE_STAGE_COMPLETE)
    await store.append_events(
        [
            (b, event("rb", 1, common_pb2.LIFECYCLE_STAGE_PLAN)),
            (a, event("ra", 1201, common_pb2.LIFECYCLE_STAGE_ROUTE, "s")),
            (b, done),
        ]
    )
    assert [e.seq for e in await store.events_after("ra", 0)] == list(range(1, 1202))
    assert [e.seq for e in await store.events_after("rb", 0)] == [1, 2]
    stored_a, stored_b = await store.get_run("ra"), await store.get_run("rb")
    assert stored_a is not None and stored_b is not None
    assert (stored_a.last_seq, stored_a.state) == (1201, RUNNING)
    assert (stored_b.last_seq, stored_b.state) == (2, coordinator_pb2.RUN_STATE_COMPLETED)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.append_events([(b, event("rb", 3, common_pb2.LIFECYCLE_STAGE_PLAN)), (b, done)])
    assert [e.seq for e in await store.events_after("rb", 0)] == [1, 2]  # all or nothing


async def test_a_runs_progress_is_its_newest_event_wherever_it_is_read(opener: Opener) -> None:
    store = await opener()
    run = await create(store, "r1")
    for seq, stage in enumerate(
        (
            common_pb2.LIFECYCLE_STAGE_INITIALIZE,
            common_pb2.LIFECYCLE_STAGE_PLAN,
            common_pb2.LIFECYCLE_STAGE_ROUTE,
        ),
        start=1,
    ):
        await store.append_event(run, event("r1", seq, stage, "s1" if seq == 3 else ""))
    want = (3, common_pb2.LIFECYCLE_STAGE_ROUTE, T0 + 3, RUNNING)

    def progress(r: coordinator_pb2.Run | None) -> tuple[int, int, float, int]:
        assert r is not None
        return (r.last_seq, r.stage, r.updated_at.ToNanoseconds() / 1e9, r.state)

    other = await opener()  # another process (or replica) reading the same store
    for reader in (store, other):
        assert progress(await reader.get_run("r1")) == want
        assert (
            progress((await reader.list_runs(after=None, limit=5, state=0, profile=""))[0][1])
            == want
        )
    await store.close()
    third = await opener()  # a restarted coordinator finds the run where it was
    assert [progress(r) for r in await third.running_runs()] == [want]


async def test_list_runs_pages_newest_first_with_filters(opener: Opener) -> None:
    store = await opener()
    for i in range(5):
        await create(store, f"r{i}", at=T0 + i, profile="even" if i % 2 == 0 else "odd")
    done = await store.get_run("r3")
    assert done is not None
    done.state = coordinator_pb2.RUN_STATE_FAILED
    await store.update_run(done)
    page = await store.list_runs(after=None, limit=2, state=0, profile="")
    assert [r.run_id for _, r in page] == ["r4", "r3"]
    rest = await store.list_runs(
        after=(page[-1][0], page[-1][1].run_id), limit=10, state=0, profile=""
    )
    assert [r.run_id for _, r in rest] == ["r2", "r1", "r0"]
    assert [
        r.run_id for _, r in await store.list_runs(after=None, limit=10, state=0, profile="even")
    ] == ["r4", "r2", "r0"]
    failed = await store.list_runs(
        after=None, limit=10, state=coordinator_pb2.RUN_STATE_FAILED, profile=""
    )
    assert [r.run_id for _, r in failed] == ["r3"]


async def test_a_restarted_store_finds_runs_left_running(opener: Opener) -> None:
    first = await opener()
    await create(first, "left")
    done = await create(first, "done")
    await first.append_event(done, event("done", 1, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    await first.close()
    second = await opener()
    assert [r.run_id for r in await second.running_runs()] == ["left"]


async def test_follow_replays_a_finished_run(opener: Opener) -> None:
    store = await opener()
    run = await create(store, "r1")
    for seq, stage in enumerate(
        (common_pb2.LIFECYCLE_STAGE_INITIALIZE, common_pb2.LIFECYCLE_STAGE_COMPLETE), start=1
    ):
        await store.append_event(run, event("r1", seq, stage))
    assert [e.seq for e in [e async for e in store.follow("r1", 0)]] == [1, 2]
    assert [e.seq for e in [e async for e in store.follow("r1", 1)]] == [2]


async def test_open_run_store_by_kind(tmp_path: Path) -> None:
    store = await open_run_store("sqlite", data_dir=tmp_path)
    assert isinstance(store, SQLiteRunStore)
    await store.close()
    with pytest.raises(ValueError, match=r"coordinator\.dsn"):
        await open_run_store("postgres", data_dir=tmp_path)
    with pytest.raises(ValueError, match="sqlite, postgres"):
        await open_run_store("mongo", data_dir=tmp_path)


def test_postgres_run_store_needs_a_dsn_in_configuration() -> None:
    with pytest.raises(ConfigError) as err:
        build_dataclass(CoordinatorConfig, {"run_store": "postgres"}, "coordinator")
    assert err.value.key == "coordinator.dsn"
    with pytest.raises(ConfigError, match="run_store"):
        build_dataclass(CoordinatorConfig, {"run_store": "mysql"}, "coordinator")
    config = build_dataclass(
        CoordinatorConfig, {"run_store": "postgres", "dsn": "host=db"}, "coordinator"
    )
    assert (config.run_store, config.dsn) == ("postgres", "host=db")


# ---------------------------------------------------------------------- PostgreSQL only


async def test_replicas_never_take_each_others_live_runs(postgres_dsn: str) -> None:  # noqa: F811
    a = await PostgresRunStore.connect(postgres_dsn)
    b = await PostgresRunStore.connect(postgres_dsn)
    try:
        await create(a, "of-a")
        await create(b, "of-b")
        # Each sees only its own (the engine skips those live in its process): the
        # other replica is alive.
        assert [r.run_id for r in await b.running_runs()] == ["of-b"]
        assert [r.run_id for r in await a.running_runs()] == ["of-a"]
        await a.close()  # a's process dies: its lock goes with its session
        c = await PostgresRunStore.connect(postgres_dsn)
        try:
            assert sorted(r.run_id for r in await b.running_runs()) == ["of-a", "of-b"]
            assert list(await c.running_runs()) == []  # claimed by b, which lives
        finally:
            await c.close()
    finally:
        await b.close()


async def test_a_stable_replica_id_is_exclusive_and_takes_its_runs_back(
    postgres_dsn: str,  # noqa: F811
) -> None:
    a = await PostgresRunStore.connect(postgres_dsn, replica_id="coord-0")
    await create(a, "r1")
    with pytest.raises(RuntimeError, match="coord-0"):
        await PostgresRunStore.connect(postgres_dsn, replica_id="coord-0")
    await a.close()
    again = await PostgresRunStore.connect(postgres_dsn, replica_id="coord-0")
    try:
        assert [r.run_id for r in await again.running_runs()] == ["r1"]
    finally:
        await again.close()


async def test_follow_streams_a_run_written_by_another_replica(
    postgres_dsn: str,  # noqa: F811
) -> None:
    writer = await PostgresRunStore.connect(postgres_dsn)
    reader = await PostgresRunStore.connect(postgres_dsn)
    try:
        run = await create(writer, "r1")
        await writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        seen: list[int] = []
        got_first = asyncio.Event()

        async def follow() -> None:
            async for e in reader.follow("r1", 0):
                seen.append(e.seq)
                got_first.set()

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(got_first.wait(), 10)
        await writer.append_event(run, event("r1", 2, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1"))
        await writer.append_event(run, event("r1", 3, common_pb2.LIFECYCLE_STAGE_COMPLETE))
        await asyncio.wait_for(follower, 10)
        assert seen == [1, 2, 3]
    finally:
        await writer.close()
        await reader.close()


async def test_follow_ends_when_the_run_stops_without_a_terminal_event(
    postgres_dsn: str,  # noqa: F811
) -> None:
    writer = await PostgresRunStore.connect(postgres_dsn)
    reader = await PostgresRunStore.connect(postgres_dsn)
    try:
        run = await create(writer, "r1")
        await writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        it = reader.follow("r1", 0)
        assert (await anext(it)).seq == 1
        nxt = asyncio.ensure_future(anext(it))
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED  # the writer is shutting down
        await writer.update_run(run)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(nxt, 10)
    finally:
        await writer.close()
        await reader.close()


async def test_follow_ends_when_the_driving_replica_dies(postgres_dsn: str) -> None:  # noqa: F811
    writer = await PostgresRunStore.connect(postgres_dsn)
    # A short liveness check so the test need not wait 30 s for the crash to be noticed.
    reader = await PostgresRunStore.connect(postgres_dsn, liveness_check_s=0.2)
    try:
        run = await create(writer, "r1")
        await writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        it = reader.follow("r1", 0)
        assert (await anext(it)).seq == 1
        await writer.close()  # SIGKILL-like: no state change, no more events, lock released
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(it), 10)
        assert (await reader.get_run("r1")).state == RUNNING  # type: ignore[union-attr]
    finally:
        await reader.close()


async def test_only_one_replica_can_take_a_run_to_running(postgres_dsn: str) -> None:  # noqa: F811
    a = await PostgresRunStore.connect(postgres_dsn)
    b = await PostgresRunStore.connect(postgres_dsn)
    try:
        run = await create(a, "r1")
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
        await a.update_run(run)
        # Both read INTERRUPTED and resume: the first wins, the second is refused.
        seen_by_b = await b.get_run("r1")
        assert seen_by_b is not None
        run.state = RUNNING
        await a.update_run(run)
        seen_by_b.state = RUNNING
        with pytest.raises(FailedPreconditionError, match="another coordinator"):
            await b.update_run(seen_by_b)
        assert await b.get_run("r1") == run
        await a.update_run(run)  # the owner may write it again
    finally:
        await a.close()
        await b.close()


async def test_a_sqlite_store_from_before_replicas_is_upgraded(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "coordinator.db")
    old.execute(
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, request_id TEXT UNIQUE, profile TEXT NOT"
        " NULL, state INTEGER NOT NULL, created_ns INTEGER NOT NULL, run BLOB NOT NULL,"
        " request BLOB NOT NULL, plan BLOB, trace_ctx TEXT NOT NULL DEFAULT '')"
    )
    run = new_run("old")
    old.execute(
        "INSERT INTO runs (run_id, profile, state, created_ns, run, request)"
        " VALUES (?, 'p', ?, 1, ?, x'')",
        ("old", RUNNING, run.SerializeToString()),
    )
    old.commit()
    old.close()
    store = SQLiteRunStore(tmp_path / "coordinator.db")
    try:
        assert [r.run_id for r in await store.running_runs()] == ["old"]
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
        await store.update_run(run)
        assert await store.get_run("old") == run
    finally:
        await store.close()


async def test_a_replica_whose_connection_broke_holds_its_lock_again(
    postgres_dsn: str,  # noqa: F811
) -> None:
    a = await PostgresRunStore.connect(postgres_dsn)
    await create(a, "r1")
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        # The server ends a's lock session (restart, network): its replica lock goes with it.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
        )
    assert await a.get_run("r1") is not None  # the pool's connections still serve

    async def relocked() -> bool:
        async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            )
            row = await cur.fetchone()
            return bool(row and row[0])

    # The lock connection's end is seen on its socket: re-opened, the lock taken again.
    deadline = asyncio.get_running_loop().time() + 30
    while not await relocked():
        assert asyncio.get_running_loop().time() < deadline, "the replica lock was not re-taken"
        await asyncio.sleep(0.05)  # polling the server's lock table, with a deadline
    b = await PostgresRunStore.connect(postgres_dsn)
    try:
        assert [r.run_id for r in await b.running_runs()] == []  # a is alive again
    finally:
        await b.close()
        await a.close()
