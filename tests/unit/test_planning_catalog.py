"""The remote tool catalogue (routing + workers, cached) and the static tools file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cuga.common.v1 import common_pb2 as c
from cuga.routing.v1 import routing_pb2
from cuga.services.planning.app import RemoteToolCatalog
from cuga.services.planning.catalog import load_tool_specs_file, tool_specs_to_json
from cuga.services.planning.config import PlanningConfig
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError
from cuga.shared.errors import UnavailableError
from cuga.worker.v1 import worker_pb2
from tests.unit.test_planning_support import TOOLS


def _worker(wid: str, address: str, available: bool = True) -> routing_pb2.WorkerStatus:
    return routing_pb2.WorkerStatus(
        info=routing_pb2.WorkerInfo(worker_id=wid, address=address), available=available
    )


class FakeRouting:
    address = "routing:1"

    def __init__(self, workers: list[routing_pb2.WorkerStatus], fail: bool = False) -> None:
        self.workers, self.fail, self.calls = workers, fail, 0

    async def list_workers(self, request: Any, **kw: Any) -> routing_pb2.ListWorkersResponse:
        self.calls += 1
        if self.fail:
            raise UnavailableError("connection refused")
        # Two pages, to exercise paging.
        if not request.page_token:
            return routing_pb2.ListWorkersResponse(workers=self.workers[:1], next_page_token="p2")
        return routing_pb2.ListWorkersResponse(workers=self.workers[1:])


class FakeWorker:
    def __init__(self, tools: list[c.ToolSpec], fail: bool = False) -> None:
        self.tools, self.fail, self.calls = tools, fail, 0

    async def list_tools(self, request: Any, **kw: Any) -> worker_pb2.ListToolsResponse:
        self.calls += 1
        if self.fail:
            raise UnavailableError("worker down")
        return worker_pb2.ListToolsResponse(tools=self.tools)


def _catalog(
    routing: FakeRouting, workers: dict[str, FakeWorker], clock: FakeClock
) -> RemoteToolCatalog:
    asked: list[tuple[str, str]] = []

    def client(worker_id: str, address: str) -> FakeWorker:
        asked.append((worker_id, address))
        return workers[address]

    catalog = RemoteToolCatalog(routing, client, ttl_s=5, clock=clock)  # type: ignore[arg-type]
    catalog.asked = asked  # type: ignore[attr-defined]
    return catalog


async def test_merges_tools_of_available_workers_and_caches() -> None:
    clock = FakeClock()
    routing = FakeRouting(
        [
            _worker("w1", "h1:1"),
            _worker("w2", "h2:1"),
            _worker("w3", "h3:1", False),
            _worker("w4", "h1:1"),
        ]
    )
    workers = {
        "h1:1": FakeWorker(TOOLS[:2]),
        "h2:1": FakeWorker(TOOLS[1:4]),
        "h3:1": FakeWorker([], fail=True),
    }
    catalog = _catalog(routing, workers, clock)
    tools = await catalog.tools()
    assert sorted(tools) == sorted(t.name for t in TOOLS[:4])
    # Each worker is asked with its own id (its audience), even two at one address.
    assert catalog.asked == [("w1", "h1:1"), ("w2", "h2:1"), ("w4", "h1:1")]  # type: ignore[attr-defined]
    assert workers["h1:1"].calls == 2
    await catalog.tools()
    assert routing.calls == 2  # cached: still the first fetch's two pages
    clock.advance(5)
    await catalog.tools()
    assert routing.calls == 4


async def test_unreachable_routing_or_worker_is_unavailable_naming_it() -> None:
    clock = FakeClock()
    with pytest.raises(UnavailableError, match="routing service at routing:1"):
        await _catalog(FakeRouting([], fail=True), {}, clock).tools()
    with pytest.raises(UnavailableError, match="no available worker"):
        await _catalog(FakeRouting([_worker("w", "h:1", False)]), {}, clock).tools()
    routing = FakeRouting([_worker("w1", "h1:1"), _worker("w2", "h2:1")])
    with pytest.raises(UnavailableError, match="h2:1"):
        await _catalog(
            routing, {"h1:1": FakeWorker(TOOLS), "h2:1": FakeWorker([], fail=True)}, clock
        ).tools()


def test_static_tools_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    path.write_text(tool_specs_to_json(TOOLS))
    assert [t.name for t in load_tool_specs_file(path)] == [t.name for t in TOOLS]
    yaml_path = tmp_path / "tools.yaml"
    yaml_path.write_text("- name: echo\n  cost: 2\n  keywords: [say]\n")
    assert load_tool_specs_file(yaml_path)[0].cost == 2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("- name: a\n- name: a\n", "planning.static_tools_file[1].name"),
        ("- description: x\n", "planning.static_tools_file[0].name"),
        ("- name: a\n  bogus: 1\n", "planning.static_tools_file[0]"),
        ("- name: a\n  cost: -1\n", "planning.static_tools_file[0].cost"),
        ("name: a\n", "planning.static_tools_file"),
        ("[unclosed\n", "planning.static_tools_file"),
    ],
)
def test_bad_static_tools_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_tool_specs_file(path)
    assert info.value.key == key


def test_missing_static_tools_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_tool_specs_file(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"catalog_ttl_s": -1},
        {"rank_threshold": 0},
        {"max_ranked_steps": 0},
        {"memory_similarity_threshold": 1.5},
        {"memory_max_records_per_profile": 0},
        {"embedding_dims": 8},
        {"request_retention_s": 1},
    ],
)
def test_config_checks(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        PlanningConfig(**kwargs)
    assert info.value.key == next(iter(kwargs))
