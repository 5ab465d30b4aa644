"""B5: hash-chained audit appends vs plain SQLite inserts of the same rows.

The chained side is the audit service's own storage path — ``SQLiteAuditTrail.append``:
read of the batch's chain heads, SHA-256 over the canonical content plus the previous
hash, insert (the record-id primary key catches a resend; only then is the batch redone
with one ``record_id IN (…)`` lookup), head upsert per trace, one ``BEGIN IMMEDIATE``
transaction. Records are validated and made canonical (``AuditLog.prepare``) before the
clock starts, because a plain insert needs the same canonical payload text. The plain side
inserts exactly the rows the chained side stored (same columns, same values, same table and
indexes, same WAL + ``synchronous=NORMAL`` connection), with nothing else in the
transaction. Both are measured one record per transaction and in batches of 50.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.services.audit._sql import COLUMNS, SCHEMA, record_row
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.records import PendingRecord, canonical_json, content_of
from cuga.services.audit.sqlite_backend import SQLiteAuditTrail
from cuga.shared.messages import to_struct
from cuga.shared.sqlite import Transaction, open_sqlite


@dataclass(frozen=True)
class AuditSizes:
    """How much B5 measures."""

    records: int = 3000
    """Records appended per measurement."""
    per_trace: int = 50
    """Records per trace (one run's events)."""
    batch: int = 50
    """Records per transaction in the batched measurement."""
    rounds: int = 3
    """Alternating chained/plain rounds; the median rate of each is reported."""


def _pending(sizes: AuditSizes) -> list[PendingRecord]:
    log = AuditLog(SQLiteAuditTrail(":memory:"))
    out = []
    trace = run = ""
    for i in range(sizes.records):
        if i % sizes.per_trace == 0:
            trace = uuid.uuid4().hex
            run = uuid.uuid4().hex
        record = audit_pb2.AuditRecord(
            record_id=f"{run}/e{i % sizes.per_trace + 1}",
            trace_id=trace,
            run_id=run,
            profile="default",
            kind="step_result",
            actor="cuga-coordinator",
            payload=to_struct(
                {
                    "seq": i % sizes.per_trace + 1,
                    "stage": "LIFECYCLE_STAGE_EXECUTE",
                    "step_id": f"s{i % sizes.per_trace}",
                    "step_result": {"step_id": f"s{i % sizes.per_trace}", "worker_id": "worker-1"},
                }
            ),
        )
        record.timestamp.FromNanoseconds(time.time_ns())
        out.append(log.prepare(record))
    log.close()
    return out


def _chained(path: Path, pending: list[PendingRecord], batch: int) -> tuple[float, list[Any]]:
    backend = SQLiteAuditTrail(path)
    stored: list[audit_pb2.AuditRecord] = []
    try:
        t0 = time.perf_counter()
        for i in range(0, len(pending), batch):
            stored += [r.record for r in backend.append(pending[i : i + batch])]
        elapsed = time.perf_counter() - t0
    finally:
        backend.close()
    rows = [record_row(r, canonical_json(content_of(r)["payload"])) for r in stored]
    return len(pending) / elapsed, rows


def _plain(path: Path, rows: list[Any], batch: int) -> float:
    conn = open_sqlite(path)
    conn.executescript(SCHEMA)
    sql = f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join(['?'] * 11)})"
    try:
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            with Transaction(conn) as db:
                db.executemany(sql, rows[i : i + batch])
        elapsed = time.perf_counter() - t0
    finally:
        conn.close()
    return len(rows) / elapsed


def run_b5(sizes: AuditSizes) -> dict[str, Any]:
    """Chained vs plain, one per transaction and batched; median of alternating rounds."""
    pending = _pending(sizes)
    rates: dict[str, list[float]] = {"chained": [], "plain": [], "chained_b": [], "plain_b": []}
    with tempfile.TemporaryDirectory(prefix="cuga-bench-audit-") as tmp:
        for i in range(sizes.rounds):
            for key, batch in (("", 1), ("_b", sizes.batch)):
                rate, rows = _chained(Path(tmp) / f"chained{key}{i}.db", pending, batch)
                rates[f"chained{key}"].append(rate)
                rates[f"plain{key}"].append(_plain(Path(tmp) / f"plain{key}{i}.db", rows, batch))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    return {
        "chained_per_s": median(rates["chained"]),
        "plain_per_s": median(rates["plain"]),
        "chained_batch_per_s": median(rates["chained_b"]),
        "plain_batch_per_s": median(rates["plain_b"]),
        "records": sizes.records,
        "batch": sizes.batch,
    }


__all__ = ["AuditSizes", "run_b5"]
