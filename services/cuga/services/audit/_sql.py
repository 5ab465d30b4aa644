"""What the SQLite and PostgreSQL backends share: schema shape, SQL and row mapping.

Table ``audit_records`` holds one row per record with its content in columns (so an edit
to any column changes the recomputed hash) and ``audit_heads`` one row per trace with the
chain's last index and hash (so deleting the newest records is detected too).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.backend import AuditBackend, PruneResult
from cuga.services.audit.records import (
    AppendResult,
    CorruptEntry,
    Head,
    PendingRecord,
    Position,
    QueryPage,
    RecordFilter,
    VerifyResult,
    chain_records,
    ns_to_ts,
    payload_from_json,
    ts_to_ns,
    verify_chain,
)

COLUMNS = (
    "record_id, trace_id, chain_index, run_id, profile, kind, ts_ns, actor, payload, "
    "prev_hash, hash"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    record_id   TEXT PRIMARY KEY,
    trace_id    TEXT NOT NULL,
    chain_index BIGINT NOT NULL,
    run_id      TEXT NOT NULL,
    profile     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    ts_ns       BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    payload     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    UNIQUE (trace_id, chain_index)
);
CREATE INDEX IF NOT EXISTS audit_records_run ON audit_records (run_id);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts_ns);
CREATE TABLE IF NOT EXISTS audit_heads (
    trace_id   TEXT PRIMARY KEY,
    last_index BIGINT NOT NULL,
    last_hash  TEXT NOT NULL
)"""

#: The SQLite schema. ``audit_heads`` is ``WITHOUT ROWID`` so a head upsert rewrites one
#: B-tree page, not a table page plus its key index: a one-record transaction writes one
#: page less to the WAL. (Files made before keep their rowid table; both work.)
SCHEMA = _SCHEMA + " WITHOUT ROWID;\n"

#: The PostgreSQL schema (the same tables; PostgreSQL has no rowid tables).
POSTGRES_SCHEMA = _SCHEMA + ";\n"

#: Attempts of one append when a concurrent writer got in the way.
APPEND_ATTEMPTS = 5

#: Most ids in one ``IN (...)`` list (SQLite allows 32,766 parameters, PostgreSQL 65,535).
_IN_CHUNK = 500


def row_to_record(row: Sequence[Any]) -> audit_pb2.AuditRecord:
    """A record from a row of :data:`COLUMNS` (raises ValueError on a corrupt payload)."""
    record = audit_pb2.AuditRecord(
        record_id=row[0],
        trace_id=row[1],
        chain_index=int(row[2]),
        run_id=row[3],
        profile=row[4],
        kind=row[5],
        actor=row[7],
        prev_hash=row[9],
        hash=row[10],
    )
    record.timestamp.CopyFrom(ns_to_ts(int(row[6])))
    record.payload.CopyFrom(payload_from_json(row[8]))
    return record


def row_to_item(row: Sequence[Any]) -> audit_pb2.AuditRecord | CorruptEntry:
    """A record, or a :class:`CorruptEntry` when the row cannot be read."""
    try:
        return row_to_record(row)
    except (ValueError, TypeError) as exc:
        return CorruptEntry(f"row {row[0]!r}", str(row[0]), str(exc))


def _row_for_query(row: Sequence[Any]) -> audit_pb2.AuditRecord:
    item = row_to_item(row)
    if isinstance(item, CorruptEntry):
        # Query still answers (Verify is what reports the damage); the payload is left empty.
        record = audit_pb2.AuditRecord(
            record_id=row[0], trace_id=row[1], chain_index=int(row[2]), hash=row[10]
        )
        return record
    return item


def record_row(record: audit_pb2.AuditRecord, payload_json: str) -> tuple[Any, ...]:
    """The ``audit_records`` row of a chained record, in :data:`COLUMNS` order."""
    return (
        record.record_id,
        record.trace_id,
        record.chain_index,
        record.run_id,
        record.profile,
        record.kind,
        ts_to_ns(record.timestamp),
        record.actor,
        payload_json,
        record.prev_hash,
        record.hash,
    )


