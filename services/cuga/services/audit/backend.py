"""The storage interface every audit backend implements, and the no-op backend.

Backends are synchronous (SQLite, files and the PostgreSQL driver all block); the domain
calls them from a worker thread, and each backend serialises its own access.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cuga.audit.v1 import audit_pb2
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
    sequence_records,
    to_json_line,
)

#: Records fetched per round trip while exporting.
EXPORT_PAGE = 500


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed."""

    traces: int
    records: int


@dataclass(frozen=True)
class TraceRecords:
    """A trace's stored entries, for Verify."""

    items: list[audit_pb2.AuditRecord | CorruptEntry]
    """In the backend's stored order (chain order for SQL, file order for JSON lines)."""
    head_index: int
    """The trace's last position as recorded at write time (0: unknown)."""


class AuditBackend(abc.ABC):
    """Durable storage of the audit log: records (leaves), the tree and checkpoints.

    Order guarantee: :meth:`query` and :meth:`export` return records ordered by
    ``(trace_id, chain_index)``, which is stable across pages because both are immutable
    once written. The tree (:class:`~cuga.services.audit.merkle.TreeSource`) is read
    through :meth:`leaf_hashes` and :meth:`stored_nodes`.
    """

    @abc.abstractmethod
    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        """Append records in order, atomically, as the log's next leaves.

        Idempotent by record id: a stored id with the same body is reported duplicate; with
        a different body nothing of the batch is written and AlreadyExistsError is raised.
        The record of each new entry of ``pending`` is completed in place (log fields)
        and returned as the stored record.
        """

    @abc.abstractmethod
    def query(self, flt: RecordFilter, page_size: int, after: Position | None) -> QueryPage:
        """Up to ``page_size`` matching records after ``after``."""

    def export(self, flt: RecordFilter) -> Iterator[str]:
        """Every matching record as one JSON line (no newline), in query order."""
        after: Position | None = None
        while True:
            page = self.query(flt, EXPORT_PAGE, after)
            for record in page.records:
                yield to_json_line(record)
            if page.next_position is None:
                return
            after = page.next_position

    @abc.abstractmethod
    def trace(self, trace_id: str) -> TraceRecords | None:
        """A trace's stored entries; None when the trace is unknown."""

    @abc.abstractmethod
    def record(self, record_id: str) -> audit_pb2.AuditRecord | None:
        """The stored record with this id, or None."""

    @abc.abstractmethod
    def frontier(self) -> Frontier:
        """The tree as stored (its size and the hashes of its perfect subtrees).

        Raises:
            LogDamagedError: the stored tree state is unreadable.
        """

    @abc.abstractmethod
    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes ``[start, end)`` (tombstones included).

        Raises:
            LogDamagedError: one of them is missing.
        """

    @abc.abstractmethod
    def stored_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """The stored tree nodes among ``keys``."""

    @abc.abstractmethod
    def leaf_count(self) -> int:
        """How many leaves are stored (records and tombstones)."""

    @abc.abstractmethod
    def entries(self, start: int, limit: int) -> list[Entry]:
        """Up to ``limit`` leaves from ``start`` in leaf order (a missing one ends the list)."""

    @abc.abstractmethod
    def save_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        """Keep a checkpoint the service signed."""

    @abc.abstractmethod
    def latest_checkpoint(self, key_hash: str) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest tree signed with ``key_hash``, or None."""

    @abc.abstractmethod
    def prune(self, older_than_ns: int) -> PruneResult:
        """Remove the records of every trace whose newest record is older than
        ``older_than_ns``, keeping their leaf hashes (tombstones) so the tree stays whole."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold resources
        """Release connections and files."""


class NoOpAuditTrail(AuditBackend):
    """Stores nothing (audit switched off, or tests that do not look at the trail).

    Appends succeed and return the records as if stored (each the first of its trace and
    of the log), so callers behave the same; queries are empty, Verify finds no trace and
    the log stays empty.
    """

    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        return sequence_records(pending, lambda _rid: None, lambda _t: Head(), Frontier()).results

    def query(self, flt: RecordFilter, page_size: int, after: Position | None) -> QueryPage:
        return QueryPage([], None)

    def trace(self, trace_id: str) -> TraceRecords | None:
        return None

    def record(self, record_id: str) -> audit_pb2.AuditRecord | None:
        return None

    def frontier(self) -> Frontier:
        return Frontier()

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        if end > start:
            raise LogDamagedError("the audit backend 'none' stores no leaves")
        return []

    def stored_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        return {}

    def leaf_count(self) -> int:
        return 0

    def entries(self, start: int, limit: int) -> list[Entry]:
        return []

    def save_checkpoint(self, checkpoint: StoredCheckpoint) -> None:
        return None

    def latest_checkpoint(self, key_hash: str) -> StoredCheckpoint | None:
        return None

    def prune(self, older_than_ns: int) -> PruneResult:
        return PruneResult(0, 0)


__all__ = ["EXPORT_PAGE", "AuditBackend", "NoOpAuditTrail", "PruneResult", "TraceRecords"]
