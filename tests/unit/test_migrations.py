"""Numbered, forward-only schema migrations (issue 25): the version table, the order, a
failed migration rolled back whole, concurrent starters, and a database made by the
previous schema, with data in it, brought up to date by the run store (SQLite and
PostgreSQL) and by ``cuga db migrate``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cuga.cli.main import build_parser, invoke
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._runstore import RUN_STORE_SCHEMA, PostgresRunStore, SQLiteRunStore
from cuga.shared.migrations import VERSION_TABLE, Migration, Schema
from cuga.shared.sqldb import Database, PostgresDatabase, SQLiteDatabase
from cuga.shared.sqlite import open_sqlite
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import make_settings

pytestmark = pytest.mark.timeout(120)

#: The run store as the release before the audit outbox made it (runs with owner,
#: events), copied from that release: what an upgrade starts from.
PREVIOUS_POSTGRES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    request_id  TEXT UNIQUE,
    profile     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    created_ns  BIGINT NOT NULL,
    run         BYTEA NOT NULL,
    request     BYTEA NOT NULL,
    plan        BYTEA,
    trace_ctx   TEXT NOT NULL DEFAULT '',
    owner       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_ns DESC, run_id DESC);
CREATE INDEX IF NOT EXISTS runs_running ON runs (owner) WHERE state = 1;
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  BYTEA NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""
#: The SQLite run store of the release before replicas (no owner; a steps table since
#: dropped): the oldest layout an upgrade may meet.
OLDEST_SQLITE = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    request_id  TEXT UNIQUE,
    profile     TEXT NOT NULL,
    state       INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    run         BLOB NOT NULL,
    request     BLOB NOT NULL,
    plan        BLOB,
    trace_ctx   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS runs_by_time ON runs (created_ns DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS steps (
    run_id  TEXT NOT NULL,
    step_id TEXT NOT NULL,
    result  BLOB NOT NULL,
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    event  BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
);
"""
RUN_ID = "run-before-upgrade"


def _old_run() -> tuple[coordinator_pb2.Run, list[common_pb2.OrchestrationEvent]]:
    run = coordinator_pb2.Run(
        run_id=RUN_ID, state=coordinator_pb2.RUN_STATE_COMPLETED, goal="before the upgrade"
    )
    stages = (
        common_pb2.LIFECYCLE_STAGE_INITIALIZE,
        common_pb2.LIFECYCLE_STAGE_PLAN,
        common_pb2.LIFECYCLE_STAGE_COMPLETE,
    )
    events = [
        common_pb2.OrchestrationEvent(run_id=RUN_ID, seq=i, stage=stage)
        for i, stage in enumerate(stages, 1)
    ]
    return run, events


def _write_old(db: Database, *, owner: bool) -> None:
    run, events = _old_run()
    columns = "run_id, request_id, profile, state, created_ns, run, request, trace_ctx"
    values = [RUN_ID, None, "default", int(run.state), 1, run.SerializeToString()]
    values += [coordinator_pb2.OrchestrateRequest(goal=run.goal).SerializeToString(), "ab:cd"]
    if owner:
        columns += ", owner"
        values.append("coordinator-gone")
    marks = ", ".join("?" * len(values))
    db.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", values)
    for event in events:
        db.execute(
            "INSERT INTO events (run_id, seq, event) VALUES (?, ?, ?)",
            (RUN_ID, event.seq, event.SerializeToString()),
        )


async def _assert_upgraded(store: SQLiteRunStore | PostgresRunStore, db: Database) -> None:
    # The data of the previous schema, read by the new code.
    run, events = _old_run()
    stored = await store.get_run(RUN_ID)
    assert stored is not None and stored.goal == run.goal and stored.state == run.state
    assert [e.stage for e in await store.events_after(RUN_ID, 0)] == [e.stage for e in events]
    assert await store.trace_context(RUN_ID) == "ab:cd"
    status = RUN_STORE_SCHEMA.status(db)
    assert (status.current, status.latest, status.pending) == (3, 3, ())
    # What the new schema added works: a new run and its audited event, in the outbox.
    new = coordinator_pb2.Run(run_id="run-after", state=coordinator_pb2.RUN_STATE_RUNNING)
    await store.create_run(new, coordinator_pb2.OrchestrateRequest(goal="after"), "ef:01")
    event = common_pb2.OrchestrationEvent(
        run_id="run-after", seq=1, stage=common_pb2.LIFECYCLE_STAGE_INITIALIZE
    )
    await store.append_events([(new, event)], audited=[(new, event)])
    assert [(e.run_id, e.seq) for _, _, e in await store.outbox(0, 10)] == [("run-after", 1)]


async def test_a_sqlite_run_store_of_the_oldest_layout_is_migrated_with_its_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "coordinator.db"
    conn = open_sqlite(path)
    conn.executescript(OLDEST_SQLITE)
    _write_old(SQLiteDatabase(conn), owner=False)
    conn.close()
    store = SQLiteRunStore(path)
    try:
        await _assert_upgraded(store, store._sqlite)
        assert await store.get_run(RUN_ID) is not None
        versions = store._sqlite.execute(
            f"SELECT version, name FROM {VERSION_TABLE} ORDER BY version"
        ).fetchall()
        assert [tuple(v) for v in versions] == [
            (m.version, m.name) for m in RUN_STORE_SCHEMA.migrations
        ]
    finally:
        await store.close()


