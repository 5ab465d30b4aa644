"""BufferedAuditTrail against a real audit server that goes away and comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.client.audit_buffer import BufferedAuditTrail
from cuga.services.audit.app import build
from cuga.shared.authorities import AuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.config import CallConfig
from cuga.shared.messages import to_struct
from cuga.shared.telemetry import setup_telemetry
from tests.support.ports import free_port
from tests.support.servers import as_identity, make_settings, running_service

TRACE = "e" * 32
#: Fail fast while the server is down: no transport retries beyond one extra attempt.
CALL = CallConfig(timeout_s=2.0)


def rec(i: int, kind: str = "step_started") -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=f"rec-{i:04d}", trace_id=TRACE, run_id="run-1", kind=kind, actor="coordinator"
    )
    r.payload.CopyFrom(to_struct({"i": i}))
    return r


def dead_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def stored_ids(address: str) -> list[str]:
    """The ids of every stored record, without their writer's namespace (``tester/``)."""
    client = AuditClient(address, metadata=as_identity("tester"))
    ids: list[str] = []
    token = ""
    while True:
        resp = await client.query(audit_pb2.QueryRequest(page_size=1000, page_token=token))
        assert all(r.record_id.startswith("tester/") for r in resp.records)
        ids += [r.record_id.removeprefix("tester/") for r in resp.records]
        token = resp.next_page_token
        if not token:
            break
    verify = await client.verify(audit_pb2.VerifyRequest(trace_id=TRACE))
    assert verify.ok, verify.problem
    await client.close()
    return ids


async def test_buffered_trail_satisfies_the_protocol(tmp_path: Path) -> None:
    buf = BufferedAuditTrail(
        AuditClient(dead_address(), metadata=as_identity("tester")), spill_dir=tmp_path
    )
    assert isinstance(buf, AuditTrail)
    await buf.close(timeout=0)


