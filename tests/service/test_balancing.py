"""Client-side balancing over replicas (issue 25): a channel built from configuration
spreads its calls over every server its target names, and servers ask clients to
reconnect after ``max_connection_age_s`` so replicas started later get traffic too.

Two replicas of the routing service run through the production bootstrap on
127.0.0.1:0, each with its own span exporter; a typed client dials both through one
target (``ipv4:host:port,host:port``: the resolver differs from Kubernetes'
``dns:///routing:50053``, the channel, its service config and its load-balancing policy
are the ones every service uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cuga.client import RoutingClient
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.app import build
from cuga.shared.bootstrap import server_options
from cuga.shared.config import CallConfig, ConfigError, load_settings
from tests.support.servers import make_settings, running_service, signer_of

pytestmark = pytest.mark.timeout(60)
CALLS = 40
METHOD = "/cuga.routing.v1.RoutingService/ListWorkers"


@pytest.fixture
async def two_replicas(tmp_path: Path) -> AsyncIterator[list[tuple[str, InMemorySpanExporter]]]:
    """Two routing servers: (address, the spans each one served)."""
    replicas = []
    async with AsyncExitStack() as stack:
        for i in range(2):
            spans = InMemorySpanExporter()
            server = await stack.enter_async_context(
                running_service(
                    "routing",
                    build,
                    make_settings(tmp_path / f"routing-{i}"),
                    span_processors=[SimpleSpanProcessor(spans)],
                )
            )
            replicas.append((server.address, spans))
        yield replicas


def _served(spans: InMemorySpanExporter) -> int:
    return sum(1 for span in spans.get_finished_spans() if span.name == METHOD)


async def _call(target: str, call: CallConfig) -> None:
    async with RoutingClient(target, call=call, signer=signer_of("planning")) as client:
        for _ in range(CALLS):
            await client.list_workers(routing_pb2.ListWorkersRequest())


async def test_calls_spread_over_both_replicas_behind_one_target(
    two_replicas: list[tuple[str, InMemorySpanExporter]],
) -> None:
    target = "ipv4:" + ",".join(address for address, _ in two_replicas)
    # The settings a service loads: the default call settings of a downstream.
    await _call(target, load_settings(env={}).common.calls.routing)
    served = [_served(spans) for _, spans in two_replicas]
    assert sum(served) == CALLS
    # round_robin: each replica gets every other call (connection set-up may shift one).
    assert all(abs(n - CALLS // 2) <= 1 for n in served), served


async def test_pick_first_sends_every_call_to_one_replica(
    two_replicas: list[tuple[str, InMemorySpanExporter]],
) -> None:
    # What a client without the policy did: one connection, one pod; the other idles.
    target = "ipv4:" + ",".join(address for address, _ in two_replicas)
    await _call(target, CallConfig(load_balancing="pick_first"))
    assert sorted(_served(spans) for _, spans in two_replicas) == [0, CALLS]


def test_addresses_accept_balancing_targets_and_a_service_binds_their_port() -> None:
    settings = load_settings(
        env={
            "CUGA_ADDRESSES__PLANNING": "dns:///planning:50052",
            "CUGA_ADDRESSES__AUDIT": "ipv4:10.0.0.1:50054,10.0.0.2:50054",
        }
    )
    addresses = settings.common.addresses
    assert addresses.port_of("planning") == 50052 and addresses.port_of("audit") == 50054
    for bad in ("dns:///planning", "dns://10.0.0.53/planning:50052", "ipv4:10.0.0.1:1,x"):
        with pytest.raises(ConfigError, match=r"addresses\.planning"):
            load_settings(env={"CUGA_ADDRESSES__PLANNING": bad})


def test_servers_age_connections_out_as_configured() -> None:
    common = load_settings(env={}).common
    assert ("grpc.max_connection_age_ms", 300_000) in server_options(common)
    aged = dataclasses.replace(common, max_connection_age_s=30.0)
    assert ("grpc.max_connection_age_ms", 30_000) in server_options(aged)
    never = load_settings(env={"CUGA_MAX_CONNECTION_AGE_S": "0"}).common
    assert not [o for o in server_options(never) if o[0] == "grpc.max_connection_age_ms"]
    with pytest.raises(ConfigError, match="max_connection_age_s"):
        load_settings(env={"CUGA_MAX_CONNECTION_AGE_S": "0.5"})
