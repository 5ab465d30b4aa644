"""The same backend suite against SQLite, JSON lines and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.backend import AuditBackend, NoOpAuditTrail
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.jsonl_backend import JSONAuditTrail
from cuga.services.audit.postgres_backend import PostgresAuditTrail
from cuga.services.audit.records import from_json_line
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.clock import FakeClock
from cuga.shared.errors import AlreadyExistsError
from cuga.shared.messages import timestamp, to_struct
from cuga.shared.transparency import root_of
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.unit.test_audit_records import GOLDEN_CLOCK, GOLDEN_HASHES, golden_records

T1 = "a" * 32
T2 = "b" * 32
T0 = 1_700_000_000.0


def rec(
    rid: str,
    trace: str = T1,
    *,
    kind: str = "step_started",
    run: str = "run-1",
    at: float | None = None,
    payload: dict[str, object] | None = None,
    profile: str = "",
) -> audit_pb2.AuditRecord:
    r = audit_pb2.AuditRecord(
        record_id=rid,
        trace_id=trace,
        run_id=run,
        kind=kind,
        actor="coordinator",
        profile=profile,
    )
    r.payload.CopyFrom(to_struct(payload or {"n": rid}))
    if at is not None:
        r.timestamp.CopyFrom(timestamp(at))
    return r


@dataclass
class Store:
    """One backend under test plus ways to open another instance and to tamper with it."""

    kind: str
    open: Callable[[], AuditBackend]
    edit: Callable[[str], None]
    delete: Callable[[str], None]
    swap: Callable[[str, str], None]


def _sqlite_store(path: Path) -> Store:
    def sql(statement: str, *params: object) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(statement, params)
        conn.close()

    def swap(a: str, b: str) -> None:
        conn = sqlite3.connect(path)
        with conn:
            ia = conn.execute("SELECT chain_index FROM audit_records WHERE record_id=?", (a,))
            ib = conn.execute("SELECT chain_index FROM audit_records WHERE record_id=?", (b,))
            x, y = ia.fetchone()[0], ib.fetchone()[0]
            conn.execute("UPDATE audit_records SET chain_index=-1 WHERE record_id=?", (a,))
            conn.execute("UPDATE audit_records SET chain_index=? WHERE record_id=?", (x, b))
            conn.execute("UPDATE audit_records SET chain_index=? WHERE record_id=?", (y, a))
        conn.close()

    return Store(
        "sqlite",
        lambda: SQLiteAuditTrail(path),
        lambda rid: sql("UPDATE audit_records SET actor='mallory' WHERE record_id=?", rid),
        lambda rid: sql("DELETE FROM audit_records WHERE record_id=?", rid),
        swap,
    )


def _pg_store(dsn: str) -> Store:
    def sql(statement: str, *params: object) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement, params)  # type: ignore[arg-type]

    def swap(a: str, b: str) -> None:
        with psycopg.connect(dsn) as conn:
            x = conn.execute("SELECT chain_index FROM audit_records WHERE record_id=%s", (a,))
            xa = x.fetchone()[0]  # type: ignore[index]
            y = conn.execute("SELECT chain_index FROM audit_records WHERE record_id=%s", (b,))
            yb = y.fetchone()[0]  # type: ignore[index]
            conn.execute("UPDATE audit_records SET chain_index=-1 WHERE record_id=%s", (a,))
            conn.execute("UPDATE audit_records SET chain_index=%s WHERE record_id=%s", (xa, b))
            conn.execute("UPDATE audit_records SET chain_index=%s WHERE record_id=%s", (yb, a))

    return Store(
        "postgres",
        lambda: PostgresAuditTrail(dsn),
        lambda rid: sql("UPDATE audit_records SET actor='mallory' WHERE record_id=%s", rid),
        lambda rid: sql("DELETE FROM audit_records WHERE record_id=%s", rid),
        swap,
    )


def _jsonl_lines(directory: Path) -> list[tuple[Path, list[str]]]:
    return [(p, p.read_text().splitlines()) for p in sorted(directory.glob("audit-*.jsonl"))]


def _jsonl_rewrite(directory: Path, change: Callable[[list[str]], list[str]]) -> None:
    files = _jsonl_lines(directory)
    flat = [line for _, lines in files for line in lines]
    sizes = [len(lines) for _, lines in files]
    flat = change(flat)
    for path, n in zip([p for p, _ in files], sizes, strict=True):
        chunk, flat = flat[:n], flat[n:]
        path.write_text("".join(line + "\n" for line in chunk))
    if flat:
        files[-1][0].open("a").write("".join(line + "\n" for line in flat))


def _jsonl_store(directory: Path) -> Store:
    def find(lines: list[str], rid: str) -> int:
        return next(i for i, line in enumerate(lines) if json.loads(line)["record_id"] == rid)

    def edit(rid: str) -> None:
        def change(lines: list[str]) -> list[str]:
            i = find(lines, rid)
            data = json.loads(lines[i])
            data["actor"] = "mallory"
            lines[i] = json.dumps(data)
            return lines

        _jsonl_rewrite(directory, change)

    def delete(rid: str) -> None:
        def change(lines: list[str]) -> list[str]:
            lines[find(lines, rid)] = ""
            return lines

        _jsonl_rewrite(directory, change)

    def swap(a: str, b: str) -> None:
        def change(lines: list[str]) -> list[str]:
            i, j = find(lines, a), find(lines, b)
            lines[i], lines[j] = lines[j], lines[i]
            return lines

        _jsonl_rewrite(directory, change)

    return Store(
        "jsonl",
        lambda: JSONAuditTrail(directory, rotate_bytes=2048, fsync="always"),
        edit,
        delete,
        swap,
    )


@pytest.fixture(params=["sqlite", "jsonl", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return _sqlite_store(tmp_path / "audit.db")
    if request.param == "jsonl":
        return _jsonl_store(tmp_path / "jsonl")
    return _pg_store(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def audit(store: Store, clock: FakeClock) -> Iterator[AuditLog]:
    log = AuditLog(store.open(), clock=clock)
    yield log
    log.close()


async def _fill(audit: AuditLog, n: int = 5, trace: str = T1, prefix: str = "r") -> None:
    await audit.append([rec(f"{prefix}{i}", trace, at=T0 + i) for i in range(1, n + 1)])


async def test_append_chains_and_is_idempotent(audit: AuditLog) -> None:
    stored, dups = await audit.append([rec("r1"), rec("r2"), rec("r3", T2)])
    assert dups == 0
    assert [r.chain_index for r in stored] == [1, 2, 1]
    assert [r.leaf_index for r in stored] == [0, 1, 2] and {r.prev_hash for r in stored} == {""}
    assert stored[0].profile == "default"
    again, dups = await audit.append([rec("r1"), rec("r2"), rec("r4")])
    assert dups == 2
    assert [r.hash for r in again[:2]] == [r.hash for r in stored[:2]]
    assert again[2].chain_index == 3
    one, duplicate = await audit.record(rec("r4"))
    assert duplicate and one.hash == again[2].hash
    assert (await audit.verify(T1)).ok


async def test_same_id_other_body_is_already_exists_and_writes_nothing(audit: AuditLog) -> None:
    await audit.append([rec("r1", at=T0)])
    with pytest.raises(AlreadyExistsError, match="r1"):
        await audit.append([rec("r2", at=T0), rec("r1", at=T0, payload={"x": 1})])
    with pytest.raises(AlreadyExistsError):
        await audit.append([rec("r3", at=T0), rec("r3", at=T0, kind="retry")])
    records, _ = await audit.query(audit_pb2.RecordFilter(trace_id=T1))
    assert [r.record_id for r in records] == ["r1"]
    # Each refusal is an alarm, written by the audit service in a trace of its own.
    alarms, _ = await audit.query(audit_pb2.RecordFilter(kinds=["audit_alarm"]))
    assert sorted(a.payload["record_id"] for a in alarms) == ["r1", "r3"]
    assert {a.trace_id for a in alarms}.isdisjoint({T1, T2})
    assert all(a.record_id.startswith("audit/alarm-") for a in alarms)


async def test_resend_mixed_with_new_records_over_several_traces(audit: AuditLog) -> None:
    t3 = "c" * 32
    first, _ = await audit.append([rec("r1", at=T0), rec("r2", at=T0), rec("r3", T2, at=T0)])
    batch = [
        rec("r1", at=T0),  # stored: duplicate
        rec("r4", at=T0),  # new in T1
        rec("r3", T2, at=T0),  # stored: duplicate
        rec("r5", T2, at=T0),  # new in T2
        rec("r6", t3, at=T0),  # new trace
        rec("r4", at=T0),  # repeated within the batch: duplicate of the new r4
    ]
    stored, dups = await audit.append(batch)
    assert dups == 3
    assert [r.record_id for r in stored] == ["r1", "r4", "r3", "r5", "r6", "r4"]
    assert stored[0].hash == first[0].hash and stored[2].hash == first[2].hash
    assert [r.chain_index for r in stored] == [1, 3, 1, 2, 1, 3]
    assert [r.leaf_index for r in stored] == [0, 3, 2, 4, 5, 3]
    assert stored[5].hash == stored[1].hash
    for trace in (T1, T2, t3):
        assert (await audit.verify(trace)).ok
    records, _ = await audit.query(audit_pb2.RecordFilter(), 100)
    assert len(records) == 6


async def test_a_refused_batch_leaves_every_chain_head_where_it_was(audit: AuditLog) -> None:
    await audit.append([rec("r1", at=T0), rec("r2", T2, at=T0)])
    with pytest.raises(AlreadyExistsError):
        await audit.append(
            [rec("r3", at=T0), rec("r4", T2, at=T0), rec("r1", at=T0, payload={"x": 1})]
        )
    stored, dups = await audit.append([rec("r5", at=T0), rec("r6", T2, at=T0)])
    assert dups == 0
    # Leaf 2 is the alarm the refusal wrote; nothing of the refused batch was.
    assert [(r.chain_index, r.leaf_index) for r in stored] == [(2, 3), (2, 4)]
    assert (await audit.verify(T1)).ok and (await audit.verify(T2)).ok


async def test_batches_over_many_traces_and_their_resend(audit: AuditLog) -> None:
    # More ids and traces than one IN (...) list holds, so lookups go in several parts.
    traces = [f"{i:032x}" for i in range(520)]
    batch = [rec(f"m{i}", traces[i % 520], at=T0 + i) for i in range(600)]
    stored, dups = await audit.append(batch)
    assert dups == 0
    assert [r.chain_index for r in stored] == [1] * 520 + [2] * 80
    again, dups = await audit.append(batch)
    assert dups == 600
    assert [r.hash for r in again] == [r.hash for r in stored]
    more, dups = await audit.append([rec(f"n{i}", t, at=T0) for i, t in enumerate(traces)])
    assert dups == 0
    assert [r.chain_index for r in more] == [3] * 80 + [2] * 440
    assert more[519].leaf_index == 600 + 519
    assert (await audit.verify(traces[0])).ok and (await audit.verify(traces[519])).ok


async def test_every_backend_stores_the_pinned_hashes(store: Store) -> None:
    audit = AuditLog(store.open(), clock=FakeClock(GOLDEN_CLOCK))
    stored, _ = await audit.append(golden_records())
    assert [(r.record_id, r.chain_index, r.leaf_index, r.hash) for r in stored] == GOLDEN_HASHES
    audit.close()
    reopened = AuditLog(store.open())
    records, _ = await reopened.query(audit_pb2.RecordFilter(), 10)
    assert sorted((r.record_id, r.chain_index, r.leaf_index, r.hash) for r in records) == sorted(
        GOLDEN_HASHES
    )
    assert (await reopened.verify("c" * 32)).ok and (await reopened.verify("d" * 32)).ok
    reopened.close()


async def test_concurrent_duplicate_writes_store_once(audit: AuditLog) -> None:
    batch = [rec(f"r{i}", at=T0 + i) for i in range(10)]
    results = await asyncio.gather(*(audit.append(batch) for _ in range(8)))
    assert sorted(d for _, d in results) == [0, *[10] * 7]
    hashes = {tuple(r.hash for r in stored) for stored, _ in results}
    assert len(hashes) == 1
    records, _ = await audit.query(audit_pb2.RecordFilter(), 100)
    assert [r.chain_index for r in records] == list(range(1, 11))
    assert (await audit.verify(T1)).ok


async def test_query_pages_in_stable_order_and_filters(audit: AuditLog) -> None:
    await audit.append(
        [rec(f"b{i}", T2, at=T0 + i, kind="retry" if i % 2 else "step_result") for i in range(4)]
        + [rec(f"a{i}", T1, at=T0 + 10 + i, run="run-2", profile="p1") for i in range(5)]
    )
    seen: list[str] = []
    token = ""
    while True:
        page, token = await audit.query(audit_pb2.RecordFilter(), 2, token)
        assert len(page) <= 2
        seen += [r.record_id for r in page]
        if not token:
            break
    assert seen == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(4)]

    async def ids(**kw: object) -> list[str]:
        flt = audit_pb2.RecordFilter(**kw)  # type: ignore[arg-type]
        return [r.record_id for r in (await audit.query(flt, 100))[0]]

    assert await ids(trace_id=T2) == ["b0", "b1", "b2", "b3"]
    assert await ids(run_id="run-2") == [f"a{i}" for i in range(5)]
    assert await ids(kinds=["retry"]) == ["b1", "b3"]
    assert await ids(profile="p1") == [f"a{i}" for i in range(5)]
    assert await ids(start_time=timestamp(T0 + 2), end_time=timestamp(T0 + 11)) == [
        "a0",
        "b2",
        "b3",
    ]


async def test_export_is_json_lines_in_query_order(audit: AuditLog) -> None:
    await _fill(audit, 3, T2, "b")
    await _fill(audit, 2, T1, "a")
    lines = [line async for line in audit.export(audit_pb2.RecordFilter())]
    parsed = [from_json_line(line) for line in lines]
    assert [r.record_id for r in parsed] == ["a1", "a2", "b1", "b2", "b3"]
    assert all("\n" not in line for line in lines)
    queried, _ = await audit.query(audit_pb2.RecordFilter())
    assert parsed == queried


async def test_verify_detects_an_edited_record(audit: AuditLog, store: Store) -> None:
    await _fill(audit)
    store.edit("r3")
    result = await audit.verify(T1)
    assert not result.ok
    assert (result.first_broken_record_id, result.first_broken_index) == ("r3", 3)
    assert "edited" in result.problem


async def test_verify_detects_a_deleted_record(audit: AuditLog, store: Store) -> None:
    await _fill(audit)
    store.delete("r2")
    result = await audit.verify(T1)
    assert not result.ok and result.first_broken_index == 2
    assert "missing" in result.problem


async def test_verify_detects_a_deleted_last_record(audit: AuditLog, store: Store) -> None:
    await _fill(audit)
    store.delete("r5")
    result = await audit.verify(T1)
    assert not result.ok and result.first_broken_index == 5
    assert "missing" in result.problem


async def test_verify_detects_reordered_records(audit: AuditLog, store: Store) -> None:
    await _fill(audit)
    store.swap("r2", "r4")
    result = await audit.verify(T1)
    assert not result.ok
    assert result.first_broken_index == 2


async def test_prune_removes_whole_old_traces_and_keeps_the_rest_verifiable(
    audit: AuditLog, clock: FakeClock
) -> None:
    await _fill(audit, 4, T1, "old")
    await audit.append([rec("new1", T2, at=T0 - 100), rec("new2", T2, at=T0 + 86400 * 5)])
    clock.advance(86400 * 3)
    result = await audit.prune_expired(2)
    assert (result.traces, result.records) == (1, 4)
    records, _ = await audit.query(audit_pb2.RecordFilter())
    assert [r.record_id for r in records] == ["new1", "new2"]
    assert (await audit.verify(T2)).ok
    # The pruned records' leaves stay (tombstones): the tree and every proof still hold.
    entries, _ = await audit.entries(100)
    assert [e.record is None for e in entries] == [True] * 4 + [False] * 2
    assert root_of([e.leaf_hash for e in entries]) == audit.backend.frontier().root()
    # A pruned trace starts a fresh chain if it is written again.
    stored, _ = await audit.append([rec("again", T1, at=T0 + 86400 * 3)])
    assert stored[0].chain_index == 1 and (await audit.verify(T1)).ok


async def test_reopened_backend_keeps_chain_and_idempotency(store: Store) -> None:
    first = AuditLog(store.open())
    a, _ = await first.append([rec("r1", at=T0), rec("r2", at=T0)])
    first.close()
    second = AuditLog(store.open())
    b, dups = await second.append([rec("r2", at=T0), rec("r3", at=T0)])
    assert dups == 1 and b[0].hash == a[1].hash
    assert (b[1].chain_index, b[1].leaf_index) == (3, 2)
    assert (await second.verify(T1)).ok
    second.close()


async def test_every_field_of_an_appended_record_reads_back_from_storage(
    store: Store, clock: FakeClock
) -> None:
    # The append path writes each row from what prepare read (not the message again):
    # every column must still land where a read finds it, as the record it answered with.
    first = AuditLog(store.open(), clock=clock)
    batch = [
        rec("r1", at=T0 + 1.5, profile="team-a", kind="plan", run="run-9"),
        rec("r2", T2, payload={"nested": {"x": [1, "two", None]}}),  # stamped by the service
        rec("r3", at=T0 + 3, kind="step_result"),
    ]
    stored, _ = await first.append(batch, writer="cuga-coordinator")
    stored += (await first.append([rec("r4", at=T0 + 4, profile="team-b")]))[0]
    first.close()
    second = AuditLog(store.open())
    read, _ = await second.query(audit_pb2.RecordFilter(), 100)
    second.close()
    assert sorted(read, key=lambda r: r.leaf_index) == stored
    assert [r.record_id for r in stored[:3]] == [f"cuga-coordinator/r{i}" for i in (1, 2, 3)]
    assert stored[1].timestamp.ToNanoseconds() == int(T0 * 1e9)
    assert [r.profile for r in stored] == ["team-a", "default", "default", "team-b"]


async def test_two_replicas_writing_one_trace_keep_the_chain(store: Store) -> None:
    # For SQLite and JSONL this is one instance used from many threads; for PostgreSQL two
    # instances (two connections = two replicas) race on the same trace.
    one = store.open()
    two = store.open() if store.kind == "postgres" else one
    logs = [AuditLog(one), AuditLog(two)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                asyncio.run(logs[n % 2].append([rec(f"w{n}-{i}", at=T0 + i)]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    result = await logs[0].verify(T1)
    assert result.ok and result.records_checked == 60
    one.close()
    if two is not one:
        two.close()


def test_jsonl_corrupt_line_is_reported_not_skipped(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    audit = AuditLog(JSONAuditTrail(directory))
    asyncio.run(_fill(audit, 3))
    _jsonl_rewrite(directory, lambda lines: [lines[0], lines[1][: len(lines[1]) // 2], lines[2]])
    result = asyncio.run(audit.verify(T1))
    assert not result.ok and result.first_broken_index == 2
    assert "line 2" in result.problem
    # A line so damaged that no trace id can be read is reported for every trace.
    _jsonl_rewrite(directory, lambda lines: ["%%%", *lines])
    reopened = AuditLog(JSONAuditTrail(directory))
    result = asyncio.run(reopened.verify(T1))
    assert not result.ok and "line 1" in result.problem


def test_jsonl_torn_tail_does_not_glue_the_next_record(tmp_path: Path) -> None:
    directory = tmp_path / "j"
    audit = AuditLog(JSONAuditTrail(directory))
    asyncio.run(_fill(audit, 2))
    path = next(directory.glob("audit-*.jsonl"))
    path.write_bytes(path.read_bytes() + b'{"record_id": "torn", "trace_id": "' + T1.encode())
    reopened = AuditLog(JSONAuditTrail(directory))
    stored, _ = asyncio.run(reopened.append([rec("r3", at=T0)]))
    assert stored[0].chain_index == 3
    result = asyncio.run(reopened.verify(T1))
    assert not result.ok and "cannot be read" in result.problem


def test_jsonl_rotates_by_size_and_by_day(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    directory = tmp_path / "j"
    audit = AuditLog(JSONAuditTrail(directory, rotate_bytes=1024, clock=clock), clock=clock)
    for i in range(8):  # a batch always lands in one file; rotation happens between
        asyncio.run(audit.append([rec(f"r{i}", at=T0 + i)]))
    by_size = sorted(p.name for p in directory.glob("audit-*.jsonl"))
    assert len(by_size) > 1
    clock.advance(86400)
    asyncio.run(audit.append([rec("next-day")]))
    names = sorted(p.name for p in directory.glob("audit-*.jsonl"))
    assert names[-1].startswith("audit-20231115-")
    assert asyncio.run(audit.verify(T1)).ok


def test_noop_backend_records_nothing() -> None:
    audit = AuditLog(NoOpAuditTrail())
    stored, dups = asyncio.run(audit.append([rec("r1")]))
    assert stored[0].hash and dups == 0
    assert asyncio.run(audit.query(audit_pb2.RecordFilter())) == ([], "")
