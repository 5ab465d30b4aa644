"""Services as real processes: `cuga serve` drains on SIGTERM; `cuga run` streams a run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2
from cuga.shared.messages import to_struct
from tests.support.servers import (
    Cluster,
    as_identity,
    make_settings,
    running_cluster,
    service_env,
    token_of,
    write_tokens_file,
)

SERVING = re.compile(r"(\w+) serving on (\S+)")


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    env.update({"CUGA_DATA_DIR": str(data_dir), "CUGA_GRACE_PERIOD_S": "20", **extra})
    # Servers know the test identities; the CLI calls as the test client.
    env["CUGA_AUTH__TOKENS_FILE"] = str(write_tokens_file(data_dir / "tokens.yaml"))
    env["CUGA_TOKEN"] = token_of("client")
    return env


async def _start(service: str, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuga.cli.main",
        "serve",
        service,
        "--port",
        "0",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:  # the bootstrap logs the bound address once it is SERVING
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "the service exited before serving"
        match = SERVING.search(line)
        if match:
            return proc, match.group(2)


@pytest.fixture
async def approval_process(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc, address = await _start("approval", {**_env(tmp_path / "data"), **service_env("approval")})
    try:
        yield proc, address
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigterm_turns_health_not_serving_and_lets_calls_finish(
    approval_process: tuple[asyncio.subprocess.Process, str],
) -> None:
    proc, address = approval_process
    async with (
        ApprovalClient(address, metadata=as_identity("coordinator")) as approval,
        grpc.aio.insecure_channel(address) as ch,
    ):
        health = health_pb2_grpc.HealthStub(ch)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        pending = await approval.request_approval(
            approval_pb2.RequestApprovalRequest(
                step=common_pb2.PlanStep(
                    step_id="pay", tool="transfer_funds", input=to_struct({"amount": 5})
                ),
                context=common_pb2.ExecutionContext(run_id="r1", user_id="bob"),
                sensitive=True,
            )
        )
        assert pending.request.status == common_pb2.APPROVAL_STATUS_PENDING
        in_flight = asyncio.ensure_future(
            approval.await_decision(
                approval_pb2.AwaitDecisionRequest(approval_id=pending.request.approval_id),
                timeout=30,
            )
        )
        # A later call answered on the same connection means the server has received the
        # AwaitDecision before it (HTTP/2 frames arrive in order): it is in flight.
        await approval.get_request(
            approval_pb2.GetRequestRequest(approval_id=pending.request.approval_id)
        )
        proc.send_signal(signal.SIGTERM)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        answer = await asyncio.wait_for(in_flight, 30)  # finished, not cut off
        assert answer.request.status == common_pb2.APPROVAL_STATUS_PENDING
    assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with running_cluster(make_settings(tmp_path / "data")) as c:
        yield c


async def test_cuga_run_json_streams_one_object_per_event(cluster: Cluster, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "steps:\n"
        "  - {id: add, tool: calculator, input: {expression: '2 * 21'}}\n"
        "  - {id: say, tool: echo, depends_on: [add], input: {n: '{{steps.add.output.result}}'}}\n"
    )
    env = _env(tmp_path / "cli", CUGA_ADDRESSES__COORDINATOR=cluster.address("coordinator"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuga.cli.main",
        "run",
        "add and say",
        "--plan",
        str(plan),
        "--json",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert [e["seq"] for e in events] == [str(i) for i in range(1, len(events) + 1)]  # uint64
    assert events[0]["stage"] == "LIFECYCLE_STAGE_INITIALIZE"
    assert events[-1]["stage"] == "LIFECYCLE_STAGE_COMPLETE"
    assert len({e["trace_id"] for e in events}) == 1


async def test_cuga_run_exits_non_zero_on_failure(cluster: Cluster, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"steps": [{"id": "d", "tool": "calculator", "input": {"expression": "1 / 0"}}]})
    )
    env = _env(tmp_path / "cli", CUGA_ADDRESSES__COORDINATOR=cluster.address("coordinator"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuga.cli.main",
        "run",
        "divide",
        "--plan",
        str(plan),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "FAILED" in out.decode()
