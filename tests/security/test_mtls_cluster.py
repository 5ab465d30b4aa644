"""Mutual TLS as the Kubernetes mtls component runs it (issue 25): certificates that name
the Service (not the pod), probes over a plain-text health-only port, and workers dialled
at their pod IP under the one name their certificates carry.

A throwaway CA and certificates are made by the same code as ``cuga tls init``; the
services start through the production bootstrap on 127.0.0.1:0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.cli.tls import issue, make_ca, write_pair
from cuga.client import WorkerClient
from cuga.services.routing.app import build as build_routing
from cuga.services.worker.app import build as build_worker
from cuga.shared.auth import TlsConfig
from cuga.shared.config import CallConfig, ConfigError, Settings, load_settings
from cuga.shared.errors import UnavailableError
from cuga.worker.v1 import worker_pb2
from tests.support.servers import as_identity, running_service, with_address

pytestmark = pytest.mark.timeout(60)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA and certificates shaped like the component's: each names its Service only."""
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = make_ca("cuga-ca")
    write_pair(folder, "ca", ca)
    for name in ("routing", "worker", "coordinator"):
        write_pair(folder, name, issue(ca, name, hosts=(name,)))
    return folder


def _tls(pki: Path, name: str) -> TlsConfig:
    return TlsConfig(
        cert_file=pki / f"{name}.pem", key_file=pki / f"{name}.key", ca_file=pki / "ca.pem"
    )


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def test_probes_read_health_in_plain_text_while_the_service_port_requires_tls(
    settings: Settings, pki: Path
) -> None:
    # The routing certificate names `routing`, not 127.0.0.1: the component's shape.
    settings = settings.with_overrides(tls=_tls(pki, "routing"), health_port=0)
    async with running_service("routing", build_routing, settings) as server:
        assert server.health_port
        probe = f"127.0.0.1:{server.health_port}"
        # What a kubelet gRPC probe does (plain text): the same statuses as the service's.
        assert await _health(probe) == SERVING
        assert await _health(probe, "cuga.routing.v1.RoutingService") == SERVING
        # The health port serves health alone: no RPC of the service over plain text.
        async with grpc.aio.insecure_channel(probe) as channel:
            call = channel.unary_unary("/cuga.routing.v1.RoutingService/ListWorkers")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(b"", timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # The service port itself refuses plain text.
        with pytest.raises(grpc.aio.AioRpcError) as plain:
            await _health(server.address)
        assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
        # Draining turns the probe NOT_SERVING before the server stops.
        await server.set_serving(False)
        assert await _health(probe, "cuga.routing.v1.RoutingService") == NOT_SERVING


async def test_a_worker_dialled_at_its_ip_is_verified_under_the_name_worker(
    settings: Settings, pki: Path
) -> None:
    routing_settings = settings.with_overrides(tls=_tls(pki, "routing"))
    async with running_service("routing", build_routing, routing_settings) as routing:
        worker_settings = with_address(settings, "routing", routing.address).with_overrides(
            tls=dataclasses.replace(_tls(pki, "worker"), server_name="routing")
        )
        async with running_service("worker", build_worker, worker_settings) as worker:
            tls = _tls(pki, "coordinator")
            # The coordinator dials the address the worker registered: an IP its
            # certificate does not name. Verified under `worker`, the call goes through.
            named = WorkerClient(
                worker.address,
                call=CallConfig(server_name="worker"),
                credentials=tls.channel_credentials(),
                metadata=as_identity("coordinator"),
            )
            async with named:
                tools = await named.list_tools(worker_pb2.ListToolsRequest())
            assert tools.tools
            # Without it the handshake fails: the certificate does not name 127.0.0.1.
            unnamed = WorkerClient(
                worker.address,
                call=CallConfig(retry=CallConfig().retry, timeout_s=2.0),
                credentials=tls.channel_credentials(),
                metadata=as_identity("coordinator"),
            )
            async with unnamed:
                with pytest.raises(UnavailableError):
                    await unnamed.list_tools(worker_pb2.ListToolsRequest())


def test_health_port_and_server_name_are_configuration_keys() -> None:
    common = load_settings(
        env={"CUGA_HEALTH_PORT": "8086", "CUGA_CALLS__WORKER__SERVER_NAME": "worker"}
    ).common
    assert common.health_port == 8086 and common.calls.worker.server_name == "worker"
    assert load_settings(env={}).common.health_port is None
    with pytest.raises(ConfigError, match="health_port"):
        load_settings(env={"CUGA_HEALTH_PORT": "70000"})
