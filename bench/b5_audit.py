"""B5: Merkle-log audit appends vs plain SQLite inserts of the same rows, and proofs.

The chained side is the audit service's own storage path — ``SQLiteAuditTrail.append``:
read of the tree's frontier and the batch's trace heads, the RFC 9162 leaf hash of each
record (its RFC 8785 leaf data with its position in the trace) and the tree nodes it
completes, insert (the record-id unique key catches a resend; only then is the batch
redone with one ``record_id IN (…)`` lookup), the nodes of level 4 and above, head upsert
per trace, tree-state write, one ``BEGIN IMMEDIATE`` transaction. Records are validated
and made canonical (``AuditLog.prepare``) before the clock starts, because a plain insert
needs the same canonical payload text. The plain side inserts exactly the rows the
chained side stored (same columns, same values, same table and indexes, same WAL +
``synchronous=NORMAL`` connection), with nothing else in the transaction. Both are
measured one record per transaction and in batches of 50.

``python -m bench.b5_audit --proofs 1000000`` builds a log of that many leaves and times
inclusion and consistency proofs (generation from storage, and their size) at sizes
10^3 to 10^6: generation reads O(log n) rows, so the time per proof barely moves while the
log grows a thousandfold.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.services.audit._sql import COLUMNS, SCHEMA, record_row
from cuga.services.audit.domain import AuditLog
from cuga.services.audit.merkle import consistency_ranges, inclusion_ranges, range_hashes
from cuga.services.audit.records import PendingRecord
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


def _pending(sizes: AuditSizes, count: int | None = None) -> list[PendingRecord]:
    log = AuditLog(SQLiteAuditTrail(":memory:"))
    out = []
    trace = run = ""
    for i in range(sizes.records if count is None else count):
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
    rows = [record_row(r, p.payload_json) for r, p in zip(stored, pending, strict=True)]
    return len(pending) / elapsed, rows


def _plain(path: Path, rows: list[Any], batch: int) -> float:
    conn = open_sqlite(path)
    conn.executescript(SCHEMA)
    sql = f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join(['?'] * 12)})"
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


def _proof_times(backend: SQLiteAuditTrail, size: int, samples: int) -> dict[str, float]:
    """Median generation time (µs) and length of inclusion and consistency proofs at
    ``size`` leaves, over ``samples`` random leaves and older sizes."""
    rng = random.Random(size)
    inclusion: list[float] = []
    consistency: list[float] = []
    lengths: list[int] = []
    clengths: list[int] = []
    for _ in range(samples):
        index = rng.randrange(size)
        t0 = time.perf_counter()
        proof = range_hashes(backend, inclusion_ranges(index, size))
        inclusion.append((time.perf_counter() - t0) * 1e6)
        lengths.append(len(proof))
        old = rng.randrange(1, size)
        t0 = time.perf_counter()
        proof = range_hashes(backend, consistency_ranges(old, size))
        consistency.append((time.perf_counter() - t0) * 1e6)
        clengths.append(len(proof))
    return {
        "leaves": size,
        "inclusion_us": statistics.median(inclusion),
        "inclusion_hashes_max": max(lengths),
        "consistency_us": statistics.median(consistency),
        "consistency_hashes_max": max(clengths),
    }


def run_proofs(leaves: int, samples: int = 200, batch: int = 1000) -> list[dict[str, float]]:
    """Build a SQLite log of ``leaves`` records (batches of ``batch``) and time proofs at
    every power of ten from 10^3 up to it. Records are the B5 shape, 50 per trace."""
    sizes = AuditSizes()
    out: list[dict[str, float]] = []
    checkpoints = [10**k for k in range(3, 10) if 10**k <= leaves]
    with tempfile.TemporaryDirectory(prefix="cuga-bench-proofs-") as tmp:
        backend = SQLiteAuditTrail(Path(tmp) / "audit.db")
        try:
            built = 0
            t0 = time.perf_counter()
            while built < leaves:
                n = min(batch, leaves - built)
                backend.append(_pending(sizes, n))
                built += n
                if built in checkpoints:
                    out.append(_proof_times(backend, built, samples))
            build_s = time.perf_counter() - t0
        finally:
            backend.close()
    for row in out:
        row["build_s_total"] = build_s
    return out


def main() -> None:
    """``python -m bench.b5_audit [--proofs N]``: B5 ratios, or proof times up to N leaves."""
    parser = argparse.ArgumentParser(prog="python -m bench.b5_audit")
    parser.add_argument("--proofs", type=int, default=0, help="build a log this large")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    if args.proofs:
        for row in run_proofs(args.proofs, args.samples):
            print(json.dumps(row))
    else:
        print(json.dumps(run_b5(AuditSizes())))


if __name__ == "__main__":
    main()


__all__ = ["AuditSizes", "run_b5", "run_proofs"]
