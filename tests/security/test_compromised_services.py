"""What a compromised service can and cannot do, line by line of docs/security.md.

Two attacks cover every service identity at once:

* **its own credentials**: a service's key signs tokens for any audience it likes; each
  opens exactly the rows of the authorisation matrix its roles hold, nothing else;
* **what it receives**: every credential that reaches a service during a real run (a
  payment a reviewer approves, planning asking workers for tools, workers registering,
  refusals sent to audit) is replayed at every RPC of every other service, and refused.

The worker's own attack (a step under a captured grant) is
``test_borrowed_credentials.py``; the audit trail's writers, ``test_audit_writers.py``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import allowed_roles
from cuga.shared.bootstrap import ServiceDefinition
from cuga.shared.config import GRPC_SERVICE_NAMES, SERVICE_NAMES, Settings
from cuga.shared.messages import to_struct
from cuga.shared.telemetry import Telemetry
from tests.support.rpc import code_and_reason, raw_call, rpc_paths
from tests.support.servers import (
    TEST_SIGNERS,
    Cluster,
    as_identity,
    builders,
    make_settings,
    running_cluster,
    signed_as,
)

REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
#: Refusals past the matrix (the request itself is refused; the matrix let it in).
NEXT_LAYER = {"STEP_GRANT_REQUIRED"}
AUDIENCE = {name: name for name in SERVICE_NAMES} | {"worker": "worker:worker-1"}


def _rpcs(service: str) -> list[str]:
    return rpc_paths(GRPC_SERVICE_NAMES[service])


async def _call(
    channel: grpc.aio.Channel, method: str, metadata: Any
) -> tuple[grpc.StatusCode, str]:
    return code_and_reason(await raw_call(channel, method, b"", metadata))


class Capture(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Keeps every ``authorization`` value a service receives (what it could replay)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                self.seen.add(value)
        return await continuation(details)


@pytest.fixture
async def captured(tmp_path: Path) -> AsyncIterator[tuple[Cluster, dict[str, Capture]]]:
    captures = {name: Capture() for name in SERVICE_NAMES}

    def capturing(name: str, build: Any) -> Any:
        async def wrapped(settings: Settings, telemetry: Telemetry) -> ServiceDefinition:
            definition: ServiceDefinition = await build(settings, telemetry)
            definition.interceptors.append(captures[name])
            return definition

        return wrapped

    wrapped = {name: capturing(name, build) for name, build in builders().items()}
    async with running_cluster(make_settings(tmp_path / "data"), build=wrapped) as cluster:
        yield cluster, captures


async def _a_real_run(cluster: Cluster) -> None:
    """A payment a reviewer approves, then a step after it; plus a refused call."""
    transfer = {"from_account": "DE00T1", "to_account": "FR00T2", "amount": 5, "currency": "EUR"}
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay and confirm",
        steps=[
            S.PlanStep(step_id="pay", tool="transfer_funds", input=to_struct(transfer)),
            S.PlanStep(step_id="ok", tool="echo", input=to_struct({"t": 1}), depends_on=["pay"]),
        ],
    )
    async with (
        CoordinatorClient(cluster.address("coordinator"), metadata=as_identity("client")) as c,
        ApprovalClient(cluster.address("approval"), metadata=as_identity("reviewer")) as r,
    ):
        last = None
        async for response in c.orchestrate(request):
            last = response.event
            if last.approval.status == S.APPROVAL_STATUS_PENDING:
                await r.submit_decision(
                    approval_pb2.SubmitDecisionRequest(
                        approval_id=last.approval.approval_id,
                        verdict=approval_pb2.VERDICT_APPROVE,
                        reason="fine",
                    )
                )
        assert last is not None and last.stage == S.LIFECYCLE_STAGE_COMPLETE
    async with grpc.aio.insecure_channel(cluster.address("routing")) as channel:
        code, _ = await _call(channel, "/cuga.routing.v1.RoutingService/ListWorkers", ())
        assert code is grpc.StatusCode.UNAUTHENTICATED  # a refusal travels to audit too
    for server in cluster.servers.values():
        assert await server.flush_denials(timeout=10)


async def test_what_a_service_receives_opens_no_other_service(
    captured: tuple[Cluster, dict[str, Capture]],
) -> None:
    cluster, captures = captured
    await _a_real_run(cluster)
    # Every service received something to try (services' tokens, people's tokens).
    assert all(captures[name].seen for name in SERVICE_NAMES), {
        n: len(c.seen) for n, c in captures.items()
    }
    # What each received in the run (the replays below would add to what they receive).
    received = {name: sorted(capture.seen) for name, capture in captures.items()}
    wrong: list[str] = []
    tried = collections.Counter[str]()
    for holder, credentials in received.items():
        for target in SERVICE_NAMES:
            if target == holder:
                continue
            async with grpc.aio.insecure_channel(cluster.address(target)) as channel:
                calls = [
                    (credential, method, _call(channel, method, (("authorization", credential),)))
                    for credential in credentials
                    for method in _rpcs(target)
                ]
                results = await asyncio.gather(*(c for _, _, c in calls))
            for (credential, method, _), (code, _) in zip(calls, results, strict=True):
                tried[holder] += 1
                if code not in REFUSED:
                    wrong.append(
                        f"{holder}'s capture opened {method}: {code.name} ({credential[:24]}...)"
                    )
    assert not wrong, "\n".join(wrong)
    assert all(tried[name] for name in SERVICE_NAMES)


@pytest.mark.parametrize("identity", [n for n in SERVICE_NAMES if n in TEST_SIGNERS])
async def test_a_service_key_opens_only_its_own_rows(
    captured: tuple[Cluster, dict[str, Capture]], identity: str
) -> None:
    cluster, _ = captured
    roles = set(TEST_SIGNERS[identity][0])
    wrong: list[str] = []
    for target in SERVICE_NAMES:
        metadata = signed_as(identity, AUDIENCE[target])
        async with grpc.aio.insecure_channel(cluster.address(target)) as channel:
            for method in _rpcs(target):
                code, reason = await _call(channel, method, metadata)
                allowed = bool(allowed_roles(method) & roles)
                if allowed and code in REFUSED and reason not in NEXT_LAYER:
                    wrong.append(f"{identity} refused at {method}: {code.name} {reason}")
                if not allowed and code is not grpc.StatusCode.PERMISSION_DENIED:
                    wrong.append(f"{identity} got {code.name} at {method}, not PERMISSION_DENIED")
    assert not wrong, "\n".join(wrong)
