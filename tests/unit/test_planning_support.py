"""Shared helpers for the planning unit tests (a static catalogue and a planner factory).

Imported by the other test_planning_* modules; it holds no tests itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2
from cuga.services.planning.catalog import StaticToolCatalog
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.domain import Planner
from cuga.services.planning.memory import HashingEmbedder, VectorMemory
from cuga.services.planning.store import PlanStore
from cuga.shared.clock import FakeClock
from cuga.shared.config import Limits
from cuga.shared.messages import to_struct
from cuga.shared.sqldb import Database, PostgresDatabase, SQLiteDatabase
from cuga.shared.sqlite import open_sqlite

#: Where planning stores: a data directory (SQLite) or a PostgreSQL DSN.
Location = Path | str


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Each storage backend in turn. A module using it imports ``postgres_cluster`` and
    ``postgres_dsn`` from ``tests.support.postgres``."""
    if request.param == "sqlite":
        return tmp_path
    return str(request.getfixturevalue("postgres_dsn"))


def open_db(location: Location, name: str = "planning.db") -> Database:
    """A connection to planning's database at ``location``."""
    if isinstance(location, Path):
        return SQLiteDatabase(open_sqlite(location / name))
    return PostgresDatabase(location)


def tool(
    name: str,
    *,
    description: str = "",
    keywords: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
    cost: float = 1.0,
) -> common_pb2.ToolSpec:
    spec = common_pb2.ToolSpec(
        name=name, description=description, keywords=list(keywords), cost=cost
    )
    if params is not None:
        spec.parameters.CopyFrom(to_struct(params))
    return spec


def string_param(name: str) -> dict[str, Any]:
    return {"type": "object", "properties": {name: {"type": "string"}}, "required": [name]}


TOOLS = [
    tool(
        "weather.forecast",
        description="Get the weather forecast for a city",
        keywords=("weather", "forecast", "temperature"),
        params=string_param("city"),
        cost=2.0,
    ),
    tool(
        "web.search",
        description="Search the web for pages about a topic",
        keywords=("search", "web", "lookup"),
        params=string_param("query"),
        cost=1.0,
    ),
    tool(
        "math.add",
        description="Add two numbers",
        keywords=("add", "sum"),
        params={
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        cost=1.0,
    ),
    tool("echo", description="Echo the input back", params={"type": "object"}, cost=0.5),
    tool(
        "summarize",
        description="Summarize a text",
        keywords=("summary", "summarize"),
        params={"type": "object", "properties": {"text": {"type": "string", "maxLength": 10}}},
        cost=3.0,
    ),
]


def step(
    step_id: str,
    tool_name: str = "echo",
    *,
    deps: tuple[str, ...] = (),
    input: dict[str, Any] | None = None,
    cost: float = 0.0,
) -> common_pb2.PlanStep:
    s = common_pb2.PlanStep(
        step_id=step_id, tool=tool_name, depends_on=list(deps), estimated_cost=cost
    )
    if input is not None:
        s.input.CopyFrom(to_struct(input))
    return s


def make_planner(
    data_dir: Location,
    *,
    tools: list[common_pb2.ToolSpec] | None = None,
    config: PlanningConfig | None = None,
    limits: Limits | None = None,
    clock: FakeClock | None = None,
) -> tuple[Planner, PlanStore, VectorMemory]:
    clock = clock or FakeClock()
    conn = open_db(data_dir)
    store = PlanStore(conn)
    memory = VectorMemory(conn, HashingEmbedder(256), clock=clock)
    planner = Planner(
        store,
        StaticToolCatalog(TOOLS if tools is None else tools),
        memory,
        config=config,
        limits=limits,
        clock=clock,
    )
    return planner, store, memory


def explicit(
    *steps: common_pb2.PlanStep, goal: str = "do things", **kw: Any
) -> planning_pb2.CreatePlanRequest:
    return planning_pb2.CreatePlanRequest(
        goal=goal, steps=list(steps), mode=common_pb2.PLANNING_MODE_EXPLICIT, **kw
    )
