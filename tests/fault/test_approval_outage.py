"""kill -9 the approval service while a run waits for a human: nothing pending is lost.

The run asks for approval of a sensitive step and waits. The approval service dies and
comes back on the same port and data directory: the request is still PENDING under the
same id, the coordinator's wait rides out the outage (RETRY strategy), a reviewer's
approval after the restart releases the run, and every guarantee of the fault suite holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient
from cuga.common.v1 import common_pb2 as S
from tests.support.faults import (
    RunLog,
    check_guarantees,
    fault_cluster,
    orchestrate,
    step,
    wait_runs,
)

pytestmark = pytest.mark.timeout(180)

PAYMENT = {
    "from_account": "DE00FAULT001",
    "to_account": "FR00FAULT002",
    "amount": 25,
    "currency": "EUR",
}


def _pending(log: RunLog) -> str:
    """The id of the approval the run is waiting for ("" when it is not waiting)."""
    for event in log.events:
        if event.HasField("approval") and event.approval.status == S.APPROVAL_STATUS_PENDING:
            return event.approval.approval_id
    return ""


async def test_pending_approval_survives_a_kill_9_of_the_approval_service(tmp_path: Path) -> None:
    async with fault_cluster(tmp_path) as cluster:
        log = RunLog(
            "approve-kill",
            [
                step("a0", "append_line", path="approve-kill/a0", line="x"),
                step("pay", "transfer_funds", ["a0"], **PAYMENT),
                step("a1", "append_line", ["pay"], path="approve-kill/a1", line="x"),
            ],
        )
        run = asyncio.create_task(orchestrate(cluster, log))
        await wait_runs([log], lambda lg: bool(_pending(lg)), timeout_s=60, what="the approval")
        approval_id = _pending(log)
        assert approval_id, f"no approval requested: {log.error}"

        await cluster.kill("approval")
        await cluster.restart("approval")

        async with cluster.client(ApprovalClient, identity="reviewer") as reviewer:
            kept = await reviewer.get_request(
                approval_pb2.GetRequestRequest(approval_id=approval_id)
            )
            assert kept.request.status == S.APPROVAL_STATUS_PENDING  # durable across the kill
            await reviewer.submit_decision(
                approval_pb2.SubmitDecisionRequest(
                    request_id="approve-after-restart",
                    approval_id=approval_id,
                    verdict=approval_pb2.VERDICT_APPROVE,
                    reason="approved after the restart",
                )
            )
        await asyncio.wait_for(run, 90)

        decided = [e.approval for e in log.events if e.HasField("approval")]
        assert {a.approval_id for a in decided} == {approval_id}  # one request, never re-made
        assert decided[-1].status == S.APPROVAL_STATUS_APPROVED
        assert decided[-1].decided_by == "demo-reviewer"
        await check_guarantees(cluster, [log])
