"""Mutual TLS: identity from the client certificate's CN; no or a wrong certificate fails.

A throwaway CA and certificates are made for each test by the same code as
``cuga tls init`` (:mod:`cuga.cli.tls`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest

from cuga.cli.tls import KeyPair, issue, make_ca, write_pair
from cuga.client import RoutingClient, WorkerClient
from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.app import build
from cuga.shared.auth import AuthConfig, CertIdentity, TlsConfig
from cuga.shared.config import Settings
from cuga.shared.errors import CugaError, PermissionDeniedError, UnauthenticatedError
from cuga.shared.messages import to_struct, value_to_python
from cuga.worker.v1 import worker_pb2
from tests.support.servers import running_service


def _issue(folder: Path, cn: str, issuer: KeyPair) -> None:
    """Write ``<cn>.pem`` and ``<cn>.key``, signed by ``issuer``, valid for localhost."""
    write_pair(folder, cn, issue(issuer, cn, hosts=("localhost", "127.0.0.1")))


def _ca(folder: Path, cn: str) -> KeyPair:
    """Write a self-signed CA as ``<cn>.pem`` and ``<cn>.key``."""
    ca = make_ca(cn)
    write_pair(folder, cn, ca)
    return ca


@dataclasses.dataclass
class Pki:
    folder: Path

    def tls(self, cn: str, ca: str = "ca", **extra: object) -> TlsConfig:
        return TlsConfig(
            cert_file=self.folder / f"{cn}.pem",
            key_file=self.folder / f"{cn}.key",
            ca_file=self.folder / f"{ca}.pem",
            **extra,  # type: ignore[arg-type]
        )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    ca = _ca(folder, "ca")
    for cn in ("routing", "worker-7", "stranger", "reviewer-cert", "coordinator-cert", "worker"):
        _issue(folder, cn, ca)
    rogue = _ca(folder, "rogue-ca")
    _issue(folder, "impostor", rogue)  # signed by a CA the server does not trust
    return Pki(folder)


def _server_settings(settings: Settings, pki: Pki) -> Settings:
    identities = {
        "worker-7": CertIdentity(roles=("worker",), worker_ids=("worker-1",)),
        "reviewer-cert": CertIdentity(roles=("reviewer",)),
        "impostor": CertIdentity(roles=("worker",)),
    }
    # No tokens at all: identity comes from certificates only.
    return settings.with_overrides(
        auth=AuthConfig(enabled=True, audit_denials=False),
        tls=pki.tls("routing", identities=identities),
    )


def _client(address: str, pki: Pki, cn: str | None) -> RoutingClient:
    ca = (pki.folder / "ca.pem").read_bytes()
    if cn is None:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki.folder / f"{cn}.key").read_bytes(),
            certificate_chain=(pki.folder / f"{cn}.pem").read_bytes(),
        )
    return RoutingClient(address, credentials=credentials)


async def test_mutual_tls_identity_comes_from_the_certificate(settings: Settings, pki: Pki) -> None:
    async with running_service("routing", build, _server_settings(settings, pki)) as server:
        address = f"localhost:{server.port}"
        request = routing_pb2.ListWorkersRequest()
        register = routing_pb2.RegisterWorkerRequest()
        async with _client(address, pki, "worker-7") as worker:
            # worker-7 holds the worker role: it gets past authorisation (to validation)...
            with pytest.raises(CugaError) as info:
                await worker.register_worker(register)
            assert info.value.code.name == "INVALID_ARGUMENT"
            # ...but not to an RPC of the coordinator.
            with pytest.raises(PermissionDeniedError):
                await worker.list_workers(request)
        async with _client(address, pki, "stranger") as stranger:
            with pytest.raises(UnauthenticatedError, match="not mapped"):
                await stranger.list_workers(request)
        async with _client(address, pki, None) as anonymous:  # no client certificate
            with pytest.raises(CugaError) as info:
                await anonymous.list_workers(request, timeout=5)
            assert info.value.code.name == "UNAVAILABLE"  # the handshake itself fails
        async with _client(address, pki, "impostor") as impostor:  # untrusted CA
            with pytest.raises(CugaError) as info:
                await impostor.list_workers(request, timeout=5)
            assert info.value.code.name == "UNAVAILABLE"


async def test_services_call_each_other_over_mutual_tls(settings: Settings, pki: Pki) -> None:
    """A worker's registrar dials routing with its own certificate (TlsConfig on both)."""
    from cuga.services.worker.app import build as build_worker

    server_settings = _server_settings(settings, pki)
    async with running_service("routing", build, server_settings) as routing:
        worker_settings = settings.with_overrides(
            auth=AuthConfig(enabled=True, audit_denials=False),
            tls=pki.tls("worker-7", server_name="localhost"),
        )
        worker_settings = dataclasses.replace(
            worker_settings,
            sections={"worker": {"routing_addresses": [f"localhost:{routing.port}"]}},
        )
        async with running_service("worker", build_worker, worker_settings):
            async with _client(f"localhost:{routing.port}", pki, "reviewer-cert") as peer:
                with pytest.raises(PermissionDeniedError):  # reviewers cannot list workers
                    await peer.list_workers(routing_pb2.ListWorkersRequest())
            # The worker registered over mTLS as worker-7 (role worker): read it back as
            # the coordinator would, through the service's own registry.
            workers = await _registered(routing)
            assert workers, "the worker registered with routing over mutual TLS"


