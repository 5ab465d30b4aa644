"""A throwaway PostgreSQL cluster for tests (see /work/shared/ENVIRONMENT.md).

``postgres_cluster`` (session scope) runs ``initdb`` and ``pg_ctl start`` in a temp dir on a
free port, once per process: each xdist worker gets its own cluster, shared by every module.
``postgres_dsn`` gives every test a fresh database. The server refuses to run as root, so
as root the binaries run through ``runuser -u postgres`` with the directory owned by
``postgres``.

tests/conftest.py provides both to every test, and the ``storage`` parametrisation over
SQLite and PostgreSQL (:class:`tests.support.servers.Storage`); modules that import them
too share the same cluster. When ``initdb``/``pg_ctl`` are not on PATH the tests that use
them are skipped with that reason; any other failure is an error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.ports import free_port


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster."""

    host: str
    port: int
    user: str

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN for one database of the cluster."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


@contextmanager
def _running_cluster() -> Iterator[PostgresCluster]:
    """Start a cluster in a temp dir; stop and delete it on exit."""
    root = Path(tempfile.mkdtemp(prefix="cuga-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    started = False
    try:
        _run(["initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
        error: Exception | None = None
        port = 0
        for _ in range(3):  # another process may take the free port before we bind it
            port = free_port()
            options = (
                f"-k {root} -p {port} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                _run(
                    [
                        "pg_ctl",
                        "-D",
                        str(data),
                        "-o",
                        options,
                        "-l",
                        str(root / "log"),
                        "-w",
                        "start",
                    ]
                )
                started = True
                break
            except RuntimeError as exc:
                error = exc
        if not started:
            raise RuntimeError(f"cannot start PostgreSQL: {error}")
        yield PostgresCluster("127.0.0.1", port, "postgres")
    finally:
        if started:
            _run(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


class _Shared:
    """The process's one cluster, shared by every definition of the fixture.

    Each module that imports ``postgres_cluster`` (and tests/conftest.py) is its own
    fixture definition to pytest, so a plain session fixture started one cluster per
    module; counting users keeps one per process (per xdist worker), stopped when the
    last definition is torn down at the end of the session.
    """

    stack: ExitStack | None = None
    cluster: PostgresCluster | None = None
    users = 0

    @classmethod
    def acquire(cls) -> PostgresCluster:
        if cls.cluster is None:
            stack = ExitStack()
            cls.cluster = stack.enter_context(_running_cluster())
            cls.stack = stack
        cls.users += 1
        return cls.cluster

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0 and cls.stack is not None:
            stack, cls.stack, cls.cluster = cls.stack, None, None
            stack.close()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """The cluster of this session (this worker), stopped and deleted afterwards."""
    missing = [b for b in ("initdb", "pg_ctl") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"PostgreSQL binaries not on PATH: {', '.join(missing)}")
    cluster = _Shared.acquire()
    try:
        yield cluster
    finally:
        _Shared.release()


@pytest.fixture
def postgres_dsn(postgres_cluster: PostgresCluster) -> Iterator[str]:
    """A DSN of a fresh, empty database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_cluster.dsn(name)
    finally:
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


__all__ = ["PostgresCluster", "postgres_cluster", "postgres_dsn"]
