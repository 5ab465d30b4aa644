"""WAL checkpoints run in a background thread, not in the commit that grows the WAL
(cuga.shared.sqlite): SQLite's own checkpoint held the event loop of the stores that
commit on it 15-20 ms every few hundred steps (issue 27, B1 p99)."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cuga.shared.sqlite import BACKSTOP_CHECKPOINT_PAGES, Transaction, _checkpointer, open_sqlite

#: More WAL than SQLite's default auto-checkpoint (1,000 pages of 4 KiB) would let a commit
#: leave unchecked: with it, the commit itself would have copied this into the database.
BYTES = 5 * 1024 * 1024
ROW = 8 * 1024


def _write(conn: object, rows: int) -> None:
    with Transaction(conn) as c:  # type: ignore[arg-type]
        c.executemany("INSERT INTO t (b) VALUES (?)", [(os.urandom(ROW),) for _ in range(rows)])


def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Wait for another thread's work: re-checked every 20 ms, with a deadline."""
    end = time.monotonic() + timeout_s
    pause = threading.Event()
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        pause.wait(0.02)


def test_the_commit_leaves_the_checkpoint_to_the_background_thread(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    conn = open_sqlite(db)
    try:
        assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == BACKSTOP_CHECKPOINT_PAGES
        conn.execute("CREATE TABLE t (b BLOB)")
        checkpoint = conn.wal_checkpoint  # type: ignore[attr-defined]
        with checkpoint.lock:  # the background thread cannot checkpoint meanwhile
            _write(conn, BYTES // ROW)
            # The commit copied nothing into the database: the 5 MiB are in the WAL only.
            assert db.stat().st_size < BYTES // 10
            assert Path(f"{db}-wal").stat().st_size >= BYTES
        # ... until the background thread checkpoints them.
        _until(lambda: db.stat().st_size >= BYTES, "the background checkpoint")
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == BYTES // ROW
    finally:
        conn.close()


@pytest.mark.parametrize(("level", "number"), [("normal", 1), ("full", 2)])
def test_the_checkpoint_syncs_at_the_stores_durability(
    tmp_path: Path, level: str, number: int
) -> None:
    conn = open_sqlite(tmp_path / "store.db", synchronous=level)
    try:
        conn.execute("CREATE TABLE t (b BLOB)")
        _write(conn, 4)
        checkpoint = conn.wal_checkpoint  # type: ignore[attr-defined]
        _until(lambda: checkpoint.seen is not None, "the background checkpoint")
        assert checkpoint.conn.execute("PRAGMA synchronous").fetchone()[0] == number
    finally:
        conn.close()


def test_closing_stops_the_checkpoints_so_the_close_removes_the_wal(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    conn = open_sqlite(db)
    conn.execute("CREATE TABLE t (b BLOB)")
    _write(conn, 4)
    checkpoint = conn.wal_checkpoint  # type: ignore[attr-defined]
    _until(lambda: checkpoint.conn is not None, "the checkpointer's connection")
    conn.close()
    assert checkpoint.stopped and checkpoint.conn is None
    assert checkpoint not in _checkpointer._due
    # The store's close was the database's last: SQLite checkpointed and removed the WAL.
    assert not Path(f"{db}-wal").exists()
    assert db.stat().st_size >= 4 * ROW


def test_an_in_memory_database_has_no_checkpoints() -> None:
    conn = open_sqlite(":memory:")
    try:
        assert conn.wal_checkpoint is None  # type: ignore[attr-defined]
    finally:
        conn.close()


def test_a_connection_dropped_unclosed_is_let_go_by_the_checkpointer(tmp_path: Path) -> None:
    conn = open_sqlite(tmp_path / "store.db")
    conn.execute("CREATE TABLE t (b BLOB)")
    _write(conn, 4)
    checkpoint = conn.wal_checkpoint  # type: ignore[attr-defined]
    # The collector may finalize a connection while this thread holds the checkpointer's
    # locks (an allocation inside add() or run() starts a collection): the finalizer must
    # not wait for them. Taking them here first made it deadlock.
    with _checkpointer._lock, checkpoint.lock:
        del conn
        gc.collect()
    assert checkpoint.abandoned
    _until(
        lambda: checkpoint not in _checkpointer._due and checkpoint.stopped,
        "the checkpointer to let the dropped connection go",
    )
    assert checkpoint.conn is None


def test_a_forked_child_opens_databases_while_the_parents_checkpointer_held_its_lock(
    tmp_path: Path,
) -> None:
    # A child inherits the parent's locks as they were at the fork, held by threads it
    # does not have: with the parent's checkpointer held mid-pass, a child opening a
    # database would wait forever, unless the child starts a checkpointer of its own.
    import cuga.shared.sqlite as sqlite_module

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sqlite_module._checkpointer._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: open, write, close, exit 0
            status = 1
            try:
                conn = open_sqlite(tmp_path / "child.db")
                conn.execute("CREATE TABLE t (b BLOB)")
                conn.close()
                status = 0
            finally:
                os._exit(status)
        status: list[int] = []

        def exited() -> bool:
            done, code = os.waitpid(pid, os.WNOHANG)
            status.extend([code] if done else [])
            return bool(done)

        try:
            _until(exited, "the child to open a database (it hangs on the parent's lock)")
        finally:
            if not status:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status[0]) == 0
    finally:
        release.set()
        holder.join()
