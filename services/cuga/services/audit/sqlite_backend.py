"""The embedded default backend: one SQLite file (WAL) under the data directory."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cuga.services.audit._sql import SCHEMA, SqlAuditBackend
from cuga.shared.sqlite import Transaction, open_sqlite


class SQLiteAuditTrail(SqlAuditBackend):
    """Audit records in a SQLite database (``<data_dir>/audit.db`` by default).

    One connection serialised by a lock: a single service process is the only writer, and
    ``BEGIN IMMEDIATE`` makes each batch one atomic transaction.
    """

    PH = "?"

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        self.path = Path(path)
        self._conn = open_sqlite(path, synchronous=synchronous)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.executescript(SCHEMA)
        self._upgrade()

    @contextmanager
    def _transaction(self, traces: Sequence[str]) -> Iterator[sqlite3.Cursor]:
        # The one lock and BEGIN IMMEDIATE serialise every append: the log's write lock.
        with self._lock, Transaction(self._conn) as conn:
            yield conn.cursor()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            yield self._conn.cursor()

    def _columns(self, cur: sqlite3.Cursor) -> set[str]:
        return {str(row[1]) for row in cur.execute("PRAGMA table_info(audit_records)")}

    def _is_key_conflict(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


__all__ = ["SQLiteAuditTrail"]
