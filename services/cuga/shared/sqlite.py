"""Embedded SQLite storage: one connection per store, WAL, fsync at checkpoints (``normal``)
or at every commit (``full``), as ``sqlite.synchronous`` says.

Database files are owner-only (0600) in an owner-only directory (0700), whatever the
umask: the file is created 0600 before SQLite opens it, and SQLite gives the ``-wal`` and
``-shm`` files it creates the main file's mode (checked in
``tests/security/test_file_permissions.py``). Side files an older version left behind
are tightened too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cuga.shared.config import SQLITE_SYNCHRONOUS, ConfigError
from cuga.shared.files import private_dir, private_file, tighten

#: Files SQLite keeps beside a database, named ``<database><suffix>``.
SIDE_FILES = ("-wal", "-shm", "-journal")


def open_sqlite(path: str | Path, *, synchronous: str = "normal") -> sqlite3.Connection:
    """Open (creating it and its directory, owner-only) a SQLite database tuned for a
    single-writer service.

    ``synchronous`` is the configured durability (``sqlite.synchronous``, see
    :class:`cuga.shared.config.SqliteConfig`): WAL with ``normal`` keeps every committed
    transaction across a process crash (only an OS crash can lose the last commits), at a
    fraction of ``full``'s fsyncs; ``full`` syncs every commit. Autocommit is off at the
    Python level; callers use ``with conn:`` transactions.

    Raises:
        ConfigError: ``synchronous`` is not ``normal`` or ``full`` (names
            ``sqlite.synchronous``).
    """
    if synchronous not in SQLITE_SYNCHRONOUS:
        raise ConfigError(
            "sqlite.synchronous",
            f"must be one of {', '.join(SQLITE_SYNCHRONOUS)}, got {synchronous!r}",
        )
    if str(path) != ":memory:":
        file = Path(path)
        private_dir(file.parent)
        private_file(file)
        for suffix in SIDE_FILES:
            tighten(file.with_name(file.name + suffix))
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
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