async def _registered(server: object) -> list[str]:
    servicer = server.definition.registrations[0][1]  # type: ignore[attr-defined]
    response = await servicer.ListWorkers(routing_pb2.ListWorkersRequest(), _NoContext())
    return [w.info.worker_id for w in response.workers]


class _NoContext:
    """Just enough of a servicer context for a direct, in-process read."""

    def time_remaining(self) -> None:
        return None


async def test_certificates_alone_run_steps_with_no_grant_needed(
    settings: Settings, pki: Pki
) -> None:
    """Mutual TLS without signing keys: a coordinator identified by its certificate runs
    steps (a certificate cannot be replayed by the callee, so no grant is needed); a
    certificate without the coordinator role cannot, nor can a token without a grant."""
    from cuga.services.worker.app import build as build_worker

    identities = {
        "coordinator-cert": CertIdentity(roles=("coordinator",)),
        "worker-7": CertIdentity(roles=("worker",), worker_ids=("worker-1",)),
    }
    worker_settings = settings.with_overrides(
        auth=AuthConfig(enabled=True, audit_denials=False),
        tls=pki.tls("worker", identities=identities),
    )
    worker_settings = dataclasses.replace(
        worker_settings, sections={"worker": {"register_with_routing": False}}
    )
    step = worker_pb2.ExecuteStepRequest(
        step=common_pb2.PlanStep(step_id="s1", tool="echo", input=to_struct({"a": 1})),
        context=common_pb2.ExecutionContext(run_id="r1"),
        idempotency_key="r1/s1",
        attempt=1,
    )
    async with running_service("worker", build_worker, worker_settings) as worker:
        address = f"localhost:{worker.port}"
        async with _worker_client(address, pki, "coordinator-cert") as coordinator:
            result = (await coordinator.execute_step(step)).result
            assert value_to_python(result.output) == {"a": 1}
        async with _worker_client(address, pki, "worker-7") as other:
            with pytest.raises(PermissionDeniedError):
                await other.execute_step(step)


def _worker_client(address: str, pki: Pki, cn: str) -> WorkerClient:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(pki.folder / "ca.pem").read_bytes(),
        private_key=(pki.folder / f"{cn}.key").read_bytes(),
        certificate_chain=(pki.folder / f"{cn}.pem").read_bytes(),
    )
    return WorkerClient(address, credentials=credentials)
