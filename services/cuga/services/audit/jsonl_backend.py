"""The JSON-lines backend: append-only files, rotated per (UTC) day or size.

Files are ``audit-YYYYMMDD-NNNN.jsonl`` in one directory; their names sort in write order.
Each line is one record (:func:`~cuga.services.audit.records.to_json_line`). The files are
the source of truth: Query, Export and Verify read them, so an edit made on disk is seen.
In memory the backend keeps only an index (record id -> file and offset) and each trace's
chain head, rebuilt by scanning the files at start.

A line that is not a valid record (a torn write, a hand edit) is never skipped silently:
Verify reports it for the trace it names, or for every trace when no trace id can be read.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cuga.audit.v1 import audit_pb2
from cuga.services.audit.backend import AuditBackend, PruneResult
from cuga.services.audit.config import FsyncPolicy
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
    from_json_line,
    to_json_line,
    ts_to_ns,
    verify_chain,
)
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.files import open_private, private_dir, tighten

_NAME = re.compile(r"^audit-(\d{8})-(\d{4,})\.jsonl$")
_TRACE_IN_LINE = re.compile(r'"trace_id"\s*:\s*"([^"]*)"')


@dataclass(frozen=True)
class _Loc:
    path: Path
    offset: int


@dataclass(frozen=True)
class _Line:
    path: Path
    number: int
    offset: int
    item: audit_pb2.AuditRecord | CorruptEntry
    raw: bytes


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
                item: audit_pb2.AuditRecord | CorruptEntry
                try:
                    item = from_json_line(text.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    item = CorruptEntry(where, "", str(exc))
                yield _Line(path, number, start, item, text)

    def _all_lines(self) -> Iterator[_Line]:
        for path in self.files():
            yield from self._lines(path)

    def _rebuild(self) -> None:
        self._index.clear()
        self._heads.clear()
        for path in self.files():
            tighten(path)  # written by an older version, maybe readable by others
        for line in self._all_lines():
            if isinstance(line.item, CorruptEntry):
                continue
            rec = line.item
            self._index.setdefault(rec.record_id, _Loc(line.path, line.offset))
            head = self._heads.setdefault(rec.trace_id, Head())
            if rec.chain_index > head.index:
                head.index, head.hash = rec.chain_index, rec.hash
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
                return from_json_line(f.readline().decode("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    # -- AuditBackend --------------------------------------------------------------------

    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        with self._lock:
            batch = chain_records(
                pending,
                lambda rid: self._read_at(self._index[rid]) if rid in self._index else None,
                lambda trace: Head(**vars(self._heads.get(trace, Head()))),
            )
            results, heads = batch.results, batch.heads
            new = [record for record, _ in batch.new]
            if not new:
                return results
            lines = [(to_json_line(r, pj) + "\n").encode("utf-8") for r, pj in batch.new]
            path = self._target(sum(len(b) for b in lines))
            with open_private(path, "ab") as f:
                offset = f.tell()
                for rec, data in zip(new, lines, strict=True):
                    f.write(data)
                    self._index[rec.record_id] = _Loc(path, offset)
                    offset += len(data)
                    if self._fsync == "always":
                        f.flush()
                        os.fsync(f.fileno())
                if self._fsync == "batch":
                    f.flush()
                    os.fsync(f.fileno())
            self._heads.update(heads)
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

    def verify(self, trace_id: str) -> VerifyResult | None:
        with self._lock:
            items: list[audit_pb2.AuditRecord | CorruptEntry] = []
            for line in self._all_lines():
                item = line.item
                if isinstance(item, CorruptEntry):
                    m = _TRACE_IN_LINE.search(line.raw.decode("utf-8", "replace"))
                    if m is None or m.group(1) == trace_id:
                        items.append(item)
                elif item.trace_id == trace_id:
                    items.append(item)
            head = self._heads.get(trace_id)
        if not items and head is None:
            return None
        return verify_chain(items, head_index=head.index if head else 0)

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
                    if isinstance(line.item, audit_pb2.AuditRecord) and (
                        line.item.trace_id in expired
                    ):
                        dropped += 1
                    else:
                        kept.append(line.raw + b"\n")
                if not dropped:
                    continue
                removed += dropped
                # Rewrite beside and rename: a crash leaves either the old or the new file.
                tmp = path.with_suffix(".jsonl.tmp")
                with open_private(tmp, "wb") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            self._rebuild()
            return PruneResult(len(expired), removed)


__all__ = ["JSONAuditTrail"]
