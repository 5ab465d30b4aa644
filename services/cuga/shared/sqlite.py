"""Embedded SQLite storage: one connection per store, WAL, fsync at checkpoints (``normal``)
or at every commit (``full``), as ``sqlite.synchronous`` says.

Checkpoints run in the background. SQLite's own (``wal_autocheckpoint``) runs inside the
commit that grows the WAL past 1,000 pages, in the committing thread: for the stores that
commit on the event loop (the run store, the worker's idempotency records) that held the
loop 15-20 ms every few hundred steps, two fsyncs and a copy of the WAL into the database,
a stall of every run. So each connection :func:`open_sqlite` makes leaves checkpoints to
one daemon thread per process, which looks at each database's WAL every
:data:`CHECKPOINT_INTERVAL_S` and, when it changed, checkpoints it (PASSIVE: never waits
for the writer) on a connection of its own; SQLite's own stays as a backstop at
:data:`BACKSTOP_CHECKPOINT_PAGES`, should the thread fall behind.

Database files are owner-only (0600) in an owner-only directory (0700), whatever the
umask: the file is created 0600 before SQLite opens it, and SQLite gives the ``-wal`` and
``-shm`` files it creates the main file's mode (checked in
``tests/security/test_file_permissions.py``). Side files an older version left behind
are tightened too.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import weakref
from pathlib import Path

from cuga.shared.config import SQLITE_SYNCHRONOUS, ConfigError
from cuga.shared.files import private_dir, private_file, tighten

log = logging.getLogger("cuga.sqlite")

#: Files SQLite keeps beside a database, named ``<database><suffix>``.
SIDE_FILES = ("-wal", "-shm", "-journal")
#: How often the background checkpointer looks at each database's WAL, seconds.
CHECKPOINT_INTERVAL_S = 0.25
#: WAL pages past which the committing connection checkpoints itself (SQLite's default is
#: 1,000): only when the background checkpointer has fallen that far behind.
BACKSTOP_CHECKPOINT_PAGES = 10_000


class _WalCheckpoint:
    """The background checkpoints of one connection's database (see the module's docstring)."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.lock = threading.Lock()
        self.conn: sqlite3.Connection | None = None
        self.seen: tuple[int, int] | None = None
        self.stopped = False
        self.failing = False
        """The last checkpoint failed (warned once; SQLite's backstop holds meanwhile)."""
        self.abandoned = False
        """Its connection was dropped without being closed: the checkpointer stops it."""

    def abandon(self) -> None:
        """Called by the garbage collector, at any point of any thread (inside :meth:`run`
        or :meth:`_Checkpointer.add` too): it only leaves a mark, taking no lock."""
        self.abandoned = True

    def run(self) -> None:
        """Checkpoint the WAL when it changed since the last look."""
        if self.abandoned:
            self.stop()
            return
        with self.lock:
            if self.stopped:
                return
            try:
                st = os.stat(self.path + "-wal")
            except FileNotFoundError:
                return
            mark = (st.st_mtime_ns, st.st_size)
            if mark == self.seen:
                return
            if self.conn is None:
                self.conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False
                )
                # A checkpoint syncs as its connection's level says: the store's.
                self.conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.seen = mark

    def stop(self) -> None:
        """No more checkpoints; the connection is closed before this returns, so the
        store's own close is the database's last (SQLite then removes the WAL)."""
        with self.lock:
            self.stopped = True
            if self.conn is not None:
                self.conn.close()
                self.conn = None
        _checkpointer.remove(self)


class _Checkpointer:
    """The daemon thread that runs every registered :class:`_WalCheckpoint` in turn."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._due: set[_WalCheckpoint] = set()
        self._thread: threading.Thread | None = None

    def add(self, checkpoint: _WalCheckpoint) -> None:
        with self._lock:
            self._due.add(checkpoint)
            if self._thread is None or not self._thread.is_alive():  # none yet, or forked
                self._thread = threading.Thread(
                    target=self._run, name="sqlite-checkpointer", daemon=True
                )
                self._thread.start()

    def remove(self, checkpoint: _WalCheckpoint) -> None:
        with self._lock:
            self._due.discard(checkpoint)

    def _run(self) -> None:
        tick = threading.Event()  # never set: a timer that does not hold the GIL
        while True:
            tick.wait(CHECKPOINT_INTERVAL_S)
            with self._lock:
                due = list(self._due)
                if not due:
                    self._thread = None
                    return
            for checkpoint in due:
                try:
                    checkpoint.run()
                except sqlite3.Error as exc:  # the next look tries again; the backstop holds
                    log.log(
                        logging.DEBUG if checkpoint.failing else logging.WARNING,
                        "background checkpoint of %s failed (tried again every %.2fs): %s",
                        checkpoint.path,
                        CHECKPOINT_INTERVAL_S,
                        exc,
                    )
                    checkpoint.failing = True
                else:
                    checkpoint.failing = False


_checkpointer = _Checkpointer()


def _forked() -> None:
    # A child has no checkpointer thread, and the parent's may have held its locks at the
    # fork: the child starts afresh (the parent's connections are not the child's to use).
    global _checkpointer
    _checkpointer = _Checkpointer()


os.register_at_fork(after_in_child=_forked)


class _Connection(sqlite3.Connection):
    """A connection whose WAL is checkpointed in the background (see the module's
    docstring); closing it stops that first."""

    wal_checkpoint: _WalCheckpoint | None = None

    def close(self) -> None:
        checkpoint, self.wal_checkpoint = self.wal_checkpoint, None
        if checkpoint is not None:
            checkpoint.stop()
        super().close()


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
    conn = sqlite3.connect(
        str(path), isolation_level=None, check_same_thread=False, factory=_Connection
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    if str(path) != ":memory:":
        conn.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_CHECKPOINT_PAGES}")
        checkpoint = conn.wal_checkpoint = _WalCheckpoint(str(path), synchronous)
        weakref.finalize(conn, checkpoint.abandon)  # a connection dropped unclosed
        _checkpointer.add(checkpoint)
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