class SqlAuditBackend(AuditBackend):
    """An :class:`AuditBackend` over a DB-API connection; subclasses supply transactions."""

    #: Parameter placeholder of the driver.
    PH: str = "?"

    @abc.abstractmethod
    def _transaction(self, traces: Sequence[str]) -> AbstractContextManager[Any]:
        """A write transaction holding the per-trace locks of ``traces``; yields a cursor."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A read-only scope; yields a cursor."""

    def _is_retryable(self, exc: Exception) -> bool:
        """Whether an append failed only because a concurrent writer got in the way."""
        return False

    @abc.abstractmethod
    def _is_key_conflict(self, exc: Exception) -> bool:
        """Whether an insert failed on a unique key (for an append: a stored record id)."""

    @functools.cached_property
    def _insert_sql(self) -> str:
        return f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join([self.PH] * 11)})"

    @functools.cached_property
    def _upsert_head_sql(self) -> str:
        ph = self.PH
        return (
            f"INSERT INTO audit_heads (trace_id, last_index, last_hash) VALUES ({ph}, {ph}, {ph}) "
            "ON CONFLICT (trace_id) DO UPDATE SET "
            "last_index = excluded.last_index, last_hash = excluded.last_hash"
        )

    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        traces = sorted({p.record.trace_id for p in pending})
        # First try without looking the record ids up: the primary key refuses an id that
        # is already stored, and nearly every batch is new. A refused batch is rolled back
        # whole and tried again with the lookup, which tells a resend (duplicate) from a
        # conflict (ALREADY_EXISTS) exactly as if it had been looked up the first time.
        look_up = False
        failures = 0
        while True:
            try:
                return self._append_once(pending, traces, look_up=look_up)
            except Exception as exc:
                if not look_up and self._is_key_conflict(exc):
                    look_up = True
                    continue
                failures += 1
                if failures == APPEND_ATTEMPTS or not self._is_retryable(exc):
                    raise

    def _append_once(
        self, pending: Sequence[PendingRecord], traces: Sequence[str], *, look_up: bool
    ) -> list[AppendResult]:
        # A fixed number of statements per batch, whatever its size: one read of every
        # chain head, (when asked) one lookup of every record id, one insert of the new
        # rows, one upsert of the grown heads.
        with self._transaction(traces) as cur:
            heads = self._heads(cur, traces)
            stored = (
                self._stored(cur, list(dict.fromkeys(p.record.record_id for p in pending)))
                if look_up
                else {}
            )
            batch = chain_records(pending, stored.get, lambda trace: heads.get(trace, Head()))
            if batch.new:
                cur.executemany(
                    self._insert_sql,
                    [record_row(r, payload_json) for r, payload_json in batch.new],
                )
            if batch.heads:
                cur.executemany(
                    self._upsert_head_sql,
                    [(trace, h.index, h.hash) for trace, h in batch.heads.items()],
                )
        return batch.results

    def _stored(self, cur: Any, record_ids: Sequence[str]) -> dict[str, audit_pb2.AuditRecord]:
        """The stored records among ``record_ids``, by id (the idempotency check)."""
        found: dict[str, audit_pb2.AuditRecord] = {}
        for i in range(0, len(record_ids), _IN_CHUNK):
            chunk = record_ids[i : i + _IN_CHUNK]
            cur.execute(
                f"SELECT {COLUMNS} FROM audit_records "
                f"WHERE record_id IN ({', '.join([self.PH] * len(chunk))})",
                chunk,
            )
            for row in cur.fetchall():
                found[str(row[0])] = _row_for_query(row)
        return found

    def _heads(self, cur: Any, traces: Sequence[str]) -> dict[str, Head]:
        """The current chain head of each of ``traces`` that has one."""
        found: dict[str, Head] = {}
        for i in range(0, len(traces), _IN_CHUNK):
            chunk = traces[i : i + _IN_CHUNK]
            cur.execute(
                "SELECT trace_id, last_index, last_hash FROM audit_heads "
                f"WHERE trace_id IN ({', '.join([self.PH] * len(chunk))})",
                chunk,
            )
            for row in cur.fetchall():
                found[str(row[0])] = Head(int(row[1]), str(row[2]))
        return found

    def _where(self, flt: RecordFilter, after: Position | None) -> tuple[str, list[Any]]:
        ph = self.PH
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("trace_id", flt.trace_id),
            ("run_id", flt.run_id),
            ("profile", flt.profile),
        ):
            if value:
                clauses.append(f"{column} = {ph}")
                params.append(value)
        if flt.kinds:
            clauses.append(f"kind IN ({', '.join([ph] * len(flt.kinds))})")
            params.extend(flt.kinds)
        if flt.start_ns:
            clauses.append(f"ts_ns >= {ph}")
            params.append(flt.start_ns)
        if flt.end_ns:
            clauses.append(f"ts_ns < {ph}")
            params.append(flt.end_ns)
        if after is not None:
            clauses.append(f"(trace_id > {ph} OR (trace_id = {ph} AND chain_index > {ph}))")
            params.extend([after[0], after[0], after[1]])
        return ("WHERE " + " AND ".join(clauses)) if clauses else "", params

    def query(self, flt: RecordFilter, page_size: int, after: Position | None) -> QueryPage:
        where, params = self._where(flt, after)
        with self._read() as cur:
            cur.execute(
                f"SELECT {COLUMNS} FROM audit_records {where} "
                f"ORDER BY trace_id, chain_index LIMIT {self.PH}",
                (*params, page_size + 1),
            )
            rows = cur.fetchall()
        records = [_row_for_query(r) for r in rows[:page_size]]
        more = len(rows) > page_size
        last = records[-1] if records else None
        next_position = (last.trace_id, last.chain_index) if more and last else None
        return QueryPage(records, next_position)

    def verify(self, trace_id: str) -> VerifyResult | None:
        ph = self.PH
        with self._read() as cur:
            cur.execute(f"SELECT last_index FROM audit_heads WHERE trace_id = {ph}", (trace_id,))
            head = cur.fetchone()
            cur.execute(
                f"SELECT {COLUMNS} FROM audit_records WHERE trace_id = {ph} ORDER BY chain_index",
                (trace_id,),
            )
            rows = cur.fetchall()
        if head is None and not rows:
            return None
        return verify_chain((row_to_item(r) for r in rows), head_index=int(head[0]) if head else 0)

    def _expired_traces(self, older_than_ns: int) -> list[str]:
        with self._read() as cur:
            cur.execute(
                "SELECT trace_id FROM audit_records GROUP BY trace_id "
                f"HAVING MAX(ts_ns) < {self.PH}",
                (older_than_ns,),
            )
            return [str(r[0]) for r in cur.fetchall()]

    def prune(self, older_than_ns: int) -> PruneResult:
        ph = self.PH
        traces = records = 0
        for trace in self._expired_traces(older_than_ns):
            # One transaction per trace under its lock, re-checking the age: a record
            # appended meanwhile keeps the trace.
            with self._transaction([trace]) as cur:
                cur.execute(f"SELECT MAX(ts_ns) FROM audit_records WHERE trace_id = {ph}", (trace,))
                newest = cur.fetchone()
                if newest is None or newest[0] is None or int(newest[0]) >= older_than_ns:
                    continue
                cur.execute(f"DELETE FROM audit_records WHERE trace_id = {ph}", (trace,))
                records += int(cur.rowcount)
                cur.execute(f"DELETE FROM audit_heads WHERE trace_id = {ph}", (trace,))
                traces += 1
        return PruneResult(traces, records)


__all__ = [
    "COLUMNS",
    "POSTGRES_SCHEMA",
    "SCHEMA",
    "SqlAuditBackend",
    "row_to_item",
    "row_to_record",
]
