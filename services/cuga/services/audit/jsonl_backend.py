"""The JSON-lines backend: append-only files, rotated per (UTC) day or size.

Files are ``audit-YYYYMMDD-NNNN.jsonl`` in one directory; their names sort in write order.
Each line is one leaf of the log, in leaf order: a record
(:func:`~cuga.services.audit.records.to_json_line`) or, once retention pruned it, a
tombstone keeping its leaf hash (``{"hash", "leaf_index", "pruned": true, "timestamp",
"trace_id"}``). The files are the source of truth: Query, Export and Verify read them, so
an edit made on disk is seen. In memory the backend keeps an index (record id -> file and
offset), each trace's head, and the tree (every leaf hash as stored, 32 bytes each, the
nodes of :data:`~cuga.services.audit.merkle.STORED_LEVEL` and above, the frontier),
rebuilt by scanning the files at start. Checkpoints the service signed are kept in
``checkpoints.jsonl`` beside them.

A line that is not a valid record (a torn write, a hand edit) is never skipped silently:
Verify reports it for the trace it names, or for every trace when no trace id can be read;
it is not a leaf, so the tree rebuilt at start no longer matches a checkpoint that
covered it. Lines written before the Merkle log (no ``leaf_index``) are adopted at start:
the files are rewritten with each such record's leaf index and leaf hash.
"""

from __future__ import annotations

import array
import datetime as dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.backend import AuditBackend, PruneResult, TraceRecords
from cuga.services.audit.config import FsyncPolicy
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
    from_json_dict,
    sequence_records,
    to_json_line,
    ts_to_ns,
)
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.files import open_private, private_dir, tighten

_NAME = re.compile(r"^audit-(\d{8})-(\d{4,})\.jsonl$")
_TRACE_IN_LINE = re.compile(r'"trace_id"\s*:\s*"([^"]*)"')
CHECKPOINTS_FILE = "checkpoints.jsonl"


@dataclass(frozen=True)
class _Loc:
    path: Path
    offset: int


@dataclass(frozen=True)
class _Tombstone:
    """A pruned record: its leaf hash stays."""

    leaf_index: int
    hash: str
    trace_id: str
    timestamp: str


@dataclass(frozen=True)
class _Line:
    path: Path
    number: int
    offset: int
    item: audit_pb2.AuditRecord | CorruptEntry | _Tombstone
    raw: bytes
    legacy: bool = False
    """A record written before the Merkle log (no leaf_index)."""


def _parse(text: str, where: str) -> tuple[audit_pb2.AuditRecord | CorruptEntry | _Tombstone, bool]:
    try:
        data = json.loads(text)
        if isinstance(data, dict) and data.get("pruned") is True:
            fields = (data.get("leaf_index"), data.get("hash"), data.get("trace_id"))
            if not isinstance(fields[0], int) or not all(isinstance(f, str) for f in fields[1:]):
                raise ValueError("malformed tombstone")
            return _Tombstone(
                int(data["leaf_index"]), data["hash"], data["trace_id"], str(data.get("timestamp"))
            ), False
        return from_json_dict(data), "leaf_index" not in data
    except (ValueError, TypeError) as exc:
        return CorruptEntry(where, "", str(exc)), False


