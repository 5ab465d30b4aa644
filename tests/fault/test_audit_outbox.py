"""The audit records a run owes survive any stop of its coordinator (issue 22 item 8).

Every service is a process (:class:`tests.support.faults.FaultCluster`). With the audit
service down, a run completes; its records can then live only in the coordinator. They
are written to the run store's audit outbox with their events, so:

* SIGKILL the coordinator, bring audit back, start a new coordinator on the same data
  directory: every record of the run arrives, each exactly once (before: the records
  were held in memory and died with the process — none arrived);
* SIGTERM the coordinator with audit still down: it exits within its grace period
  (before: closing waited on the audit flush without a limit and outlived the grace),
  and the records it could not ship arrive once a coordinator runs again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from cuga.common.v1 import common_pb2 as S
from cuga.shared.messages import struct_to_dict
from tests.support.faults import (
    UNAUDITED,
    FaultCluster,
    RunLog,
    audit_records,
    fault_cluster,
    orchestrate,
    step,
    until,
)

pytestmark = pytest.mark.timeout(180)

GRACE_S = 5.0


async def _run_with_audit_down(cluster: FaultCluster, tag: str) -> RunLog:
    """Stop audit (SIGKILL), then run three steps to COMPLETE."""
    await cluster.kill("audit")
    log = RunLog(tag, [step(f"{tag}-{i}", "echo", text=str(i)) for i in range(3)])
    await orchestrate(cluster, log)
    assert log.error is None, log.error
    assert log.terminal == "LIFECYCLE_STAGE_COMPLETE", log.events[-1]
    return log


async def _records_arrive_once(cluster: FaultCluster, log: RunLog) -> None:
    """Wait until the trace holds one record per audited event, then check each is there
    exactly once (record ids are ``<run>/e<seq>``: a resend would be a duplicate)."""
    expected = [e.seq for e in log.events if e.stage not in UNAUDITED]

    async def delivered() -> bool:
        return len(await audit_records(cluster, log.trace_id)) >= len(expected)

    await until(delivered, timeout_s=60, what=f"the audit records of {log.run_id}")
    records = await audit_records(cluster, log.trace_id)
    seqs = [int(struct_to_dict(r.payload)["seq"]) for r in records]
    assert sorted(seqs) == expected, (seqs, expected)
    assert max(Counter(r.record_id for r in records).values()) == 1


async def test_records_of_a_run_survive_sigkill_of_its_coordinator(tmp_path: Path) -> None:
    async with fault_cluster(tmp_path) as cluster:
        log = await _run_with_audit_down(cluster, "killed")
        await cluster.kill("coordinator")
        await cluster.restart("audit")
        assert await audit_records(cluster, log.trace_id) == []  # nothing shipped yet
        await cluster.restart("coordinator")
        await _records_arrive_once(cluster, log)


async def test_sigterm_with_audit_down_exits_within_the_grace(tmp_path: Path) -> None:
    async with fault_cluster(tmp_path, {"CUGA_GRACE_PERIOD_S": str(GRACE_S)}) as cluster:
        log = await _run_with_audit_down(cluster, "drained")
        started = time.monotonic()
        proc = cluster.terminate("coordinator")
        exit_code = await asyncio.wait_for(proc.wait(), GRACE_S * 4)
        elapsed = time.monotonic() - started
        assert exit_code == 0, cluster.log_tail("coordinator")
        assert elapsed < GRACE_S, f"the coordinator took {elapsed:.1f}s to stop"
        await cluster.restart("audit")
        await cluster.restart("coordinator")
        await _records_arrive_once(cluster, log)
        assert S.LifecycleStage.Name(log.events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
