"""What the SQLite and PostgreSQL backends share: schema, SQL and row mapping.

Tables:

* ``audit_records`` — one row per record (leaf), its content in columns, its leaf index
  and leaf hash;
* ``audit_heads`` — per trace, its last position (``chain_index``) and that record's hash;
* ``audit_nodes`` — complete tree nodes of level :data:`~cuga.services.audit.merkle.STORED_LEVEL`
  and above, hex;
* ``audit_tree`` — one row: the tree's size and frontier (the next append's starting point);
* ``audit_pruned`` — the leaf hash (and trace, time) of each record retention removed;
* ``audit_checkpoints`` — every checkpoint the service signed.

An append writes a fixed number of statements whatever the batch size. A database made
before the Merkle log (``record_id`` as the primary key, no ``leaf_index``) gets the
column and index at open, and its records are adopted as the log's first leaves in
``(ts_ns, trace_id, chain_index)`` order (:meth:`SqlAuditBackend._adopt`).
"""

from __future__ import annotations

import abc
import functools
import hashlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.backend import AuditBackend, PruneResult, TraceRecords
from cuga.services.audit.merkle import Frontier, LogDamagedError, NodeKey
from cuga.services.audit.records import (
    AppendResult,
    CorruptEntry,
    Entry,
    Head,
    PendingRecord,
    Position,
    QueryPage,
    RecordFilter,
    StoredCheckpoint,
    canonical_parts,
    ns_to_ts,
    payload_from_json,
    sequence_records,
    ts_to_ns,
)

COLUMNS = (
    "record_id, trace_id, chain_index, run_id, profile, kind, ts_ns, actor, payload, "
    "prev_hash, hash, leaf_index"
)


def _schema(leaf_key: str, without_rowid: str) -> str:
    return f"""
CREATE TABLE IF NOT EXISTS audit_records (
    leaf_index  {leaf_key},
    record_id   TEXT NOT NULL UNIQUE,
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
){without_rowid};
CREATE TABLE IF NOT EXISTS audit_nodes (
    level INTEGER NOT NULL,
    idx   BIGINT NOT NULL,
    hash  TEXT NOT NULL,
    PRIMARY KEY (level, idx)
){without_rowid};
CREATE TABLE IF NOT EXISTS audit_tree (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    size     BIGINT NOT NULL,
    frontier TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_pruned (
    leaf_index BIGINT PRIMARY KEY,
    hash       TEXT NOT NULL,
    trace_id   TEXT NOT NULL,
    ts_ns      BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    key_hash  TEXT NOT NULL,
    tree_size BIGINT NOT NULL,
    ts_ns     BIGINT NOT NULL,
    root      TEXT NOT NULL,
    note      TEXT NOT NULL,
    PRIMARY KEY (key_hash, tree_size, ts_ns)
);
"""


#: The SQLite schema: ``leaf_index`` is the rowid (no index of its own), and the small
#: keyed tables are ``WITHOUT ROWID`` (an upsert writes one B-tree page, not two).
SCHEMA = _schema("INTEGER PRIMARY KEY", " WITHOUT ROWID")

#: The PostgreSQL schema (the same tables; PostgreSQL has no rowid tables).
POSTGRES_SCHEMA = _schema("BIGINT PRIMARY KEY", "")

#: What a database made before the Merkle log is given at open.
UPGRADE = (
    "ALTER TABLE audit_records ADD COLUMN leaf_index BIGINT",
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_records_leaf ON audit_records (leaf_index)",
)

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
        leaf_index=int(row[11]) if row[11] is not None else 0,
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
        return audit_pb2.AuditRecord(
            record_id=row[0],
            trace_id=row[1],
            chain_index=int(row[2]),
            hash=row[10],
            leaf_index=int(row[11] or 0),
        )
    return item


def record_row(record: audit_pb2.AuditRecord, payload_json: str) -> tuple[Any, ...]:
    """The ``audit_records`` row of a stored record, in :data:`COLUMNS` order."""
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
        record.leaf_index,
    )


