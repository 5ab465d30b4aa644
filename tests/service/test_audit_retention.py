"""The audit service's background work through the production bootstrap on 127.0.0.1:0 with
a fake clock (issue 24): retention, an injected checkpoint signer, and the checkpoint loop
over a log rewritten under it."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.services.audit.app import build
from cuga.services.audit.checkpoints import KeySigner
from cuga.shared.clock import FakeClock
from cuga.shared.messages import timestamp, to_struct
from cuga.shared.signing import generate_private_key, public_key_text
from cuga.shared.transparency import open_checkpoint
from tests.support.servers import as_identity, make_settings, running_service

T0 = 1_700_000_000.0
DAY = 86_400.0
OLD, NEW = "e" * 32, "f" * 32


def rec(rid: str, trace: str, at: float) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid, trace_id=trace, run_id="run-1", kind="plan", actor="coordinator"
    )
    r.payload.CopyFrom(to_struct({"id": rid}))
    r.timestamp.CopyFrom(timestamp(at))
    return r


async def test_traces_older_than_the_retention_are_pruned_each_interval(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    settings = make_settings(
        tmp_path / "data",
        {
            "CUGA_AUDIT__RETENTION_DAYS": "3",
            "CUGA_AUDIT__PRUNE_INTERVAL_S": "600",
            "CUGA_AUDIT__CHECKPOINT_INTERVAL_S": "3600",
        },
    )
    async with running_service("audit", lambda s, t: build(s, t, clock=clock), settings) as server:
        writer = AuditClient(server.address, metadata=as_identity("tester"))
        auditor = AuditClient(server.address, metadata=as_identity("auditor"))
        await writer.record_batch(
            audit_pb2.RecordBatchRequest(
                records=[rec("o1", OLD, T0 - 2 * DAY), rec("n1", NEW, T0 - 1 * DAY)]
            )
        )

        async def traces() -> set[str]:
            page = await auditor.query(audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter()))
            return {r.trace_id for r in page.records}

        # both loops sleep: the checkpoint loop and the retention loop (which pruned at start)
        await clock.until_sleepers(2)
        assert await traces() == {OLD, NEW}
        clock.advance(1.5 * DAY)  # OLD's newest record is now 3.5 days old, NEW's 2.5
        await clock.until_sleepers(2)
        assert await traces() == {NEW}
        # the log stays whole: a pruned trace is gone, the rest still verifies
        verified = await auditor.verify(audit_pb2.VerifyRequest(trace_id=NEW))
        assert verified.ok
        await writer.close()
        await auditor.close()


async def test_an_injected_signer_signs_the_checkpoints(tmp_path: Path) -> None:
    signer = KeySigner(generate_private_key())
    settings = make_settings(tmp_path / "data")
    builder = lambda s, t: build(s, t, clock=FakeClock(T0), signer=signer)  # noqa: E731
    async with running_service("audit", builder, settings) as server:
        writer = AuditClient(server.address, metadata=as_identity("tester"))
        auditor = AuditClient(server.address, metadata=as_identity("auditor"))
        await writer.record(audit_pb2.RecordRequest(record=rec("r1", NEW, T0)))
        got = await auditor.get_checkpoint(audit_pb2.GetCheckpointRequest())
        await writer.close()
        await auditor.close()
    assert got.public_key == public_key_text(signer.public_key)
    assert open_checkpoint(got.checkpoint.note, got.public_key).tree_size == 1
    # no key file was written: the key lives where the signer keeps it
    assert not (tmp_path / "data" / "audit-keys").exists()


async def test_a_log_rewritten_under_the_service_is_never_checkpointed_and_serving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(T0)
    settings = make_settings(tmp_path / "data", {"CUGA_AUDIT__CHECKPOINT_INTERVAL_S": "30"})
    sink = tmp_path / "data" / "audit-checkpoints" / "checkpoints.jsonl"
    async with running_service("audit", lambda s, t: build(s, t, clock=clock), settings) as server:
        writer = AuditClient(server.address, metadata=as_identity("tester"))
        auditor = AuditClient(server.address, metadata=as_identity("auditor"))
        await writer.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec(f"i{i}", NEW, T0) for i in range(3)])
        )
        signed = await auditor.get_checkpoint(audit_pb2.GetCheckpointRequest())
        assert signed.checkpoint.tree_size == 3
        # someone with the database rewrites the first record's leaf, and the log grows
        conn = sqlite3.connect(tmp_path / "data" / "audit.db")
        with conn:
            conn.execute(
                "UPDATE audit_records SET hash = ? WHERE record_id = ?", ("0" * 64, "tester/i0")
            )
        conn.close()
        await writer.record(audit_pb2.RecordRequest(record=rec("i3", NEW, T0)))
        await clock.until_sleepers(1)
        with caplog.at_level(logging.ERROR, logger="cuga.audit"):
            clock.advance(30)
            await clock.until_sleepers(1)  # the interval passed: no checkpoint, still looping
        assert "ALARM: audit log inconsistent with its checkpoints" in caplog.text
        sizes = [json.loads(line)["tree_size"] for line in sink.read_text().splitlines()]
        assert sizes == [3]  # nothing signed over the rewritten log
        page = await auditor.query(audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter()))
        assert len(page.records) == 4  # and the service still answers
        await writer.close()
        await auditor.close()
