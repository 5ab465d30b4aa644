"""AuditService over gRPC through the production bootstrap and the typed client."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.services.audit.app import build
from cuga.services.audit.config import AuditConfig
from cuga.services.audit.records import KNOWN_KINDS, from_json_line
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError
from cuga.shared.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from cuga.shared.messages import timestamp, to_struct
from cuga.shared.telemetry import setup_telemetry
from cuga.shared.transparency import open_checkpoint
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.servers import as_identity, make_settings, running_service

T1 = "c" * 32
T2 = "d" * 32


def rec(rid: str, trace: str = T1, kind: str = "plan", **kw: object) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid, trace_id=trace, run_id="run-1", kind=kind, actor="coordinator"
    )
    r.payload.CopyFrom(to_struct({"id": rid}))
    for key, value in kw.items():
        if key == "payload":
            r.payload.CopyFrom(value)  # type: ignore[arg-type]
        elif key == "timestamp":
            r.timestamp.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(r, key, value)
    return r


ENV = {"CUGA_LIMITS__MAX_INPUT_BYTES": "1024", "CUGA_AUDIT__MAX_BATCH": "5"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AuditClient]:
    settings = make_settings(tmp_path / "data", ENV)
    async with running_service("audit", build, settings) as server:
        c = AuditClient(server.address, metadata=as_identity("tester"))
        yield c
        await c.close()


async def test_record_is_idempotent_and_conflicts_are_already_exists(
    client: AuditClient,
) -> None:
    first = await client.record(audit_pb2.RecordRequest(record=rec("r1")))
    assert not first.duplicate
    assert first.record.chain_index == 1 and len(first.record.hash) == 64
    assert first.record.HasField("timestamp")
    again = await client.record(audit_pb2.RecordRequest(record=rec("r1")))
    assert again.duplicate and again.record == first.record
    with pytest.raises(AlreadyExistsError) as info:
        await client.record(audit_pb2.RecordRequest(record=rec("r1", kind="retry")))
    assert "r1" in info.value.message


async def test_record_batch_in_order_with_duplicates(client: AuditClient) -> None:
    resp = await client.record_batch(
        audit_pb2.RecordBatchRequest(records=[rec("a"), rec("b"), rec("c", T2)])
    )
    assert [r.chain_index for r in resp.records] == [1, 2, 1]
    assert resp.duplicates == 0
    resp = await client.record_batch(audit_pb2.RecordBatchRequest(records=[rec("b"), rec("d")]))
    assert resp.duplicates == 1
    assert [r.chain_index for r in resp.records] == [2, 3]


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (rec(""), "record.record_id"),
        (rec("has space"), "record.record_id"),
        (rec("x" * 129), "record.record_id"),
        (rec("r", trace=""), "record.trace_id"),
        (rec("r", trace="A" * 32), "record.trace_id"),
        (rec("r", kind=""), "record.kind"),
        (rec("r", run_id="bad run"), "record.run_id"),
        (rec("r", profile="bad profile"), "record.profile"),
        (rec("r", actor="a" * 257), "record.actor"),
        (rec("r", payload=to_struct({"big": "x" * 2000})), "record.payload"),
        (rec("r", payload=to_struct({"nan": math.nan})), "record.payload"),
        (rec("r", timestamp=timestamp(8_000_000_000)), "record.timestamp"),
    ],
)
async def test_record_validation_names_the_field(
    client: AuditClient, record: audit_pb2.AuditRecord, field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.record(audit_pb2.RecordRequest(record=record))
    assert info.value.field == field


async def test_unknown_kind_lists_the_known_kinds(client: AuditClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.record(audit_pb2.RecordRequest(record=rec("r", kind="lunch")))
    assert info.value.field == "record.kind"
    assert all(kind in info.value.message for kind in KNOWN_KINDS)


async def test_empty_requests_get_mapped_answers(client: AuditClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.record(audit_pb2.RecordRequest())
    assert info.value.field == "record"
    with pytest.raises(InvalidArgumentError) as info:
        await client.record_batch(audit_pb2.RecordBatchRequest())
    assert info.value.field == "records"
    assert await client.query(audit_pb2.QueryRequest()) == audit_pb2.QueryResponse()
    assert [x async for x in client.export(audit_pb2.ExportRequest())] == []
    with pytest.raises(InvalidArgumentError) as info:
        await client.verify(audit_pb2.VerifyRequest())
    assert info.value.field == "trace_id"


async def test_bad_batch_writes_nothing(client: AuditClient) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        await client.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec("ok"), rec("bad", kind="nope")])
        )
    assert info.value.field == "records[1].kind"
    with pytest.raises(InvalidArgumentError) as info:
        await client.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec(f"r{i}") for i in range(6)])
        )
    assert info.value.field == "records"
    await client.record(audit_pb2.RecordRequest(record=rec("r0")))
    with pytest.raises(AlreadyExistsError):
        await client.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec("new"), rec("r0", kind="retry")])
        )
    resp = await client.query(audit_pb2.QueryRequest())
    # Ids live in the writer's namespace; the refused write left an alarm, nothing else.
    assert [r.record_id for r in resp.records if r.kind != "audit_alarm"] == ["tester/r0"]
    (alarm,) = [r for r in resp.records if r.kind == "audit_alarm"]
    assert alarm.payload["record_id"] == "tester/r0" and alarm.payload["writer"] == "tester"


async def test_query_paging_filters_and_validation(client: AuditClient) -> None:
    await client.record_batch(
        audit_pb2.RecordBatchRequest(
            records=[rec(f"b{i}", T2, kind="retry" if i % 2 else "plan") for i in range(4)]
        )
    )
    await client.record_batch(
        audit_pb2.RecordBatchRequest(records=[rec(f"a{i}", T1) for i in range(3)])
    )
    ids: list[str] = []
    token = ""
    while True:
        resp = await client.query(audit_pb2.QueryRequest(page_size=3, page_token=token))
        ids += [r.record_id for r in resp.records]
        token = resp.next_page_token
        if not token:
            break
    assert ids == [f"tester/{i}" for i in ("a0", "a1", "a2", "b0", "b1", "b2", "b3")]
    resp = await client.query(
        audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id=T2, kinds=["retry"]))
    )
    assert [r.record_id for r in resp.records] == ["tester/b1", "tester/b3"]
    bad = [
        (audit_pb2.QueryRequest(page_size=1001), "page_size"),
        (audit_pb2.QueryRequest(page_token="!!!"), "page_token"),
        (audit_pb2.QueryRequest(page_token="bm90LWEtcG9zaXRpb24"), "page_token"),
        (audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(trace_id="xyz")), "filter.trace_id"),
        (
            audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(kinds=["plan", "x"])),
            "filter.kinds[1]",
        ),
        (audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(run_id="a b")), "filter.run_id"),
        (audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(profile="a b")), "filter.profile"),
        (
            audit_pb2.QueryRequest(
                filter=audit_pb2.RecordFilter(start_time=timestamp(20), end_time=timestamp(10))
            ),
            "filter.end_time",
        ),
    ]
    for request, field in bad:
        with pytest.raises(InvalidArgumentError) as info:
            await client.query(request)
        assert info.value.field == field


async def test_export_streams_json_lines(client: AuditClient) -> None:
    await client.record_batch(audit_pb2.RecordBatchRequest(records=[rec("x1"), rec("x2", T2)]))
    lines = [r.json_line async for r in client.export(audit_pb2.ExportRequest())]
    assert [json.loads(line)["record_id"] for line in lines] == ["tester/x1", "tester/x2"]
    assert from_json_line(lines[0]).chain_index == 1
    only = [
        r.json_line
        async for r in client.export(
            audit_pb2.ExportRequest(filter=audit_pb2.RecordFilter(trace_id=T2))
        )
    ]
    assert len(only) == 1
    with pytest.raises(InvalidArgumentError):
        async for _ in client.export(
            audit_pb2.ExportRequest(filter=audit_pb2.RecordFilter(kinds=["nope"]))
        ):
            pass


async def test_verify_ok_not_found_and_broken(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    async with running_service("audit", build, settings) as server:
        client = AuditClient(server.address, metadata=as_identity("tester"))
        await client.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec(f"v{i}") for i in range(4)])
        )
        ok = await client.verify(audit_pb2.VerifyRequest(trace_id=T1))
        assert ok.ok and ok.records_checked == 4 and not ok.problem
        with pytest.raises(NotFoundError):
            await client.verify(audit_pb2.VerifyRequest(trace_id=T2))
        with pytest.raises(InvalidArgumentError):
            await client.verify(audit_pb2.VerifyRequest(trace_id="not-hex"))
        conn = sqlite3.connect(tmp_path / "data" / "audit.db")
        with conn:
            conn.execute(
                "UPDATE audit_records SET payload='{\"id\":\"v9\"}' WHERE record_id='tester/v2'"
            )
        conn.close()
        broken = await client.verify(audit_pb2.VerifyRequest(trace_id=T1))
        assert not broken.ok
        assert (broken.first_broken_record_id, broken.first_broken_index) == ("tester/v2", 3)
        assert broken.problem
        await client.close()


@pytest.mark.parametrize("backend", ["jsonl", "postgres", "none"])
async def test_other_backends_serve_the_same_contract(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    env = {"CUGA_AUDIT__BACKEND": backend}
    if backend == "postgres":
        env["CUGA_AUDIT__DSN"] = request.getfixturevalue("postgres_dsn")
    async with running_service("audit", build, make_settings(tmp_path / "d", env)) as server:
        client = AuditClient(server.address, metadata=as_identity("tester"))
        resp = await client.record_batch(
            audit_pb2.RecordBatchRequest(records=[rec("k1"), rec("k2")])
        )
        assert [r.chain_index for r in resp.records] == [1, 2]
        stored = await client.query(audit_pb2.QueryRequest())
        if backend == "none":
            assert not stored.records
            with pytest.raises(NotFoundError):
                await client.verify(audit_pb2.VerifyRequest(trace_id=T1))
        else:
            assert [r.record_id for r in stored.records] == ["tester/k1", "tester/k2"]
            assert (await client.verify(audit_pb2.VerifyRequest(trace_id=T1))).ok
        await client.close()


def test_config_requires_a_dsn_for_postgres(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, {"CUGA_AUDIT__BACKEND": "postgres"})
    with pytest.raises(ConfigError) as info:
        settings.section(AuditConfig, "audit")
    assert info.value.key == "audit.dsn"
    with pytest.raises(ConfigError) as info:
        make_settings(tmp_path, {"CUGA_AUDIT__BACKEND": "mongo"}).section(AuditConfig, "audit")
    assert info.value.key == "audit.backend"
    with pytest.raises(ConfigError) as info:
        make_settings(tmp_path, {"CUGA_AUDIT__FSYNC": "sometimes"}).section(AuditConfig, "audit")
    assert info.value.key == "audit.fsync"


async def test_checkpoints_are_signed_at_the_interval_and_at_shutdown(tmp_path: Path) -> None:
    clock = FakeClock()
    settings = make_settings(tmp_path / "data", {"CUGA_AUDIT__CHECKPOINT_INTERVAL_S": "30"})
    sink = tmp_path / "data" / "audit-checkpoints" / "checkpoints.jsonl"

    def sizes() -> list[int]:
        lines = sink.read_text().splitlines() if sink.exists() else []
        return [json.loads(line)["tree_size"] for line in lines]

    async with running_service("audit", lambda s, t: build(s, t, clock=clock), settings) as server:
        client = AuditClient(server.address, metadata=as_identity("tester"))
        await client.record_batch(audit_pb2.RecordBatchRequest(records=[rec("i1"), rec("i2")]))
        await clock.until_sleepers(1)
        assert sizes() == []
        clock.advance(30)
        await clock.until_sleepers(1)  # the loop signed, and sleeps again
        assert sizes() == [2]
        clock.advance(30)  # nothing new: no new checkpoint
        await clock.until_sleepers(1)
        assert sizes() == [2]
        await client.record(audit_pb2.RecordRequest(record=rec("i3")))
        auditor = AuditClient(server.address, metadata=as_identity("auditor"))
        got = await auditor.get_checkpoint(audit_pb2.GetCheckpointRequest())  # on demand
        assert got.checkpoint.tree_size == 3 and sizes() == [2, 3]
        line = json.loads(sink.read_text().splitlines()[-1])
        assert open_checkpoint(line["note"], got.public_key).tree_size == 3
        assert line["public_key"] == got.public_key
        await client.record(audit_pb2.RecordRequest(record=rec("i4")))
        await client.close()
        await auditor.close()
    assert sizes() == [2, 3, 4]  # signed at shutdown


def test_an_explicit_checkpoint_key_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    settings = make_settings(tmp_path, {"CUGA_AUDIT__CHECKPOINT_KEY_FILE": str(missing)})
    with pytest.raises(ConfigError) as info:
        asyncio.run(build(settings, setup_telemetry("cuga-audit")))
    assert info.value.key == "audit.checkpoint_key_file"
    assert not missing.exists()
