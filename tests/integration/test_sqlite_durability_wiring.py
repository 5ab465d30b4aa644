"""``sqlite.synchronous`` reaches every SQLite store the services and the embedded engine
open (issue 27): the six services through the production bootstrap, and
``create_coordinator``, each read back from the open connections themselves."""

from __future__ import annotations

import contextlib
import gc
import sqlite3
from pathlib import Path

import pytest

from cuga.orchestrator import create_coordinator
from tests.support.servers import make_settings, running_cluster

LEVEL = {"normal": 1, "full": 2}


def _levels_under(data_dir: Path) -> dict[str, int]:
    """PRAGMA synchronous of every open SQLite connection whose file is under
    ``data_dir``, by file name."""
    found: dict[str, int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, sqlite3.Connection):
            continue
        with contextlib.suppress(sqlite3.ProgrammingError):  # a closed connection
            file = obj.execute("PRAGMA database_list").fetchone()[2]
            if file and Path(file).is_relative_to(data_dir.resolve()):
                found[Path(file).name] = int(obj.execute("PRAGMA synchronous").fetchone()[0])
    return found


@pytest.mark.parametrize("level", ["full", "normal"])
async def test_every_service_store_runs_at_the_configured_level(tmp_path: Path, level: str) -> None:
    env = {"CUGA_SQLITE__SYNCHRONOUS": level} if level != "normal" else {}
    data = tmp_path / "data"
    async with running_cluster(make_settings(data, env=env)):
        levels = _levels_under(data)
    names = set(levels)
    assert {"coordinator.db", "planning.db", "approval.db", "audit.db", "routing.db"} <= names
    assert any(name.startswith("worker-") for name in names), names
    assert set(levels.values()) == {LEVEL[level]}, levels


@pytest.mark.parametrize("level", ["full", "normal"])
async def test_every_embedded_store_runs_at_the_configured_level(
    tmp_path: Path, level: str
) -> None:
    env = {"CUGA_SQLITE__SYNCHRONOUS": level} if level != "normal" else {}
    data = tmp_path / "data"
    agent = await create_coordinator(settings=make_settings(data, env=env))
    try:
        levels = _levels_under(data)
    finally:
        await agent.close()
    assert {"coordinator.db", "planning.db", "approval.db", "audit.db"} <= set(levels), levels
    assert set(levels.values()) == {LEVEL[level]}, levels
