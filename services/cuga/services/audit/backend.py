"""The storage interface every audit backend implements, and the no-op backend.

Backends are synchronous (SQLite, files and the PostgreSQL driver all block); the domain
calls them from a worker thread, and each backend serialises its own access.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cuga.services.audit.records import (
    AppendResult,
    Head,
    PendingRecord,
    Position,
    QueryPage,
    RecordFilter,
    VerifyResult,
    chain_records,
    to_json_line,
)

#: Records fetched per round trip while exporting.
EXPORT_PAGE = 500


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed."""

    traces: int
    records: int


class AuditBackend(abc.ABC):
    """Durable storage of hash-chained audit records.

    Order guarantee: :meth:`query` and :meth:`export` return records ordered by
    ``(trace_id, chain_index)``, which is stable across pages because both are immutable
    once written.
    """

    @abc.abstractmethod
    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        """Append records in order, atomically, chaining each to its trace's head.

        Idempotent by record id: a stored id with the same body is reported duplicate; with
        a different body nothing of the batch is written and AlreadyExistsError is raised.
        The record of each new entry of ``pending`` is completed in place (chain fields)
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
    def verify(self, trace_id: str) -> VerifyResult | None:
        """Recompute a trace's chain; None when the trace is unknown."""

    @abc.abstractmethod
    def prune(self, older_than_ns: int) -> PruneResult:
        """Delete every trace whose newest record is older than ``older_than_ns``."""

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold resources
        """Release connections and files."""


class NoOpAuditTrail(AuditBackend):
    """Stores nothing (audit switched off, or tests that do not look at the trail).

    Appends succeed and return the chained records as if stored (chain_index 1, no prev),
    so callers behave the same; queries are empty and Verify finds no trace.
    """

    def append(self, pending: Sequence[PendingRecord]) -> list[AppendResult]:
        return chain_records(pending, lambda _rid: None, lambda _trace: Head()).results

    def query(self, flt: RecordFilter, page_size: int, after: Position | None) -> QueryPage:
        return QueryPage([], None)

    def verify(self, trace_id: str) -> VerifyResult | None:
        return None

    def prune(self, older_than_ns: int) -> PruneResult:
        return PruneResult(0, 0)


__all__ = ["EXPORT_PAGE", "AuditBackend", "NoOpAuditTrail", "PruneResult"]
