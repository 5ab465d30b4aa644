"""The backend for several audit replicas: PostgreSQL by DSN (psycopg 3).

Each replica may append to the same trace at the same time; a transaction takes
``pg_advisory_xact_lock(hashtext(trace_id))`` for every trace it touches (in sorted order,
so two batches never deadlock) before it reads the chain head, so chain positions and
``prev_hash`` links stay consistent. A hash collision of two trace ids only makes them
wait for each other. A concurrent insert of the same record id under another trace is
caught by the primary key and the batch is retried, which then sees the stored record.
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

    @contextmanager
    def _transaction(self, traces: Sequence[str]) -> Iterator[Any]:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            for trace in sorted(traces):
                cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (trace,))
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._lock, self._conn.transaction(), self._conn.cursor() as cur:
            yield cur

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
