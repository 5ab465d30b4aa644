"""The backend for several audit replicas: PostgreSQL by DSN (psycopg 3).

Each replica may append at the same time. The log is one sequence of leaves, so a write
transaction first takes the log's advisory lock (``pg_advisory_xact_lock``) and only then
reads the tree and the chain heads: leaf indices, positions in traces and tree nodes stay
consistent, and appends of all replicas are serialised (a batch holds the lock for its
few statements). A concurrent insert of the same record id is caught by the unique key
and the batch is retried, which then sees the stored record.

Connections come from a bounded pool (``audit.pool``: psycopg_pool's
:class:`~psycopg_pool.ConnectionPool`), one per transaction. Audit backends are
synchronous and the service calls them on worker threads (:mod:`.backend`), so the pool
is the synchronous one: a slow query holds its worker thread and one connection, while
other calls run on other connections (before, one connection behind one lock made every
call of the replica wait for the slowest). A call finding no connection free within
``audit.pool.timeout_s`` fails RESOURCE_EXHAUSTED (or UNAVAILABLE), naming the keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from cuga.services.audit._sql import POSTGRES_SCHEMA, SqlAuditBackend
from cuga.shared.sqldb import PoolConfig, pool_refusal

#: Session advisory lock key held while creating the schema (replicas start together).
_SCHEMA_LOCK = 0x637567_6175
#: Transaction advisory lock key of the log: every write holds it.
_LOG_LOCK = 0x637567_6176


class PostgresAuditTrail(SqlAuditBackend):
    """Audit records in PostgreSQL; safe with several instances on one database.

    Args:
        dsn: libpq connection string or URI.
        pool: the connection pool's sizes and timeouts (``audit.pool``).

    Raises:
        psycopg.OperationalError: the database cannot be reached.
    """

    PH = "%s"

    def __init__(self, dsn: str, *, pool: PoolConfig | None = None) -> None:
        self.config = pool or PoolConfig()
        self.pool: ConnectionPool[Any] = ConnectionPool(
            dsn,
            min_size=self.config.min_size,
            max_size=self.config.max_size,
            timeout=self.config.timeout_s,
            open=False,
            name="cuga-audit",
            kwargs={"autocommit": True, "connect_timeout": self.config.connect_timeout_s},
        )
        self.pool.open(wait=False)
        try:
            # The schema's session lock lives on one connection, held for the whole block.
            with self._connection(self.config.connect_timeout_s) as conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
                try:
                    cur.execute(POSTGRES_SCHEMA)
                finally:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
        except Exception:
            self.pool.close()
            raise
        self._upgrade()

    @contextmanager
    def _connection(self, timeout: float | None = None) -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = self.pool.getconn(timeout)
        except PoolTimeout:
            if timeout is not None:  # at start: say that the database is out of reach
                raise psycopg.OperationalError(
                    f"cannot connect to PostgreSQL within {timeout:g} s"
                ) from None
            raise pool_refusal("audit", self.config, self.pool.get_stats()) from None
        try:
            yield conn
        finally:
            self.pool.putconn(conn)

    @contextmanager
    def _transaction(self, traces: Sequence[str]) -> Iterator[Any]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOG_LOCK,))
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._connection() as conn, conn.transaction(), conn.cursor() as cur:
            yield cur

    def _columns(self, cur: Any) -> set[str]:
        cur.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'audit_records'"
        )
        return {str(row[0]) for row in cur.fetchall()}

    def _is_retryable(self, exc: Exception) -> bool:
        return isinstance(
            exc,
            pg_errors.UniqueViolation | pg_errors.SerializationFailure | pg_errors.DeadlockDetected,
        )

    def _is_key_conflict(self, exc: Exception) -> bool:
        return isinstance(exc, pg_errors.UniqueViolation)

    def close(self) -> None:
        self.pool.close()


__all__ = ["PostgresAuditTrail"]
