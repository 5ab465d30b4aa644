"""Embedded SQLite storage: one connection per store, WAL, fsync at checkpoints."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_sqlite(path: str | Path) -> sqlite3.Connection:
    """Open (creating its directory) a SQLite database tuned for a single-writer service.

    WAL with ``synchronous=NORMAL`` keeps every committed transaction across a process
    crash (only an OS crash can lose the last commits), at a fraction of FULL's fsyncs.
    Autocommit is off at the Python level; callers use ``with conn:`` transactions.
    """
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


class Transaction:
    """``with Transaction(conn):`` runs BEGIN IMMEDIATE ... COMMIT/ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


__all__ = ["Transaction", "open_sqlite"]
