"""``cuga db status|migrate`` as docs/operations.md shows them (issue 24).

The text an operator reads (a store part-way through its migrations, then up to date) on
SQLite and on PostgreSQL, the PostgreSQL password never printed, and a database that cannot
be used refused through the real ``cuga`` script as one line with exit code 5 naming the
configuration key, never as an internal error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cuga.cli._output import ExitCode
from cuga.cli.main import build_parser, invoke
from cuga.orchestrator._runstore import RUN_STORE_SCHEMA
from cuga.shared.migrations import Schema
from cuga.shared.sqldb import Database, PostgresDatabase, SQLiteDatabase
from cuga.shared.sqlite import open_sqlite
from tests.support.ports import free_ports
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import make_settings

CUGA = [sys.executable, "-m", "cuga.cli.main"]


def _first_migration_only(db: Database) -> None:
    """The run store as the first release left it: migration 1 applied, 2 and 3 pending."""
    Schema(RUN_STORE_SCHEMA.component, RUN_STORE_SCHEMA.migrations[:1], 1).migrate(db)


async def _cuga(settings_env: dict[str, str], data: Path, *argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return await invoke(args, make_settings(data, settings_env))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_status_shows_what_is_pending_and_migrate_applies_it(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    data = tmp_path / "data"
    env: dict[str, str] = {}
    if backend == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")
        dsn_with_password = f"{dsn} password=s3cret-pw"  # trust auth ignores it
        env = {
            "CUGA_COORDINATOR__RUN_STORE": "postgres",
            "CUGA_COORDINATOR__DSN": dsn_with_password,
            "CUGA_PLANNING__STORE": "postgres",
            "CUGA_PLANNING__DSN": dsn_with_password,
        }
        db: Database = PostgresDatabase(dsn)
        where = "postgres:dbname="
    else:
        data.mkdir()
        db = SQLiteDatabase(open_sqlite(data / "coordinator.db"))
        where = f"sqlite:{data / 'coordinator.db'}"
    try:
        _first_migration_only(db)
    finally:
        db.close()

    assert await _cuga(env, data, "db", "status") == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines[0]
    assert first.startswith(f"coordinator.run_store: {where}") and first.endswith(
        ": version 1 of 3; pending:"
    )
    assert [x.strip() for x in lines[1:3]] == [
        f"{m.version} {m.name}" for m in RUN_STORE_SCHEMA.migrations[1:]
    ]
    planning = lines[3:]
    if backend == "sqlite":
        assert planning == [
            f"planning.plans: sqlite:{data / 'planning.db'}: no database yet",
            f"planning.memory: sqlite:{data / 'planning.db'}: no database yet",
        ]
    else:  # the database exists: its planning stores are at version 0, all pending
        assert planning[0].startswith("planning.plans: postgres:dbname=")
        assert planning[0].endswith(": version 0 of 1; pending:")

    assert await _cuga(env, data, "db", "migrate") == 0
    applied = capsys.readouterr().out
    assert "coordinator.run_store: applied 2 " in applied
    assert "coordinator.run_store: applied 1 " not in applied  # already there

    assert await _cuga(env, data, "db", "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(x.endswith("(up to date)") for x in lines), lines
    assert lines[0].startswith(f"coordinator.run_store: {where}")
    assert "s3cret-pw" not in applied + "\n".join(lines)
    if backend == "postgres":
        assert "password" not in "\n".join(lines)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env.update({"CUGA_DATA_DIR": str(tmp_path / "data"), "CUGA_LOG_LEVEL": "WARNING", **extra})
    return env


def _cuga_script(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CUGA, *argv], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_a_database_that_cannot_be_reached_is_one_line_naming_the_key(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    dsn = f"postgresql://cuga:s3cret-pw@127.0.0.1:{port}/cuga"
    env = _env(tmp_path, CUGA_COORDINATOR__RUN_STORE="postgres", CUGA_COORDINATOR__DSN=dsn)
    for argv in (("db", "status"), ("db", "migrate")):
        done = _cuga_script(env, *argv)
        assert done.returncode == ExitCode.CONFIG, done.stderr
        assert done.stderr.startswith(
            f"error: postgres:dbname=cuga host=127.0.0.1 port={port} user=cuga"
            " (coordinator.dsn): cannot connect: "
        )
        assert "Connection refused" in done.stderr
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert "s3cret-pw" not in done.stderr


def test_a_malformed_dsn_is_a_configuration_error_naming_the_key(tmp_path: Path) -> None:
    env = _env(tmp_path, CUGA_PLANNING__STORE="postgres", CUGA_PLANNING__DSN="host is here")
    done = _cuga_script(env, "db", "status", "--json")
    assert done.returncode == ExitCode.CONFIG, done.stderr
    (line,) = done.stderr.splitlines()
    assert '"planning.dsn: not a libpq connection string or URI: missing' in line
    assert '"exit_code": 5' in line
