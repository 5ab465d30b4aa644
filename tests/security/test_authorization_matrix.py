"""Every cell of the authorisation matrix over real gRPC with real tokens.

The expected table below is written out by hand from docs/security.md, independently of
``AUTHORIZATION_MATRIX``: the first test checks the code's table against it, the second
calls every RPC of every service as every identity against a live cluster and checks
who got through (anything but UNAUTHENTICATED / PERMISSION_DENIED) and who was refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.shared.auth import AUTHORIZATION_MATRIX, allowed_roles
from cuga.shared.config import GRPC_SERVICE_NAMES
from tests.support.rpc import code_and_reason, raw_call
from tests.support.servers import (
    TEST_IDENTITIES,
    Cluster,
    as_identity,
    make_settings,
    running_cluster,
    running_service,
)

COORDINATOR_ONLY = {"coordinator"}
#: service -> RPC -> the identities (of TEST_IDENTITIES, by role) that may call it.
EXPECTED: dict[str, dict[str, set[str]]] = {
    "coordinator": {
        rpc: {"client"}
        for rpc in ("Orchestrate", "Resume", "Watch", "GetRun", "ListRuns", "CancelRun")
    },
    "planning": {rpc: COORDINATOR_ONLY for rpc in ("CreatePlan", "GetPlan", "TransitionPlan")},
    "routing": {
        "Route": COORDINATOR_ONLY,
        "RouteBatch": COORDINATOR_ONLY,
        "ListWorkers": {"coordinator", "planning", "operator"},
        "RegisterWorker": {"worker"},
        "Heartbeat": {"worker"},
        "DeregisterWorker": {"worker"},
    },
    "approval": {
        "RequestApproval": COORDINATOR_ONLY,
        "RequestApprovalBatch": COORDINATOR_ONLY,
        "WithdrawApprovals": COORDINATOR_ONLY,
        "AwaitDecision": COORDINATOR_ONLY,
        "GetRequest": {"coordinator", "reviewer"},
        "SubmitDecision": {"reviewer"},
        "ListPending": {"reviewer"},
    },
    "worker": {
        "ExecuteStep": COORDINATOR_ONLY,
        "ExecuteSteps": COORDINATOR_ONLY,
        "ListTools": {"coordinator", "planning", "operator"},
    },
    "audit": {
        # Every service may record (its own access_denied refusals).
        "Record": {"coordinator", "planning", "routing", "audit", "approval", "worker"},
        "RecordBatch": {"coordinator", "planning", "routing", "audit", "approval", "worker"},
        "Query": {"auditor"},
        "Export": {"auditor"},
        "Verify": {"auditor"},
        "GetCheckpoint": {"auditor"},
        "GetInclusionProof": {"auditor"},
        "GetConsistencyProof": {"auditor"},
        "ListEntries": {"auditor"},
    },
}
#: One identity per role (plus one with none); profile-scoped and all-role test
#: identities are left out on purpose.
CALLERS = (
    "client",
    "coordinator",
    "planning",
    "routing",
    "audit",
    "approval",
    "worker",
    "reviewer",
    "auditor",
    "operator",
    "nobody",
)
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
#: Refusals past the matrix: the matrix let the caller in and the request itself is then
#: refused (a step needs the coordinator's grant: tests/security/test_borrowed_credentials.py).
NEXT_LAYER = {"STEP_GRANT_REQUIRED"}


def _methods(service: str) -> list[str]:
    from google.protobuf import descriptor_pool

    desc = descriptor_pool.Default().FindServiceByName(GRPC_SERVICE_NAMES[service])
    return [m.name for m in desc.methods]


def test_code_matrix_is_the_documented_one() -> None:
    for service, rpcs in EXPECTED.items():
        assert set(_methods(service)) == set(rpcs), f"{service}: every RPC is in the table"
        for rpc, allowed in rpcs.items():
            method = f"/{GRPC_SERVICE_NAMES[service]}/{rpc}"
            roles = allowed_roles(method)
            got = {c for c in CALLERS if roles.intersection(TEST_IDENTITIES[c][0])}
            assert got == allowed, f"{method}: matrix allows {sorted(got)}"
    assert allowed_roles("/cuga.unknown.v1.X/Y") == frozenset()  # deny by default
    assert all(g.why for g in AUTHORIZATION_MATRIX)


async def _code(
    channel: grpc.aio.Channel, service: str, rpc: str, metadata: Any
) -> grpc.StatusCode:
    """Call ``rpc`` with an empty request; the status code (OK when it got through)."""
    return (await _status(channel, service, rpc, metadata))[0]


async def _status(
    channel: grpc.aio.Channel, service: str, rpc: str, metadata: Any
) -> tuple[grpc.StatusCode, str]:
    """Call ``rpc`` with an empty request; the status code and the ErrorInfo reason."""
    path = f"/{GRPC_SERVICE_NAMES[service]}/{rpc}"
    return code_and_reason(await raw_call(channel, path, b"", metadata, timeout=5))


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


@pytest.mark.parametrize("service", sorted(EXPECTED))
async def test_every_cell_over_grpc(cluster: Cluster, service: str) -> None:
    wrong: list[str] = []
    async with grpc.aio.insecure_channel(cluster.address(service)) as channel:
        for rpc, allowed in EXPECTED[service].items():
            for caller in CALLERS:
                code, reason = await _status(channel, service, rpc, as_identity(caller))
                if caller in allowed and code in REFUSED and reason not in NEXT_LAYER:
                    wrong.append(f"{caller} -> {rpc}: refused with {code.name} ({reason})")
                if caller not in allowed and code is not grpc.StatusCode.PERMISSION_DENIED:
                    wrong.append(f"{caller} -> {rpc}: {code.name}, not PERMISSION_DENIED")
            anonymous = await _code(channel, service, rpc, ())
            forged = await _code(channel, service, rpc, (("authorization", "Bearer forged"),))
            for who, code in (("anonymous", anonymous), ("forged token", forged)):
                if code is not grpc.StatusCode.UNAUTHENTICATED:
                    wrong.append(f"{who} -> {rpc}: {code.name}, not UNAUTHENTICATED")
    assert not wrong, "\n".join(wrong)


async def _denials(cluster: Cluster, actor: str, count: int) -> list[audit_pb2.AuditRecord]:
    """The ``access_denied`` records of ``actor``, once every refusal is delivered."""
    for server in cluster.servers.values():  # refusals travel through buffered trails
        assert await server.flush_denials(timeout=5)
    flt = audit_pb2.RecordFilter(kinds=["access_denied"])
    async with AuditClient(cluster.address("audit"), metadata=as_identity("auditor")) as audit:
        page = await audit.query(audit_pb2.QueryRequest(filter=flt, page_size=1000))
    found = [r for r in page.records if r.actor == actor]
    assert len(found) >= count, f"{len(found)} access_denied record(s) by {actor}"
    return found


async def test_refusals_become_access_denied_audit_records(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address("routing")) as channel:
        code = await _code(channel, "routing", "RegisterWorker", as_identity("reviewer"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    async with grpc.aio.insecure_channel(cluster.address("audit")) as channel:
        code = await _code(channel, "audit", "Query", as_identity("client"))
    assert code is grpc.StatusCode.PERMISSION_DENIED

    by_reviewer = await _denials(cluster, "reviewer", 1)
    assert by_reviewer[0].payload["service"] == "routing"
    assert by_reviewer[0].payload["method"] == "/cuga.routing.v1.RoutingService/RegisterWorker"
    assert by_reviewer[0].payload["code"] == "PERMISSION_DENIED"
    assert by_reviewer[0].payload["reason"] == "ROLE_NOT_ALLOWED"
    by_client = await _denials(cluster, "client", 1)  # the audit service's own refusal
    assert by_client[0].payload["service"] == "audit"
    assert by_client[0].payload["method"] == "/cuga.audit.v1.AuditService/Query"


def test_auth_is_on_by_default() -> None:
    from cuga.shared.config import load_settings

    assert load_settings(env={}).common.auth.enabled is True


async def test_turning_auth_off_is_explicit_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cuga.services.routing.app import build

    settings = make_settings(tmp_path / "data", env={"CUGA_AUTH__ENABLED": "false"})
    with caplog.at_level("WARNING", logger="cuga.bootstrap"):
        async with (
            running_service("routing", build, settings) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            # Anyone may call anything now, even without credentials.
            code = await _code(channel, "routing", "ListWorkers", ())
    assert code is grpc.StatusCode.OK
    assert any(
        r.levelname == "WARNING" and "authentication is OFF" in r.getMessage()
        for r in caplog.records
    )


async def test_refused_callers_learn_nothing_about_their_bytes(cluster: Cluster) -> None:
    """Auth runs before parsing: corrupt bytes from a refused caller are not INVALID_ARGUMENT."""
    garbage = b"\xff\xff\xff"
    async with grpc.aio.insecure_channel(cluster.address("audit")) as channel:
        query = channel.unary_unary(
            "/cuga.audit.v1.AuditService/Query",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for metadata, expected in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (as_identity("client"), grpc.StatusCode.PERMISSION_DENIED),
            (as_identity("auditor"), grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await query(garbage, timeout=5, metadata=metadata)
            assert info.value.code() is expected
