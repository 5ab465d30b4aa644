"""The durability of the embedded SQLite stores is one setting, ``sqlite.synchronous``
(``normal`` | ``full``, PRAGMA synchronous; issue 27): validated at load naming the key,
and reaching the connection of every store (read back from the connection itself)."""

from __future__ import annotations

import inspect
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cuga.orchestrator._runstore import SQLiteRunStore, open_run_store, run_inline
from cuga.services.approval.store import SQLiteApprovalStore, open_approval_store
from cuga.services.audit.config import AuditConfig
from cuga.services.audit.domain import open_backend
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.store import open_database
from cuga.services.routing.registry import SQLiteWorkerStore
from cuga.services.worker.store import IdempotencyStore
from cuga.shared.config import ConfigError, load_settings
from cuga.shared.sqlite import open_sqlite

#: PRAGMA synchronous reads back as a number.
LEVEL = {"normal": 1, "full": 2}


def test_the_default_is_normal_and_the_environment_can_say_full() -> None:
    assert load_settings(env={}).common.sqlite.synchronous == "normal"
    settings = load_settings(env={"CUGA_SQLITE__SYNCHRONOUS": "full"})
    assert settings.common.sqlite.synchronous == "full"


def test_the_file_sets_it(tmp_path: Path) -> None:
    config = tmp_path / "cuga.yaml"
    config.write_text("sqlite:\n  synchronous: full\n")
    assert load_settings(config, env={}).common.sqlite.synchronous == "full"


@pytest.mark.parametrize("value", ["off", "FULLY", "extra", 2, ""])
def test_a_bad_level_is_refused_naming_the_key(value: object) -> None:
    env = {"CUGA_SQLITE__SYNCHRONOUS": str(value)}
    with pytest.raises(ConfigError) as refused:
        load_settings(env=env)
    assert refused.value.key == "sqlite.synchronous"
    assert "normal, full" in str(refused.value)


def test_an_unknown_key_of_the_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"sqlite\.fsync"):
        load_settings(env={"CUGA_SQLITE__FSYNC": "true"})


def test_open_sqlite_refuses_a_level_it_does_not_know(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        open_sqlite(tmp_path / "x.db", synchronous="off")
    assert refused.value.key == "sqlite.synchronous"
    assert not (tmp_path / "x.db").exists() or (tmp_path / "x.db").stat().st_size == 0


def _connection(store: Any) -> sqlite3.Connection:
    """The store's own connection, found by walking its attributes."""
    seen: set[int] = set()
    todo = [store]
    while todo:
        obj = todo.pop()
        if isinstance(obj, sqlite3.Connection):
            return obj
        if id(obj) in seen or not hasattr(obj, "__dict__"):
            continue
        seen.add(id(obj))
        todo.extend(vars(obj).values())
    raise AssertionError(f"no sqlite3 connection in {store!r}")


def _level(store: Any) -> int:
    return int(_connection(store).execute("PRAGMA synchronous").fetchone()[0])


STORES: dict[str, Callable[[Path, str], Any]] = {
    "run store": lambda d, s: SQLiteRunStore(d / "coordinator.db", synchronous=s),
    "run store (opener)": lambda d, s: run_inline(
        open_run_store("sqlite", data_dir=d, synchronous=s)
    ),
    "planning": lambda d, s: open_database(PlanningConfig(), d, synchronous=s),
    "approval": lambda d, s: SQLiteApprovalStore(d / "approval.db", synchronous=s),
    "approval (opener)": lambda d, s: open_approval_store("sqlite", data_dir=d, synchronous=s),
    "audit": lambda d, s: SQLiteAuditTrail(d / "audit.db", synchronous=s),
    "audit (opener)": lambda d, s: open_backend(AuditConfig(), d, synchronous=s),
    "worker idempotency": lambda d, s: IdempotencyStore(d / "worker.db", synchronous=s),
    "routing registry": lambda d, s: SQLiteWorkerStore(d / "routing.db", synchronous=s),
}


@pytest.mark.parametrize("level", sorted(LEVEL))
@pytest.mark.parametrize("store", sorted(STORES))
def test_every_store_runs_at_the_level_it_was_given(tmp_path: Path, store: str, level: str) -> None:
    opened = STORES[store](tmp_path, level)
    try:
        assert _level(opened) == LEVEL[level]
        assert _connection(opened).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        closed = opened.close()
        if inspect.isawaitable(closed):  # the run store's close is awaited (inline: SQLite)
            run_inline(closed)


@pytest.mark.parametrize("store", sorted(STORES))
def test_every_store_refuses_a_bad_level_naming_the_key(tmp_path: Path, store: str) -> None:
    with pytest.raises(ConfigError, match=r"'sqlite\.synchronous'"):
        STORES[store](tmp_path, "sometimes")
