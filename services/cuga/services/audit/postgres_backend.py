"""The backend for several audit replicas: PostgreSQL by DSN (psycopg 3).

Each replica may append at the same time. The log is one sequence of leaves, so a write
transaction first takes the log's advisory lock (``pg_advisory_xact_lock``) and only then
reads the tree and the chain heads: leaf indices, positions in traces and tree nodes stay
consistent, and appends of all replicas are serialised (a batch holds the lock for its
few statements). A concurrent insert of the same record id is caught by the unique key
and the batch is retried, which then sees the stored record.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from cuga.services.audit._sql import POSTGRES_SCHEMA, SqlAuditBackend

#: Session advisory lock key held while creating the schema (replicas start together).
_SCHEMA_LOCK = 0x637567_6175
#: Transaction advisory lock key of the log: every write holds it.
_LOG_LOCK = 0x637567_6176


class PostgresAuditTrail(SqlAuditBackend):
    """Audit records in PostgreSQL; safe with several instances on one database."""

    PH = "%s"

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout_s)
        self._lock = threading.Lock()
        with self._lock, self._conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                cur.execute(POSTGRES_SCHEMA)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
        self._upgrade()

    @contextmanager
    def _transaction(self, traces: Sequence[str]) -> Iterator[Any]:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_LOG_LOCK,))
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
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
        with self._lock:
            self._conn.close()


__all__ = ["PostgresAuditTrail"]