def _tombstone_line(record: audit_pb2.AuditRecord) -> bytes:
    data = {
        "hash": record.hash,
        "leaf_index": record.leaf_index,
        "pruned": True,
        "timestamp": record.timestamp.ToJsonString(),
        "trace_id": record.trace_id,
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


class JSONAuditTrail(AuditBackend):
    """Audit records in append-only JSON-lines files.

    Args:
        directory: where the files live (created owner-only, 0700; files are 0600, and
            looser ones found at start are tightened).
        rotate_bytes: start a new file once the current one would pass this size.
        fsync: ``always`` (after each record), ``batch`` (once per append) or ``never``.
        clock: decides the day of the current file.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        rotate_bytes: int = 64 * 1024 * 1024,
        fsync: FsyncPolicy = "batch",
        clock: Clock | None = None,
    ) -> None:
        self.directory = Path(directory)
        private_dir(self.directory)
        self._rotate_bytes = rotate_bytes
        self._fsync = fsync
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._index: dict[str, _Loc] = {}
        self._heads: dict[str, Head] = {}
        self._current: Path | None = None
        # The tree: every leaf hash (32 bytes each, in leaf order), where each leaf's line
        # is (file number in _paths, offset), the stored nodes and the frontier.
        self._leaves = bytearray()
        self._paths: list[Path] = []
        self._leaf_file = array.array("I")
        self._leaf_offset = array.array("Q")
        self._nodes: dict[NodeKey, bytes] = {}
        self._frontier = Frontier()
        self._rebuild()

    # -- files -------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """The data files in write order."""
        return sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))

    def _lines(self, path: Path) -> Iterator[_Line]:
        offset = 0
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                start = offset
                offset += len(raw)
                text = raw.rstrip(b"\n")
                if not text.strip():
                    continue
                where = f"{path.name} line {number}"
                try:
                    item, legacy = _parse(text.decode("utf-8"), where)
                except UnicodeDecodeError as exc:
                    item, legacy = CorruptEntry(where, "", str(exc)), False
                yield _Line(path, number, start, item, text, legacy)

    def _all_lines(self) -> Iterator[_Line]:
        for path in self.files():
            yield from self._lines(path)

    def _rebuild(self) -> None:
        for path in self.files():
            tighten(path)  # written by an older version, maybe readable by others
        if any(line.legacy for line in self._all_lines()):
            self._adopt()
        self._index.clear()
        self._heads.clear()
        self._leaves = bytearray()
        self._paths = []
        self._leaf_file = array.array("I")
        self._leaf_offset = array.array("Q")
        self._nodes.clear()
        self._frontier = Frontier()
        numbers: dict[Path, int] = {}
        for line in self._all_lines():
            item = line.item
            if isinstance(item, CorruptEntry):
                continue
            if isinstance(item, _Tombstone):
                digest = item.hash
            else:
                self._index.setdefault(item.record_id, _Loc(line.path, line.offset))
                head = self._heads.setdefault(item.trace_id, Head())
                if item.chain_index > head.index:
                    head.index, head.hash = item.chain_index, item.hash
                digest = item.hash
            try:
                leaf = bytes.fromhex(digest)
            except ValueError:
                leaf = b""
            if len(leaf) != 32:  # a hand-edited hash: keep the position, it will not verify
                leaf = bytes(32)
            if line.path not in numbers:
                numbers[line.path] = len(self._paths)
                self._paths.append(line.path)
            self._add_leaf(leaf, numbers[line.path], line.offset)
        files = self.files()
        self._current = files[-1] if files else None
        if self._current is not None:
            # A torn last write leaves a line without newline; end it so the next record
            # starts on its own line (the torn line stays and Verify reports it).
            with self._current.open("rb+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")

    def _add_leaf(self, leaf: bytes, file_number: int, offset: int) -> None:
        nodes: list[tuple[int, int, bytes]] = []
        self._frontier.append(leaf, nodes)
        for level, index, value in nodes:
            self._nodes[(level, index)] = value
        self._leaves += leaf
        self._leaf_file.append(file_number)
        self._leaf_offset.append(offset)

    def _adopt(self) -> None:
        """Rewrite the files so that every record written before the Merkle log carries
        its leaf index and leaf hash (file order is leaf order)."""
        ordinal = 0
        for path in self.files():
            out: list[bytes] = []
            for line in self._lines(path):
                item = line.item
                if isinstance(item, CorruptEntry):
                    out.append(line.raw + b"\n")
                    continue
                if isinstance(item, audit_pb2.AuditRecord) and line.legacy:
                    head, tail, payload_json = canonical_parts(item)
                    item.leaf_index = ordinal
                    item.hash = hashlib.sha256(
                        b"\x00" + head + str(item.chain_index).encode() + tail
                    ).hexdigest()
                    out.append((to_json_line(item, payload_json) + "\n").encode("utf-8"))
                else:
                    out.append(line.raw + b"\n")
                ordinal += 1
            self._replace(path, out)

    def _replace(self, path: Path, lines: list[bytes]) -> None:
        # Rewrite beside and rename: a crash leaves either the old or the new file.
        tmp = path.with_suffix(".jsonl.tmp")
        with open_private(tmp, "wb") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _target(self, size: int) -> Path:
        day = dt.datetime.fromtimestamp(self._clock.now(), dt.UTC).strftime("%Y%m%d")
        current = self._current
        if current is not None:
            m = _NAME.match(current.name)
            assert m is not None
            used = current.stat().st_size
            if m.group(1) == day and (used == 0 or used + size <= self._rotate_bytes):
                return current
            seq = int(m.group(2)) + 1
        else:
            seq = 1
        self._current = self.directory / f"audit-{day}-{seq:04d}.jsonl"
        return self._current

    def _read_at(self, loc: _Loc) -> audit_pb2.AuditRecord | None:
        try:
            with loc.path.open("rb") as f:
                f.seek(loc.offset)
                item, _ = _parse(f.readline().decode("utf-8"), str(loc.path))
        except (OSError, UnicodeDecodeError):
            return None
        return item if isinstance(item, audit_pb2.AuditRecord) else None

    # -- AuditBackend --------------------------------------------------------------------

    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        with self._lock:
            batch = sequence_records(
                pending,
                lambda rid: self._read_at(self._index[rid]) if rid in self._index else None,
                lambda trace: self._heads.get(trace, Head()),
                self._frontier,
            )
            results = batch.results
            new = [item.record for item, *_ in batch.new]
            if not new:
                return results
            lines = [
                (to_json_line(item.record, item.payload_json) + "\n").encode("utf-8")
                for item, *_ in batch.new
            ]
            path = self._target(sum(len(b) for b in lines))
            offsets: list[int] = []
            with open_private(path, "ab") as f:
                offset = f.tell()
                for data in lines:
                    f.write(data)
                    offsets.append(offset)
                    offset += len(data)
                    if self._fsync == "always":
                        f.flush()
                        os.fsync(f.fileno())
                if self._fsync == "batch":
                    f.flush()
                    os.fsync(f.fileno())
            if not self._paths or self._paths[-1] != path:
                self._paths.append(path)
            number = len(self._paths) - 1
            for rec, offset in zip(new, offsets, strict=True):
                self._index[rec.record_id] = _Loc(path, offset)
                self._leaves += bytes.fromhex(rec.hash)
                self._leaf_file.append(number)
                self._leaf_offset.append(offset)
            for level, index, value in batch.nodes:
                self._nodes[(level, index)] = value
            self._frontier = batch.frontier
            self._heads.update(batch.heads)
            return results

    def query(self, flt: RecordFilter, page_size: int, after: Position | None) -> QueryPage:
        with self._lock:
            found = [
                line.item
                for line in self._all_lines()
                if isinstance(line.item, audit_pb2.AuditRecord)
                and flt.matches(line.item)
                and (after is None or (line.item.trace_id, line.item.chain_index) > after)
            ]
        found.sort(key=lambda r: (r.trace_id, r.chain_index))
        records = found[:page_size]
        more = len(found) > page_size
        last = records[-1] if records else None
        return QueryPage(records, (last.trace_id, last.chain_index) if more and last else None)

    def export(self, flt: RecordFilter) -> Iterator[str]:
        page = self.query(flt, 2**62, None)
        for record in page.records:
            yield to_json_line(record)

    def trace(self, trace_id: str) -> TraceRecords | None:
        with self._lock:
            items: list[audit_pb2.AuditRecord | CorruptEntry] = []
            for line in self._all_lines():
                item = line.item
                if isinstance(item, CorruptEntry):
                    m = _TRACE_IN_LINE.search(line.raw.decode("utf-8", "replace"))
                    if m is None or m.group(1) == trace_id:
                        items.append(item)
                elif isinstance(item, audit_pb2.AuditRecord) and item.trace_id == trace_id:
                    items.append(item)
            head = self._heads.get(trace_id)
        if not items and head is None:
            return None
        return TraceRecords(items, head.index if head else 0)

    def record(self, record_id: str) -> audit_pb2.AuditRecord | None:
        with self._lock:
            loc = self._index.get(record_id)
            return None if loc is None else self._read_at(loc)

    def frontier(self) -> Frontier:
        with self._lock:
            return self._frontier.copy()

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        with self._lock:
            if end * 32 > len(self._leaves):
                raise LogDamagedError(f"leaf {len(self._leaves) // 32} is missing from the log")
            return [bytes(self._leaves[i * 32 : i * 32 + 32]) for i in range(start, end)]

    def stored_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        with self._lock:
            return {key: self._nodes[key] for key in keys if key in self._nodes}

    def leaf_count(self) -> int:
        with self._lock:
            return len(self._leaves) // 32

    def entries(self, start: int, limit: int) -> list[Entry]:
        out: list[Entry] = []
        with self._lock:
            end = min(start + limit, len(self._leaves) // 32)
            handles: dict[int, IO[bytes]] = {}
            try:
                for i in range(start, end):
                    number = self._leaf_file[i]
                    f = handles.get(number)
                    if f is None:
                        f = handles[number] = self._paths[number].open("rb")
                    f.seek(self._leaf_offset[i])
                    raw = f.readline().decode("utf-8", "replace")
                    item, _ = _parse(raw, f"leaf {i}")
                    record = item if isinstance(item, audit_pb2.AuditRecord) else None
                    out.append(Entry(i, bytes(self._leaves[i * 32 : i * 32 + 32]), record))
            finally:
                for f in handles.values():
                    f.close()
        return out

    def save_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        line = json.dumps(
            {
                "key_hash": checkpoint.key_hash,
                "note": checkpoint.note,
                "root": checkpoint.root.hex(),
                "time_ns": checkpoint.time_ns,
                "tree_size": checkpoint.tree_size,
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        with self._lock, open_private(self.directory / CHECKPOINTS_FILE, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def latest_checkpoint(self, key_hash: str) -> StoredCheckpoint | None:
        best: StoredCheckpoint | None = None
        path = self.directory / CHECKPOINTS_FILE
        with self._lock:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                return None
        for text in lines:
            try:
                data = json.loads(text)
                cp = StoredCheckpoint(
                    str(data["key_hash"]),
                    int(data["tree_size"]),
                    bytes.fromhex(data["root"]),
                    int(data["time_ns"]),
                    str(data["note"]),
                )
            except (ValueError, KeyError, TypeError):
                continue
            if cp.key_hash == key_hash and (
                best is None or (cp.tree_size, cp.time_ns) >= (best.tree_size, best.time_ns)
            ):
                best = cp
        return best

    def prune(self, older_than_ns: int) -> PruneResult:
        with self._lock:
            newest: dict[str, int] = {}
            for line in self._all_lines():
                if isinstance(line.item, audit_pb2.AuditRecord):
                    ts = ts_to_ns(line.item.timestamp)
                    newest[line.item.trace_id] = max(ts, newest.get(line.item.trace_id, ts))
            expired = {t for t, ts in newest.items() if ts < older_than_ns}
            if not expired:
                return PruneResult(0, 0)
            removed = 0
            for path in self.files():
                kept: list[bytes] = []
                dropped = 0
                for line in self._lines(path):
                    item = line.item
                    if isinstance(item, audit_pb2.AuditRecord) and item.trace_id in expired:
                        dropped += 1
                        kept.append(_tombstone_line(item) + b"\n")
                    else:
                        kept.append(line.raw + b"\n")
                if dropped:
                    removed += dropped
                    self._replace(path, kept)
            self._rebuild()
            return PruneResult(len(expired), removed)


__all__ = ["CHECKPOINTS_FILE", "JSONAuditTrail"]