def _hash_bytes(text: Any, where: str) -> bytes:
    try:
        value = bytes.fromhex(str(text))
    except ValueError:
        value = b""
    if len(value) != 32:
        raise LogDamagedError(f"{where} does not hold a 32-byte hex hash")
    return value


class SqlAuditBackend(AuditBackend):
    """An :class:`AuditBackend` over a DB-API connection; subclasses supply transactions."""

    #: Parameter placeholder of the driver.
    PH: str = "?"
    #: The last tree state read, decoded: ``(size, stored text, frontier)``. Only reused
    #: when the stored text is the same, so a change made elsewhere is always seen.
    _tree_cache: tuple[int, str, Frontier] | None = None

    @abc.abstractmethod
    def _transaction(self, traces: Sequence[str]) -> AbstractContextManager[Any]:
        """A write transaction holding the log's write lock; yields a cursor."""

    @abc.abstractmethod
    def _read(self) -> AbstractContextManager[Any]:
        """A read-only scope; yields a cursor."""

    @abc.abstractmethod
    def _columns(self, cur: Any) -> set[str]:
        """The columns ``audit_records`` has."""

    def _is_retryable(self, exc: Exception) -> bool:
        """Whether an append failed only because a concurrent writer got in the way."""
        return False

    @abc.abstractmethod
    def _is_key_conflict(self, exc: Exception) -> bool:
        """Whether an insert failed on a unique key (for an append: a stored record id)."""

    # -- opening -------------------------------------------------------------------------

    def _upgrade(self) -> None:
        """Give a database made before the Merkle log its leaf column, then adopt any
        record without a leaf index. Called by subclasses once the schema exists."""
        with self._transaction([]) as cur:
            if "leaf_index" not in self._columns(cur):
                for statement in UPGRADE:
                    cur.execute(statement)
            cur.execute("SELECT 1 FROM audit_records WHERE leaf_index IS NULL LIMIT 1")
            if cur.fetchone() is not None:
                self._adopt(cur)

    def _adopt(self, cur: Any) -> None:
        """Make every record stored without a leaf index (by a version before the Merkle
        log) a leaf, in ``(ts_ns, trace_id, chain_index)`` order, with its leaf hash
        computed from its content (their ``prev_hash`` keeps the old chain's link). Their
        tamper evidence starts with the first checkpoint after this."""
        frontier = self._frontier(cur).copy()
        cur.execute(
            f"SELECT {COLUMNS} FROM audit_records WHERE leaf_index IS NULL "
            "ORDER BY ts_ns, trace_id, chain_index"
        )
        rows = cur.fetchall()
        nodes: list[tuple[int, int, bytes]] = []
        updates: list[tuple[Any, ...]] = []
        for row in rows:
            record = row_to_record(row)
            head, tail, _ = canonical_parts(record)
            leaf = hashlib.sha256(b"\x00" + head + str(record.chain_index).encode() + tail).digest()
            updates.append((frontier.size, leaf.hex(), record.record_id))
            frontier.append(leaf, nodes)
        ph = self.PH
        cur.executemany(
            f"UPDATE audit_records SET leaf_index = {ph}, hash = {ph} WHERE record_id = {ph}",
            updates,
        )
        self._write_tree(cur, nodes, frontier)

    # -- appending ----------------------------------------------------------------------

    @functools.cached_property
    def _insert_sql(self) -> str:
        return f"INSERT INTO audit_records ({COLUMNS}) VALUES ({', '.join([self.PH] * 12)})"

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
        # First try without looking the record ids up: the unique key refuses an id that
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
        # A fixed number of statements per batch, whatever its size: one read of the tree,
        # one of every chain head, (when asked) one lookup of every record id, one insert
        # of the new rows, one of the nodes they complete, one upsert of the grown heads,
        # one write of the tree.
        with self._transaction(traces) as cur:
            frontier = self._frontier(cur)
            heads = self._heads(cur, traces)
            stored = (
                self._stored(cur, list(dict.fromkeys(p.record.record_id for p in pending)))
                if look_up
                else {}
            )
            batch = sequence_records(
                pending, stored.get, lambda trace: heads.get(trace, Head()), frontier
            )
            if batch.new:
                rows = []
                for item, index, leaf_index, leaf_hash in batch.new:
                    # record_row's values, from what prepare read (no getter called again)
                    rid, trace, run, profile, kind, ts_ns, actor = item.columns
                    rows.append(
                        (
                            rid,
                            trace,
                            index,
                            run,
                            profile,
                            kind,
                            ts_ns,
                            actor,
                            item.payload_json,
                            "",  # prev_hash: deprecated, empty for new records
                            leaf_hash,
                            leaf_index,
                        )
                    )
                cur.executemany(self._insert_sql, rows)
                cur.executemany(
                    self._upsert_head_sql,
                    [(trace, h.index, h.hash) for trace, h in batch.heads.items()],
                )
                self._write_tree(cur, batch.nodes, batch.frontier)
        return batch.results

    def _write_tree(self, cur: Any, nodes: list[tuple[int, int, bytes]], tree: Frontier) -> None:
        ph = self.PH
        if nodes:
            cur.executemany(
                f"INSERT INTO audit_nodes (level, idx, hash) VALUES ({ph}, {ph}, {ph})",
                [(level, idx, value.hex()) for level, idx, value in nodes],
            )
        cur.execute(
            f"INSERT INTO audit_tree (id, size, frontier) VALUES (1, {ph}, {ph}) "
            "ON CONFLICT (id) DO UPDATE SET size = excluded.size, frontier = excluded.frontier",
            (tree.size, tree.encode()),
        )

    def _frontier(self, cur: Any) -> Frontier:
        cur.execute("SELECT size, frontier FROM audit_tree WHERE id = 1")
        row = cur.fetchone()
        if row is None:
            cur.execute("SELECT COUNT(*) FROM audit_records WHERE leaf_index IS NOT NULL")
            counted = cur.fetchone()
            if counted is not None and int(counted[0]):
                raise LogDamagedError("the tree state row is missing while records are stored")
            return Frontier()
        size, text = int(row[0]), str(row[1])
        cached = self._tree_cache
        if cached is not None and cached[0] == size and cached[1] == text:
            return cached[2]  # callers never change it (a batch grows a copy)
        frontier = Frontier.decode(size, text)
        self._tree_cache = (size, text, frontier)
        return frontier

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
        """The current head of each of ``traces`` that has one."""
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

    # -- reading ------------------------------------------------------------------------

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

    def trace(self, trace_id: str) -> TraceRecords | None:
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
        return TraceRecords([row_to_item(r) for r in rows], int(head[0]) if head else 0)

    def record(self, record_id: str) -> audit_pb2.AuditRecord | None:
        with self._read() as cur:
            cur.execute(
                f"SELECT {COLUMNS} FROM audit_records WHERE record_id = {self.PH}", (record_id,)
            )
            row = cur.fetchone()
        return None if row is None else _row_for_query(row)

    def frontier(self) -> Frontier:
        with self._read() as cur:
            return self._frontier(cur)

    def _leaf_rows(self, cur: Any, start: int, end: int) -> list[tuple[int, str, Any]]:
        """``(leaf_index, hash, row or None)`` of the leaves in ``[start, end)``, sorted."""
        ph = self.PH
        cur.execute(
            f"SELECT {COLUMNS} FROM audit_records WHERE leaf_index >= {ph} AND leaf_index < {ph}",
            (start, end),
        )
        out: list[tuple[int, str, Any]] = [(int(r[11]), str(r[10]), r) for r in cur.fetchall()]
        cur.execute(
            f"SELECT leaf_index, hash FROM audit_pruned WHERE leaf_index >= {ph} "
            f"AND leaf_index < {ph}",
            (start, end),
        )
        out.extend((int(r[0]), str(r[1]), None) for r in cur.fetchall())
        out.sort(key=lambda x: x[0])
        return out

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        ph = self.PH
        with self._read() as cur:
            cur.execute(
                f"SELECT leaf_index, hash FROM audit_records WHERE leaf_index >= {ph} "
                f"AND leaf_index < {ph} UNION ALL SELECT leaf_index, hash FROM audit_pruned "
                f"WHERE leaf_index >= {ph} AND leaf_index < {ph}",
                (start, end, start, end),
            )
            rows = sorted((int(r[0]), r[1]) for r in cur.fetchall())
        if [i for i, _ in rows] != list(range(start, end)):
            have = {i for i, _ in rows}
            gone = next(i for i in range(start, end) if i not in have)
            raise LogDamagedError(f"leaf {gone} is missing from the log (its record was deleted)")
        return [_hash_bytes(h, f"leaf {i}") for i, h in rows]

    def stored_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        if not keys:
            return {}
        ph = self.PH
        found: dict[NodeKey, bytes] = {}
        with self._read() as cur:
            for i in range(0, len(keys), _IN_CHUNK // 2):
                chunk = keys[i : i + _IN_CHUNK // 2]
                cur.execute(
                    "SELECT level, idx, hash FROM audit_nodes WHERE "
                    + " OR ".join([f"(level = {ph} AND idx = {ph})"] * len(chunk)),
                    [v for key in chunk for v in key],
                )
                for row in cur.fetchall():
                    key = (int(row[0]), int(row[1]))
                    found[key] = _hash_bytes(row[2], f"tree node {key[0]}/{key[1]}")
        return found

    def leaf_count(self) -> int:
        with self._read() as cur:
            cur.execute(
                "SELECT (SELECT COUNT(*) FROM audit_records WHERE leaf_index IS NOT NULL) + "
                "(SELECT COUNT(*) FROM audit_pruned)"
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def entries(self, start: int, limit: int) -> list[Entry]:
        with self._read() as cur:
            rows = self._leaf_rows(cur, start, start + limit)
        out: list[Entry] = []
        for expected, (index, digest, row) in enumerate(rows, start=start):
            if index != expected:
                break
            leaf = _hash_bytes(digest, f"leaf {index}")
            out.append(Entry(index, leaf, None if row is None else _row_for_query(row)))
        return out

    def save_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        ph = self.PH
        with self._transaction([]) as cur:
            cur.execute(
                "INSERT INTO audit_checkpoints (key_hash, tree_size, ts_ns, root, note) "
                f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT DO NOTHING",
                (
                    checkpoint.key_hash,
                    checkpoint.tree_size,
                    checkpoint.time_ns,
                    checkpoint.root.hex(),
                    checkpoint.note,
                ),
            )

    def latest_checkpoint(self, key_hash: str) -> StoredCheckpoint | None:
        with self._read() as cur:
            cur.execute(
                "SELECT key_hash, tree_size, ts_ns, root, note FROM audit_checkpoints "
                f"WHERE key_hash = {self.PH} ORDER BY tree_size DESC, ts_ns DESC LIMIT 1",
                (key_hash,),
            )
            row = cur.fetchone()
        if row is None:
            return None
        return StoredCheckpoint(
            str(row[0]), int(row[1]), _hash_bytes(row[3], "a checkpoint"), int(row[2]), row[4]
        )

    # -- retention ----------------------------------------------------------------------

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
            # One transaction per trace, re-checking the age: a record appended meanwhile
            # keeps the trace. The leaves stay as tombstones, so the tree does too.
            with self._transaction([trace]) as cur:
                cur.execute(f"SELECT MAX(ts_ns) FROM audit_records WHERE trace_id = {ph}", (trace,))
                newest = cur.fetchone()
                if newest is None or newest[0] is None or int(newest[0]) >= older_than_ns:
                    continue
                cur.execute(
                    "INSERT INTO audit_pruned (leaf_index, hash, trace_id, ts_ns) "
                    "SELECT leaf_index, hash, trace_id, ts_ns FROM audit_records "
                    f"WHERE trace_id = {ph}",
                    (trace,),
                )
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
    "record_row",
    "row_to_item",
    "row_to_record",
]
