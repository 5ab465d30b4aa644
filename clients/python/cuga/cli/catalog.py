"""``cuga tools`` and ``cuga workers``: what a worker offers, and who is registered.

Both call as the local ``demo-operator`` (role ``operator``, docs/security.md) unless
``$CUGA_TOKEN`` says otherwise: ``cuga tools`` asks a worker's ``ListTools`` (the
configured worker, or ``--address``), ``cuga workers`` asks routing's ``ListWorkers``.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from cuga.cli._output import json_line, out
from cuga.cli.tokens import cli_token
from cuga.client import RoutingClient, WorkerClient
from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings
from cuga.worker.v1 import worker_pb2


def _security(settings: Settings) -> dict[str, Any]:
    tls = settings.common.tls
    return {
        "metadata": bearer_metadata(cli_token(settings.common.data_dir, "operator")),
        "credentials": tls.channel_credentials(),
        "channel_options": tls.channel_options(),
    }


async def _tools(args: argparse.Namespace, settings: Settings) -> int:
    address = args.address or settings.common.addresses.worker
    tools: list[common_pb2.ToolSpec] = []
    async with WorkerClient(
        address, call=settings.common.calls.worker, **_security(settings)
    ) as client:
        token = ""
        while True:
            page = await client.list_tools(worker_pb2.ListToolsRequest(page_token=token))
            tools.extend(page.tools)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        for tool in tools:
            json_line(tool)
        return 0
    table = Table(title=f"tools of the worker at {address}")
    for column in ("name", "capabilities", "sensitive", "cost", "timeout", "description"):
        table.add_column(column, no_wrap=column == "name")
    for t in tools:
        table.add_row(
            t.name,
            ", ".join(t.capabilities),
            "yes" if t.sensitive else "",
            f"{t.cost:g}",
            f"{t.timeout.ToNanoseconds() / 1e9:g}s",
            t.description,
        )
    out().print(table)
    return 0


async def _workers(args: argparse.Namespace, settings: Settings) -> int:
    workers: list[routing_pb2.WorkerStatus] = []
    async with RoutingClient(
        settings.common.addresses.routing, call=settings.common.calls.routing, **_security(settings)
    ) as client:
        token = ""
        while True:
            page = await client.list_workers(
                routing_pb2.ListWorkersRequest(page_token=token, tool=args.tool)
            )
            workers.extend(page.workers)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        for worker in workers:
            json_line(worker)
        return 0
    table = Table(title="registered workers")
    for column in ("id", "address", "available", "in flight", "tools"):
        table.add_column(column, no_wrap=column in ("id", "address"))
    for w in workers:
        table.add_row(
            w.info.worker_id,
            w.info.address,
            "yes" if w.available else "no (missed heartbeats)",
            str(w.in_flight),
            ", ".join(w.info.tools),
        )
    out().print(table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``tools`` and ``workers``."""
    p = sub.add_parser("tools", help="list the tools a worker runs (its ListTools)")
    p.add_argument(
        "--address", default="", help="host:port of the worker (default: addresses.worker)"
    )
    p.add_argument("--json", action="store_true", help="one ToolSpec per line")
    p.set_defaults(handler=_tools)
    p = sub.add_parser("workers", help="list the workers registered with routing")
    p.add_argument("--tool", default="", help="only workers offering this tool")
    p.add_argument("--json", action="store_true", help="one WorkerStatus per line")
    p.set_defaults(handler=_workers)


__all__ = ["register"]
