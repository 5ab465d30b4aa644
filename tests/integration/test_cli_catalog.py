"""``cuga tools`` and ``cuga workers`` read every page (issue 24).

A worker whose pages hold two tools, and routing with more workers than its default page
(100): both commands follow ``next_page_token`` to the end, as tables and as ``--json``
lines, and ``--tool`` keeps only the workers offering that tool.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.cli.main import build_parser, invoke
from cuga.client import RoutingClient
from cuga.routing.v1 import routing_pb2
from cuga.services.worker.app import build as build_worker
from cuga.shared.config import Settings
from cuga.shared.validation import DEFAULT_PAGE_SIZE
from tests.support.servers import (
    Cluster,
    make_settings,
    running_cluster,
    running_service,
    signed_as,
    token_of,
    with_section,
)

TOOLS = ["calculator", "echo", "sleep"]


@pytest.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("CUGA_TOKEN", token_of("operator"))  # what the CLI sends
    async with running_cluster(make_settings(tmp_path / "data")) as running:
        yield running


async def _cuga(
    settings: Settings, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    args: argparse.Namespace = build_parser().parse_args(list(argv))
    code = await invoke(args, settings)
    return code, capsys.readouterr().out


async def test_tools_follows_the_pages_of_a_worker(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = cluster.settings
    limits = dataclasses.replace(settings.common.limits, max_page_size=2)
    small = with_section(
        settings.with_overrides(limits=limits), "worker", worker_id="w-small", tools=TOOLS
    )
    async with running_service("worker", build_worker, small) as worker:
        code, shown = await _cuga(settings, capsys, "tools", "--address", worker.address, "--json")
        assert code == 0
        specs = [json.loads(line) for line in shown.splitlines()]
        assert sorted(s["name"] for s in specs) == TOOLS
        code, shown = await _cuga(settings, capsys, "tools", "--address", worker.address)
    assert code == 0
    assert f"tools of the worker at {worker.address}" in shown
    rows = {line.split("│")[1].strip() for line in shown.splitlines() if "│" in line}
    assert set(TOOLS) <= rows, shown


async def test_workers_follows_the_pages_of_routing(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = cluster.settings
    extra = DEFAULT_PAGE_SIZE + 5
    async with RoutingClient(
        cluster.address("routing"), metadata=signed_as("worker", "routing")
    ) as routing:
        for i in range(extra):
            await routing.register_worker(
                routing_pb2.RegisterWorkerRequest(
                    request_id=f"reg-{i}",
                    worker=routing_pb2.WorkerInfo(
                        worker_id=f"w-{i:03}",
                        address=f"127.0.0.1:{20000 + i}",
                        tools=["archive_scan"],
                    ),
                )
            )
    code, shown = await _cuga(settings, capsys, "workers", "--json")
    assert code == 0
    ids = [json.loads(line)["info"]["worker_id"] for line in shown.splitlines()]
    assert len(ids) == extra + 1 and len(set(ids)) == extra + 1 and "worker-1" in ids

    code, shown = await _cuga(settings, capsys, "workers", "--tool", "archive_scan")
    assert code == 0 and "registered workers" in shown
    rows = [line for line in shown.splitlines() if "127.0.0.1:" in line]
    assert len(rows) == extra, shown
    assert all(" archive_scan" in row and " yes " in row for row in rows)
    assert "worker-1" not in shown  # it does not offer archive_scan
