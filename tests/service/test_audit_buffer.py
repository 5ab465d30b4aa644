"""BufferedAuditTrail against a real audit server that goes away and comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.client.audit_buffer import BufferedAuditTrail
from cuga.services.audit.app import build
from cuga.shared.authorities import AuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.config import CallConfig
from cuga.shared.messages import to_struct
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
