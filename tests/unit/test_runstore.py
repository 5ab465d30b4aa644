"""The coordinator's run store: one suite against SQLite and PostgreSQL, plus what only a
shared store does (replica ownership, following a run another replica drives)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
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

Opener = Callable[[], RunStore]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens a store instance (each call a new one, like another process or replica)."""
    opened: list[RunStore] = []

    def open_store() -> RunStore:
        store: RunStore
        if request.param == "sqlite":
            store = SQLiteRunStore(tmp_path / "coordinator.db")
        else:
            store = PostgresRunStore(request.getfixturevalue("postgres_dsn"))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        store.close()  # closing twice is harmless on both backends


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


def create(store: RunStore, run_id: str, **kw: object) -> coordinator_pb2.Run:
    run = new_run(run_id, **kw)  # type: ignore[arg-type]
    store.create_run(
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


def test_run_round_trips(opener: Opener) -> None:
    store = opener()
    run = create(store, "r1")
    assert store.get_run("r1") == run
    assert store.get_run("nope") is None
    # Stored under its key scoped to requester and profile, never the bare request id.
    key = request_key(store.get_request("r1"))
    assert key is not None and key != "req-r1"
    assert store.run_for_request(key) == "r1"
    assert store.run_for_request("req-r1") is None
    other = coordinator_pb2.OrchestrateRequest(request_id="req-r1")
    other.context.user_id = "someone-else"
    assert store.run_for_request(request_key(other) or "") is None
    assert store.get_request("r1").goal == run.goal
    assert store.trace_context("r1") == f"{'a' * 32}:{'b' * 16}"
    assert store.trace_context("nope") == ""
    assert store.get_plan("r1") is None  # created without one
    plan = common_pb2.Plan(plan_id="plan-1", steps=[common_pb2.PlanStep(step_id="s1", tool="t")])
    planned = new_run("r2")
    planned.plan_id = "plan-1"
    store.create_run(planned, coordinator_pb2.OrchestrateRequest(goal="g"), "", plan)
    assert store.get_plan("r2") == plan
    assert store.get_run("r2").plan_id == "plan-1"  # type: ignore[union-attr]


def test_duplicate_run_id_is_refused(opener: Opener) -> None:
    store = opener()
    create(store, "r1")
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        create(store, "r1")
    assert store.events_after("r1", 0) == []


def test_events_steps_and_state_are_written_together(opener: Opener) -> None:
    store = opener()
    run = create(store, "r1")
    store.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
    first = common_pb2.StepResult(step_id="s1", cost=1.0)
    executed = event("r1", 2, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1")
    executed.step_result.CopyFrom(first)
    store.append_event(run, executed)
    again = common_pb2.StepResult(step_id="s1", cost=2.0)  # a retried step's final result
    executed = event("r1", 3, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1")
    executed.step_result.CopyFrom(again)
    store.append_event(run, executed)
    stored = store.get_run("r1")
    assert stored is not None
    assert (stored.last_seq, stored.stage, stored.state) == (
        3,
        common_pb2.LIFECYCLE_STAGE_EXECUTE,
        RUNNING,
    )
    assert store.completed_steps("r1") == {"s1": again}
    assert [e.seq for e in store.events_after("r1", 0)] == [1, 2, 3]
    assert [e.seq for e in store.events_after("r1", 2)] == [3]
    store.append_event(run, event("r1", 4, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    assert store.get_run("r1").state == coordinator_pb2.RUN_STATE_COMPLETED  # type: ignore[union-attr]
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.append_event(run, event("r1", 4, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    assert [e.seq for e in store.events_after("r1", 0)] == [1, 2, 3, 4]


def test_a_group_commit_writes_several_runs_events_at_once(opener: Opener) -> None:
    store = opener()
    a, b = create(store, "ra"), create(store, "rb")
    many = [(a, event("ra", seq, common_pb2.LIFECYCLE_STAGE_ROUTE, "s")) for seq in range(1, 1201)]
    store.append_events(many)  # more rows than one INSERT statement takes
    done = event("rb", 2, common_pb2.LIFECYCLE_STAGE_COMPLETE)
    store.append_events(
        [
            (b, event("rb", 1, common_pb2.LIFECYCLE_STAGE_PLAN)),
            (a, event("ra", 1201, common_pb2.LIFECYCLE_STAGE_ROUTE, "s")),
            (b, done),
        ]
    )
    assert [e.seq for e in store.events_after("ra", 0)] == list(range(1, 1202))
    assert [e.seq for e in store.events_after("rb", 0)] == [1, 2]
    stored_a, stored_b = store.get_run("ra"), store.get_run("rb")
    assert stored_a is not None and stored_b is not None
    assert (stored_a.last_seq, stored_a.state) == (1201, RUNNING)
    assert (stored_b.last_seq, stored_b.state) == (2, coordinator_pb2.RUN_STATE_COMPLETED)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.append_events([(b, event("rb", 3, common_pb2.LIFECYCLE_STAGE_PLAN)), (b, done)])
    assert [e.seq for e in store.events_after("rb", 0)] == [1, 2]  # all or nothing


def test_a_runs_progress_is_its_newest_event_wherever_it_is_read(opener: Opener) -> None:
    store = opener()
    run = create(store, "r1")
    for seq, stage in enumerate(
        (
            common_pb2.LIFECYCLE_STAGE_INITIALIZE,
            common_pb2.LIFECYCLE_STAGE_PLAN,
            common_pb2.LIFECYCLE_STAGE_ROUTE,
        ),
        start=1,
    ):
        store.append_event(run, event("r1", seq, stage, "s1" if seq == 3 else ""))
    want = (3, common_pb2.LIFECYCLE_STAGE_ROUTE, T0 + 3, RUNNING)

    def progress(r: coordinator_pb2.Run | None) -> tuple[int, int, float, int]:
        assert r is not None
        return (r.last_seq, r.stage, r.updated_at.ToNanoseconds() / 1e9, r.state)

    other = opener()  # another process (or replica) reading the same store
    for reader in (store, other):
        assert progress(reader.get_run("r1")) == want
        assert progress(reader.list_runs(after=None, limit=5, state=0, profile="")[0][1]) == want
    store.close()
    third = opener()  # a restarted coordinator finds the run where it was
    assert [progress(r) for r in third.running_runs()] == [want]


def test_list_runs_pages_newest_first_with_filters(opener: Opener) -> None:
    store = opener()
    for i in range(5):
        create(store, f"r{i}", at=T0 + i, profile="even" if i % 2 == 0 else "odd")
    done = store.get_run("r3")
    assert done is not None
    done.state = coordinator_pb2.RUN_STATE_FAILED
    store.update_run(done)
    page = store.list_runs(after=None, limit=2, state=0, profile="")
    assert [r.run_id for _, r in page] == ["r4", "r3"]
    rest = store.list_runs(after=(page[-1][0], page[-1][1].run_id), limit=10, state=0, profile="")
    assert [r.run_id for _, r in rest] == ["r2", "r1", "r0"]
    assert [
        r.run_id for _, r in store.list_runs(after=None, limit=10, state=0, profile="even")
    ] == ["r4", "r2", "r0"]
    failed = store.list_runs(
        after=None, limit=10, state=coordinator_pb2.RUN_STATE_FAILED, profile=""
    )
    assert [r.run_id for _, r in failed] == ["r3"]


def test_a_restarted_store_finds_runs_left_running(opener: Opener) -> None:
    first = opener()
    create(first, "left")
    done = create(first, "done")
    first.append_event(done, event("done", 1, common_pb2.LIFECYCLE_STAGE_COMPLETE))
    first.close()
    second = opener()
    assert [r.run_id for r in second.running_runs()] == ["left"]


async def test_follow_replays_a_finished_run(opener: Opener) -> None:
    store = opener()
    run = create(store, "r1")
    for seq, stage in enumerate(
        (common_pb2.LIFECYCLE_STAGE_INITIALIZE, common_pb2.LIFECYCLE_STAGE_COMPLETE), start=1
    ):
        store.append_event(run, event("r1", seq, stage))
    assert [e.seq for e in [e async for e in store.follow("r1", 0)]] == [1, 2]
    assert [e.seq for e in [e async for e in store.follow("r1", 1)]] == [2]


def test_open_run_store_by_kind(tmp_path: Path) -> None:
    assert isinstance(open_run_store("sqlite", data_dir=tmp_path), SQLiteRunStore)
    with pytest.raises(ValueError, match=r"coordinator\.dsn"):
        open_run_store("postgres", data_dir=tmp_path)
    with pytest.raises(ValueError, match="sqlite, postgres"):
        open_run_store("mongo", data_dir=tmp_path)


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


def test_replicas_never_take_each_others_live_runs(postgres_dsn: str) -> None:  # noqa: F811
    a = PostgresRunStore(postgres_dsn)
    b = PostgresRunStore(postgres_dsn)
    try:
        create(a, "of-a")
        create(b, "of-b")
        # Each sees only its own (the engine skips those live in its process): the
        # other replica is alive.
        assert [r.run_id for r in b.running_runs()] == ["of-b"]
        assert [r.run_id for r in a.running_runs()] == ["of-a"]
        a.close()  # a's process dies: its lock goes with its session
        c = PostgresRunStore(postgres_dsn)
        try:
            assert sorted(r.run_id for r in b.running_runs()) == ["of-a", "of-b"]
            assert list(c.running_runs()) == []  # claimed by b, which lives
        finally:
            c.close()
    finally:
        b.close()


def test_a_stable_replica_id_is_exclusive_and_takes_its_runs_back(
    postgres_dsn: str,  # noqa: F811
) -> None:
    a = PostgresRunStore(postgres_dsn, replica_id="coord-0")
    create(a, "r1")
    with pytest.raises(RuntimeError, match="coord-0"):
        PostgresRunStore(postgres_dsn, replica_id="coord-0")
    a.close()
    again = PostgresRunStore(postgres_dsn, replica_id="coord-0")
    try:
        assert [r.run_id for r in again.running_runs()] == ["r1"]
    finally:
        again.close()


async def test_follow_streams_a_run_written_by_another_replica(
    postgres_dsn: str,  # noqa: F811
) -> None:
    writer = PostgresRunStore(postgres_dsn)
    reader = PostgresRunStore(postgres_dsn)
    try:
        run = create(writer, "r1")
        writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        seen: list[int] = []
        got_first = asyncio.Event()

        async def follow() -> None:
            async for e in reader.follow("r1", 0):
                seen.append(e.seq)
                got_first.set()

        follower = asyncio.create_task(follow())
        await asyncio.wait_for(got_first.wait(), 10)
        writer.append_event(run, event("r1", 2, common_pb2.LIFECYCLE_STAGE_EXECUTE, "s1"))
        writer.append_event(run, event("r1", 3, common_pb2.LIFECYCLE_STAGE_COMPLETE))
        await asyncio.wait_for(follower, 10)
        assert seen == [1, 2, 3]
    finally:
        writer.close()
        reader.close()


async def test_follow_ends_when_the_run_stops_without_a_terminal_event(
    postgres_dsn: str,  # noqa: F811
) -> None:
    writer = PostgresRunStore(postgres_dsn)
    reader = PostgresRunStore(postgres_dsn)
    try:
        run = create(writer, "r1")
        writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        it = reader.follow("r1", 0)
        assert (await anext(it)).seq == 1
        nxt = asyncio.ensure_future(anext(it))
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED  # the writer is shutting down
        writer.update_run(run)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(nxt, 10)
    finally:
        writer.close()
        reader.close()


async def test_follow_ends_when_the_driving_replica_dies(postgres_dsn: str) -> None:  # noqa: F811
    writer = PostgresRunStore(postgres_dsn)
    # A short liveness check so the test need not wait 30 s for the crash to be noticed.
    reader = PostgresRunStore(postgres_dsn, liveness_check_s=0.2)
    try:
        run = create(writer, "r1")
        writer.append_event(run, event("r1", 1, common_pb2.LIFECYCLE_STAGE_INITIALIZE))
        it = reader.follow("r1", 0)
        assert (await anext(it)).seq == 1
        writer.close()  # SIGKILL-like: no state change, no more events, lock released
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(it), 10)
        assert reader.get_run("r1").state == RUNNING  # type: ignore[union-attr]
    finally:
        reader.close()


def test_only_one_replica_can_take_a_run_to_running(postgres_dsn: str) -> None:  # noqa: F811
    a = PostgresRunStore(postgres_dsn)
    b = PostgresRunStore(postgres_dsn)
    try:
        run = create(a, "r1")
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
        a.update_run(run)
        # Both read INTERRUPTED and resume: the first wins, the second is refused.
        seen_by_b = b.get_run("r1")
        assert seen_by_b is not None
        run.state = RUNNING
        a.update_run(run)
        seen_by_b.state = RUNNING
        with pytest.raises(FailedPreconditionError, match="another coordinator"):
            b.update_run(seen_by_b)
        assert b.get_run("r1") == run
        a.update_run(run)  # the owner may write it again
    finally:
        a.close()
        b.close()


def test_a_sqlite_store_from_before_replicas_is_upgraded(tmp_path: Path) -> None:
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
        assert [r.run_id for r in store.running_runs()] == ["old"]
        run.state = coordinator_pb2.RUN_STATE_INTERRUPTED
        store.update_run(run)
        assert store.get_run("old") == run
    finally:
        store.close()


def test_a_replica_whose_connection_broke_holds_its_lock_again(
    postgres_dsn: str,  # noqa: F811
) -> None:
    a = PostgresRunStore(postgres_dsn)
    create(a, "r1")
    with psycopg.connect(postgres_dsn, autocommit=True) as admin:
        # The server ends a's session (restart, network): its replica lock goes with it.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()"
        )
    assert a.get_run("r1") is not None  # reconnects, re-takes the lock, reads again
    b = PostgresRunStore(postgres_dsn)
    try:
        assert [r.run_id for r in b.running_runs()] == []  # a is alive again
    finally:
        b.close()
        a.close()