async def test_a_postgres_run_store_of_the_previous_release_is_migrated_with_its_data(
    postgres_dsn: str,  # noqa: F811
) -> None:
    db = PostgresDatabase(postgres_dsn)
    db.executescript(PREVIOUS_POSTGRES)
    _write_old(db, owner=True)
    db.close()
    store = await PostgresRunStore.connect(postgres_dsn, replica_id="after-upgrade")
    check = PostgresDatabase(postgres_dsn)
    try:
        await _assert_upgraded(store, check)
    finally:
        check.close()
        await store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        db: Database = SQLiteDatabase(open_sqlite(tmp_path / "m.db"))
    else:
        db = PostgresDatabase(request.getfixturevalue("postgres_dsn"))
    try:
        yield db
    finally:
        db.close()


def _tables(db: Database) -> set[str]:
    if db.dialect == "sqlite":
        rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    else:
        rows = db.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
    return {str(r[0]) for r in rows}


def _schema(*extra: Migration) -> Schema:
    base = (
        Migration(1, "a", "CREATE TABLE a (x INTEGER)", "CREATE TABLE a (x INTEGER)"),
        Migration(
            2,
            "b",
            "CREATE TABLE b (y INTEGER); INSERT INTO a (x) VALUES (1)",
            "CREATE TABLE b (y INTEGER); INSERT INTO a (x) VALUES (1)",
        ),
    )
    return Schema("test.component", base + extra, lock_key=0x7465_7374)


def test_migrations_apply_in_order_once_and_record_their_versions(database: Database) -> None:
    schema = _schema()
    assert schema.status(database).current == 0
    assert [m.version for m in schema.migrate(database)] == [1, 2]
    assert schema.migrate(database) == []  # forward-only, applied once
    assert {"a", "b", VERSION_TABLE} <= _tables(database)
    assert database.execute("SELECT count(*) FROM a").fetchone()[0] == 1
    # A release with one more migration applies only that one.
    grown = _schema(Migration(3, "c", "CREATE TABLE c (z INTEGER)", "CREATE TABLE c (z INTEGER)"))
    status = grown.status(database)
    assert (status.current, [m.version for m in status.pending]) == (2, [3])
    assert [m.version for m in grown.migrate(database)] == [3]


def test_a_failed_migration_is_rolled_back_whole_and_the_version_stays(database: Database) -> None:
    bad = Migration(
        3,
        "half",
        "CREATE TABLE half (z INTEGER); INSERT INTO missing VALUES (1)",
        "CREATE TABLE half (z INTEGER); INSERT INTO missing VALUES (1)",
    )
    with pytest.raises(Exception, match="missing"):
        _schema(bad).migrate(database)
    assert "half" not in _tables(database)
    assert _schema().status(database).current == 2
    assert [m.version for m in _schema(bad).status(database).pending] == [3]


def test_a_database_newer_than_the_code_is_used_with_a_warning(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    grown = _schema(Migration(3, "c", "CREATE TABLE c (z INTEGER)", "CREATE TABLE c (z INTEGER)"))
    grown.migrate(database)
    with caplog.at_level(logging.WARNING, "cuga.migrations"):
        assert _schema().migrate(database) == []
    assert "newer than this release's 2" in caplog.text


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    with pytest.raises(ValueError, match=r"1\.\.n"):
        Schema("x", (Migration(2, "b", "", ""),), lock_key=1)
    assert [m.version for m in RUN_STORE_SCHEMA.migrations] == [1, 2, 3]


def test_replicas_starting_together_apply_each_migration_once(
    postgres_dsn: str,  # noqa: F811
) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def start() -> None:
        db = PostgresDatabase(postgres_dsn)
        try:
            barrier.wait(timeout=30)
            RUN_STORE_SCHEMA.migrate(db)
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    db = PostgresDatabase(postgres_dsn)
    try:
        rows = db.execute(f"SELECT version FROM {VERSION_TABLE} ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [1, 2, 3]
    finally:
        db.close()


async def test_cuga_db_status_and_migrate_on_the_configured_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path / "data")
    path = tmp_path / "data" / "coordinator.db"
    conn = open_sqlite(path)
    conn.executescript(OLDEST_SQLITE)
    conn.close()

    async def cuga(*argv: str) -> list[dict[str, object]]:
        args: argparse.Namespace = build_parser().parse_args([*argv, "--json"])
        assert await invoke(args, settings) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    before = {row["component"]: row for row in await cuga("db", "status")}
    assert set(before) == {"coordinator.run_store", "planning.plans", "planning.memory"}
    runs = before["coordinator.run_store"]
    assert runs["version"] == 0
    assert runs["pending"] == [f"{m.version} {m.name}" for m in RUN_STORE_SCHEMA.migrations]
    assert before["planning.plans"]["exists"] is False  # no planning.db yet: not made
    assert not (tmp_path / "data" / "planning.db").exists()
    done = {row["component"]: row for row in await cuga("db", "migrate")}
    assert done["coordinator.run_store"]["version"] == 3
    assert len(done["coordinator.run_store"]["applied"]) == 3  # type: ignore[arg-type]
    assert done["planning.plans"]["version"] == done["planning.memory"]["version"] == 1
    after = await cuga("db", "status")
    assert all(row["pending"] == [] for row in after), after
    columns = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(runs)")}
    assert "owner" in columns
