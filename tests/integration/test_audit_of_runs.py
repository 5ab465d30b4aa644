"""Every event of a run becomes its audit record, however large the run's data (issue 24).

docs/coordinator.md promises one audit record per event. A run's plan, summary and outcome
carry every step's input or output, so two steps of 40 KB each made payloads over the
audit service's ``limits.max_input_bytes`` (64 KiB): those records were refused for good
and the trail missed them. Such a payload is now digested (its fields' size and SHA-256,
checkable against the event in the run store). And an audit service that refuses some
records for good (here: configured with a smaller limit than the coordinator) loses only
those, logged as alarms: the rest of the batch is stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from google.protobuf import json_format

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.common.v1 import common_pb2 as S
from cuga.orchestrator import create_coordinator
from cuga.services.audit.app import build as build_audit
from cuga.shared.clock import FakeClock
from cuga.shared.messages import struct_to_dict, to_struct
from cuga.shared.transparency import canonical_json
from tests.support.ports import free_port
from tests.support.servers import (
    Storage,
    as_identity,
    as_service,
    make_settings,
    running_service,
)
from tests.support.tools import TEST_TOOLS

ALLOW = {"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]"}


def _echo(sid: str, size: int) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool="echo", input=to_struct({"text": "x" * size}))


async def test_a_run_with_large_data_has_every_audit_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, storage: Storage
) -> None:
    agent = await create_coordinator(
        settings=make_settings(tmp_path / "data", env=ALLOW, storage=storage),
        audit_backend=storage.backend,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        clock=FakeClock(),
    )
    try:
        events = [
            e async for e in agent.orchestrate("g", plan=[_echo("a", 40_000), _echo("b", 40_000)])
        ]
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
        run_id = events[0].run_id
        assert await agent.flush_audit(10)
        records, _ = await agent.audit.query(audit_pb2.RecordFilter(run_id=run_id))  # type: ignore[attr-defined]
    finally:
        await agent.close()
    assert "ALARM" not in caplog.text
    assert sorted(r.record_id for r in records) == sorted(f"{run_id}/e{e.seq}" for e in events)
    by_seq = {int(r.record_id.rpartition("/e")[2]): r for r in records}
    plan_event = next(e for e in events if e.HasField("plan"))
    plan_payload = struct_to_dict(by_seq[plan_event.seq].payload)
    # The event's own fields stay; the plan is its size and digest, checkable from the event.
    assert plan_payload["seq"] == plan_event.seq and plan_payload["stage"] == "LIFECYCLE_STAGE_PLAN"
    text = canonical_json(
        json_format.MessageToDict(plan_event.plan, preserving_proto_field_name=True)
    ).encode()
    assert plan_payload["plan"] == {
        "omitted_bytes": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
    }
    # A step's own record is small enough to be whole.
    result = next(e for e in events if e.HasField("step_result") and e.step_id == "a")
    assert struct_to_dict(by_seq[result.seq].payload)["step_result"]["output"] == {
        "text": "x" * 40_000
    }


async def test_records_an_audit_service_refuses_for_good_are_the_only_ones_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, storage: Storage
) -> None:
    audit_settings = make_settings(tmp_path / "audit", storage=storage)
    small = dataclasses.replace(audit_settings.common.limits, max_input_bytes=3000)
    async with running_service(
        "audit", build_audit, audit_settings.with_overrides(limits=small)
    ) as audit:
        agent = await create_coordinator(
            settings=as_service(
                make_settings(tmp_path / "data", env=ALLOW, storage=storage), "coordinator"
            ),
            tools=TEST_TOOLS,
            planning_mode="explicit",
            addresses={"audit": audit.address},
            clock=FakeClock(),
        )
        try:
            events = [e async for e in agent.orchestrate("g", plan=[_echo("big", 5000)])]
            assert await agent.flush_audit(10)
        finally:
            await agent.close()
        async with AuditClient(audit.address, metadata=as_identity("auditor")) as reader:
            stored = await reader.query(
                audit_pb2.QueryRequest(
                    filter=audit_pb2.RecordFilter(run_id=events[0].run_id), page_size=100
                )
            )
    # The step's 5 KB (its input in the plan, its output in the result, the summary and the
    # outcome) is over this service's 3000 bytes: those four are refused for good, each an
    # alarm; the rest of the run's records, sent in the same batches, are stored.
    refused = ("plan", "step_result", "run_summary", "run_outcome")
    assert sorted(r.kind for r in stored.records) == ["routing_decision", "run_started"]
    assert len(events) == 6
    for kind in refused:
        assert f"({kind}) refused by the audit trail for good" in caplog.text


async def test_records_owed_when_the_coordinator_stops_are_shipped_when_it_starts_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, storage: Storage
) -> None:
    settings = as_service(
        make_settings(tmp_path / "data", env=ALLOW, storage=storage), "coordinator"
    )
    down = f"127.0.0.1:{free_port()}"
    first = await create_coordinator(
        settings=settings,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        addresses={"audit": down},
        clock=FakeClock(),
    )
    try:
        events = [e async for e in first.orchestrate("g", plan=[_echo("a", 10)])]
        assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_COMPLETE"
        assert not await first.flush_audit(0.2)  # audit is down: the records stay owed
    finally:
        await first.close()
    assert f"stopping with {len(events)} audit record(s) owed" in caplog.text
    assert not await first.flush_audit()  # closed: says they are still owed (raised before)

    audit_settings = make_settings(tmp_path / "audit", storage=storage)
    async with running_service("audit", build_audit, audit_settings) as audit:
        second = await create_coordinator(
            settings=settings,
            tools=TEST_TOOLS,
            planning_mode="explicit",
            addresses={"audit": audit.address},
            clock=FakeClock(),
        )
        try:
            assert await second.flush_audit(10)
        finally:
            await second.close()
        assert await second.flush_audit()  # closed with nothing owed
        async with AuditClient(audit.address, metadata=as_identity("auditor")) as reader:
            stored = await reader.query(
                audit_pb2.QueryRequest(
                    filter=audit_pb2.RecordFilter(run_id=events[0].run_id), page_size=100
                )
            )
    assert sorted(r.record_id for r in stored.records) == sorted(
        f"coordinator/{events[0].run_id}/e{e.seq}" for e in events
    )


async def test_an_approval_that_expires_is_audited_as_expired(
    tmp_path: Path, storage: Storage
) -> None:
    clock = FakeClock()
    agent = await create_coordinator(
        settings=make_settings(
            tmp_path / "data",
            env={**ALLOW, "CUGA_APPROVAL__DEFAULT_TIMEOUT_S": "60"},
            storage=storage,
        ),
        audit_backend=storage.backend,
        tools=TEST_TOOLS,
        planning_mode="explicit",
        clock=clock,
    )
    transfer = {"from_account": "DE1234567", "to_account": "FR7654321", "amount": 2500}
    pay = S.PlanStep(
        step_id="pay", tool="transfer_funds", input=to_struct({**transfer, "currency": "EUR"})
    )
    events: list[S.OrchestrationEvent] = []
    try:
        async for e in agent.orchestrate("pay", S.ExecutionContext(user_id="bob"), plan=[pay]):
            events.append(e)
            if e.HasField("approval") and e.approval.status == S.APPROVAL_STATUS_PENDING:
                clock.advance(61)  # nobody decides in time
        assert await agent.flush_audit(10)
        records, _ = await agent.audit.query(audit_pb2.RecordFilter(run_id=events[0].run_id))  # type: ignore[attr-defined]
    finally:
        await agent.close()
    statuses = [e.approval.status for e in events if e.HasField("approval")]
    assert statuses == [S.APPROVAL_STATUS_PENDING, S.APPROVAL_STATUS_EXPIRED]
    assert S.LifecycleStage.Name(events[-1].stage) == "LIFECYCLE_STAGE_FAILED"
    kinds = [r.kind for r in records]
    assert kinds.count("approval_requested") == 1 and kinds.count("approval_expired") == 1