@pytest.mark.parametrize("backend", ["sqlite", "jsonl"])
async def test_server_stopped_mid_stream_every_record_arrives_once(
    tmp_path: Path, backend: str
) -> None:
    settings = make_settings(tmp_path / "data", {"CUGA_AUDIT__BACKEND": backend})
    clock = FakeClock()
    clock.auto_advance = True  # backoff sleeps pass at once; the test is about delivery
    expected = [rec(i).record_id for i in range(80)]
    async with running_service("audit", build, settings) as first:
        buf = BufferedAuditTrail(
            AuditClient(first.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=tmp_path / "spill",
            clock=clock,
            batch_size=7,
            max_buffered=20,
        )
        await buf.record_batch([rec(i) for i in range(10)])
        assert await buf.flush(10)
        # Stop while more records stream in: some are sent, some fail, some are in flight.
        stopping = asyncio.ensure_future(first.stop(grace=0.5))
        for i in range(10, 40):
            await buf.record_batch([rec(i)])
        await stopping
    # The server is down: records queue, the bound is reached, the rest goes to disk.
    await buf.record_batch([rec(i) for i in range(40, 80)])
    assert buf.depth >= 40
    assert buf.spilled > 0 and list((tmp_path / "spill").glob("spill-*.jsonl"))
    async with running_service("audit", build, settings) as second:
        await buf.retarget(AuditClient(second.address, call=CALL, metadata=as_identity("tester")))
        assert await buf.flush(30)
        assert buf.depth == 0 and buf.spilled == 0
        assert buf.failures > 0 and buf.rejected == 0
        assert await stored_ids(second.address) == expected
        await buf.close()
    assert not list((tmp_path / "spill").glob("spill-*"))


class SignallingClock(FakeClock):
    """A FakeClock that lets a test wait until someone sleeps on it."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        await super().sleep(seconds)


async def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    clock = SignallingClock()
    buf = BufferedAuditTrail(
        AuditClient(dead_address(), call=CALL, metadata=as_identity("tester")),
        spill_dir=tmp_path,
        clock=clock,
        initial_backoff_s=0.5,
        max_backoff_s=2.0,
    )
    await buf.record_batch([rec(1)])
    for expected in (0.5, 1.0, 2.0, 2.0):
        await asyncio.wait_for(clock.sleeping.wait(), 10)
        clock.sleeping.clear()
        assert clock.slept[-1] == expected
        clock.advance(expected)
    assert buf.depth == 1 and buf.failures == 4
    await buf.close(timeout=0)


async def test_close_spills_the_rest_and_the_next_instance_sends_it(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    clock = FakeClock()
    down = BufferedAuditTrail(
        AuditClient(dead_address(), call=CALL, metadata=as_identity("tester")),
        spill_dir=spill,
        clock=clock,
        batch_size=5,
        max_buffered=10,
    )
    await down.record_batch([rec(i) for i in range(25)])
    assert (down.depth, down.spilled) == (25, 15)
    await down.close(timeout=0)
    files = list(spill.glob("spill-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 25

    async with running_service("audit", build, make_settings(tmp_path / "data")) as server:
        up = BufferedAuditTrail(
            AuditClient(server.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=spill,
            batch_size=5,
            max_buffered=10,
        )
        assert up.depth == 25
        await up.record_batch([rec(i) for i in range(25, 30)])  # after the spilled ones
        assert await up.flush(20)
        assert await stored_ids(server.address) == [rec(i).record_id for i in range(30)]
        await up.close()
    assert not list(spill.glob("spill-*"))


async def test_refused_record_is_dropped_and_the_rest_goes_through(tmp_path: Path) -> None:
    async with running_service("audit", build, make_settings(tmp_path / "data")) as server:
        buf = BufferedAuditTrail(
            AuditClient(server.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=tmp_path,
        )
        await buf.record_batch([rec(0), rec(1, kind="not_a_kind"), rec(2)])
        assert await buf.flush(10)
        assert buf.rejected == 1 and buf.acknowledged == 3
        assert await stored_ids(server.address) == ["rec-0000", "rec-0002"]
        await buf.close()


async def test_records_keep_the_time_they_were_enqueued(tmp_path: Path) -> None:
    clock = FakeClock(1_750_000_000.0)
    async with running_service("audit", build, make_settings(tmp_path / "data")) as server:
        buf = BufferedAuditTrail(
            AuditClient(server.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=tmp_path,
            clock=clock,
        )
        record = rec(7)
        await buf.record_batch([record])
        assert not record.HasField("timestamp")  # the caller's message is not modified
        assert await buf.flush(10)
        client = AuditClient(server.address, metadata=as_identity("tester"))
        stored = (await client.query(audit_pb2.QueryRequest())).records
        assert [r.timestamp.seconds for r in stored] == [1_750_000_000]
        await client.close()
        await buf.close()


async def test_bad_sizes_are_refused_at_construction(tmp_path: Path) -> None:
    client = AuditClient(dead_address(), metadata=as_identity("tester"))
    for size in (0, 1001):
        with pytest.raises(ValueError, match="batch_size must be between 1 and 1000"):
            BufferedAuditTrail(client, spill_dir=tmp_path, batch_size=size)
    with pytest.raises(ValueError, match="max_buffered must be at least batch_size"):
        BufferedAuditTrail(client, spill_dir=tmp_path, batch_size=10, max_buffered=9)


async def test_a_closed_trail_refuses_records_and_closes_once(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    buf = BufferedAuditTrail(
        AuditClient(dead_address(), call=CALL, metadata=as_identity("tester")), spill_dir=spill
    )
    await buf.close(timeout=0)  # never started: nothing to stop, nothing to spill
    await buf.close(timeout=0)
    assert not list(spill.glob("spill-*"))
    with pytest.raises(RuntimeError, match="BufferedAuditTrail is closed"):
        await buf.record_batch([rec(0)])


async def test_a_record_without_an_id_gets_one(tmp_path: Path) -> None:
    async with running_service("audit", build, make_settings(tmp_path / "data")) as server:
        buf = BufferedAuditTrail(
            AuditClient(server.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=tmp_path,
        )
        await buf.start()
        nameless = rec(0)
        nameless.ClearField("record_id")
        await buf.record_batch([nameless])
        assert await buf.flush(10)
        (stored,) = await stored_ids(server.address)
        assert len(stored) == 32 and int(stored, 16) >= 0
        await buf.close()


async def test_spill_files_with_unreadable_lines_or_gone_lose_only_those(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill = tmp_path / "spill"
    down = BufferedAuditTrail(
        AuditClient(dead_address(), call=CALL, metadata=as_identity("tester")),
        spill_dir=spill,
        batch_size=5,
        max_buffered=5,
    )
    await down.record_batch([rec(i) for i in range(12)])
    await down.close(timeout=0)
    (segment,) = spill.glob("spill-*.jsonl")
    lines = segment.read_text().splitlines()
    assert len(lines) == 12
    # A torn write and a blank line among the records: only the torn record is lost.
    lines[3] = lines[3][: len(lines[3]) // 2]
    lines.insert(6, "")
    segment.write_text("".join(x + "\n" for x in lines))

    async with running_service("audit", build, make_settings(tmp_path / "data")) as server:
        up = BufferedAuditTrail(
            AuditClient(server.address, call=CALL, metadata=as_identity("tester")),
            spill_dir=spill,
            batch_size=5,
            max_buffered=5,
        )
        assert await up.flush(20)
        assert await stored_ids(server.address) == [rec(i).record_id for i in range(12) if i != 3]
        await up.close()
    assert "unreadable spilled audit record dropped" in caplog.text
    assert not list(spill.glob("spill-*"))

    # A spill file cut short underneath a running trail: what it lost is gone, the rest is
    # delivered and nothing waits for the missing lines.
    cut = BufferedAuditTrail(
        AuditClient(dead_address(), call=CALL, metadata=as_identity("tester")),
        spill_dir=tmp_path / "cut",
        batch_size=5,
        max_buffered=5,
    )
    await cut.record_batch([rec(i) for i in range(20, 28)])
    assert cut.spilled == 3
    (segment,) = (tmp_path / "cut").glob("spill-*.jsonl")
    segment.write_text(segment.read_text().splitlines()[0] + "\n")
    async with running_service("audit", build, make_settings(tmp_path / "data2")) as server:
        await cut.retarget(AuditClient(server.address, call=CALL, metadata=as_identity("tester")))
        assert await cut.flush(20)
        assert cut.spilled == 0 and cut.depth == 0
        assert await stored_ids(server.address) == [rec(i).record_id for i in range(20, 26)]
        await cut.close()


async def test_a_batch_is_sent_in_its_runs_trace_or_linked_to_each_run(tmp_path: Path) -> None:
    server_spans, client_spans = InMemorySpanExporter(), InMemorySpanExporter()
    client_telemetry = setup_telemetry(
        "cuga-test-coordinator", span_processors=[SimpleSpanProcessor(client_spans)], env={}
    )
    tracer = client_telemetry.tracer
    async with running_service(
        "audit",
        build,
        make_settings(tmp_path / "data"),
        span_processors=[SimpleSpanProcessor(server_spans)],
        telemetry_env={},
    ) as server:
        buf = BufferedAuditTrail(
            AuditClient(
                server.address,
                call=CALL,
                metadata=as_identity("tester"),
                interceptors=client_telemetry.client_interceptors(),
            ),
            spill_dir=tmp_path / "spill",
            tracer=tracer,
        )

        def of_run(span: trace.Span, run_id: str, i: int) -> audit_pb2.AuditRecord:
            record = rec(i)
            record.trace_id = format(span.get_span_context().trace_id, "032x")
            record.run_id = run_id
            return record

        with tracer.start_as_current_span("run-a") as run_a:
            await buf.record_batch([of_run(run_a, "run-a", 0), of_run(run_a, "run-a", 1)])
        assert await buf.flush(10)
        sends = [s for s in server_spans.get_finished_spans() if s.name.endswith("RecordBatch")]
        assert [s.context.trace_id for s in sends] == [run_a.get_span_context().trace_id]
        server_spans.clear()

        # Two runs' records in one batch: one cuga.audit.send span, linked to both runs.
        with tracer.start_as_current_span("run-b") as run_b:
            await buf.record_batch([of_run(run_b, "run-b", 2)])
        with tracer.start_as_current_span("run-c") as run_c:
            await buf.record_batch([of_run(run_c, "run-c", 3)])
        assert await buf.flush(10)
        await buf.close()
    (send,) = [s for s in client_spans.get_finished_spans() if s.name == "cuga.audit.send"]
    linked = {link.context.trace_id for link in send.links}
    assert linked == {run_b.get_span_context().trace_id, run_c.get_span_context().trace_id}
    (served,) = [s for s in server_spans.get_finished_spans() if s.name.endswith("RecordBatch")]
    assert served.context.trace_id == send.context.trace_id
