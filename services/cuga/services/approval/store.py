"""Durable storage of approval requests: one SQLite file, ``approval.db``.

Each request is stored as its serialised ``ApprovalRequest`` message plus the columns the
service queries by (status, profile, times, idempotency keys). Decisions live inside the
message, so a request and its decisions change together in one transaction.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.shared.messages import seconds
from cuga.shared.sqlite import Transaction, open_sqlite

PENDING = common_pb2.APPROVAL_STATUS_PENDING

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    approval_id TEXT PRIMARY KEY,
    request_id  TEXT,
    run_id      TEXT NOT NULL,
    step_id     TEXT NOT NULL,
    profile     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    status      INTEGER NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    body        BLOB NOT NULL,
    UNIQUE (run_id, step_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS approvals_request_id
    ON approvals (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS approvals_pending
    ON approvals (status, created_at, approval_id);
CREATE INDEX IF NOT EXISTS approvals_expiry ON approvals (status, expires_at);
CREATE TABLE IF NOT EXISTS decision_keys (
    request_id  TEXT NOT NULL,
    reviewer    TEXT NOT NULL,
    approval_id TEXT NOT NULL,
    PRIMARY KEY (request_id, reviewer)
);
"""


@dataclass(frozen=True)
class StoredRequest:
    """A stored request and the facts kept beside it."""

    request: approval_pb2.ApprovalRequest
    user_id: str
    request_id: str


class ApprovalStore:
    """SQLite storage of approval requests (single writer: the service's event loop)."""

    def __init__(self, path: str | Path) -> None:
        """Open (creating) the database at ``path`` (``:memory:`` for tests)."""
        self._conn = open_sqlite(path)
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        self._conn.close()

    @staticmethod
    def _row(row: sqlite3.Row | None) -> StoredRequest | None:
        if row is None:
            return None
        return StoredRequest(
            approval_pb2.ApprovalRequest.FromString(row["body"]),
            row["user_id"],
            row["request_id"] or "",
        )

    def get(self, approval_id: str) -> StoredRequest | None:
        """The request with ``approval_id``."""
        row = self._conn.execute(
            "SELECT * FROM approvals WHERE approval_id = ?", (approval_id,)
        ).fetchone()
        return self._row(row)

    def by_step(self, run_id: str, step_id: str) -> StoredRequest | None:
        """The request of one step of one run."""
        row = self._conn.execute(
            "SELECT * FROM approvals WHERE run_id = ? AND step_id = ?", (run_id, step_id)
        ).fetchone()
        return self._row(row)

    def by_request_id(self, request_id: str) -> StoredRequest | None:
        """The request created by the RequestApproval call with ``request_id``."""
        row = self._conn.execute(
            "SELECT * FROM approvals WHERE request_id = ?", (request_id,)
        ).fetchone()
        return self._row(row)

    def insert(self, items: list[tuple[approval_pb2.ApprovalRequest, str, str]]) -> None:
        """Store new requests ``(request, user_id, request_id)`` in one transaction."""
        with Transaction(self._conn) as conn:
            for request, user_id, request_id in items:
                conn.execute(
                    "INSERT INTO approvals (approval_id, request_id, run_id, step_id, profile,"
                    " user_id, status, created_at, expires_at, body)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        request.approval_id,
                        request_id or None,
                        request.run_id,
                        request.step_id,
                        request.profile,
                        user_id,
                        request.status,
                        seconds(request.created_at),
                        seconds(request.expires_at),
                        request.SerializeToString(),
                    ),
                )

    def update(
        self,
        request: approval_pb2.ApprovalRequest,
        *,
        decision_key: tuple[str, str] | None = None,
        only_if_pending: bool = True,
    ) -> bool:
        """Write a request's new state (and the decision's idempotency key) atomically.

        Returns:
            False when ``only_if_pending`` and the stored request had already left PENDING
            (nothing is written then).
        """
        with Transaction(self._conn) as conn:
            sql = "UPDATE approvals SET status = ?, body = ? WHERE approval_id = ?"
            args: tuple[object, ...] = (
                request.status,
                request.SerializeToString(),
                request.approval_id,
            )
            if only_if_pending:
                sql += " AND status = ?"
                args = (*args, PENDING)
            if conn.execute(sql, args).rowcount != 1:
                return False
            if decision_key is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO decision_keys (request_id, reviewer, approval_id)"
                    " VALUES (?, ?, ?)",
                    (*decision_key, request.approval_id),
                )
        return True

    def decision_key(self, request_id: str, reviewer: str) -> str | None:
        """The approval a reviewer's SubmitDecision with ``request_id`` decided."""
        row = self._conn.execute(
            "SELECT approval_id FROM decision_keys WHERE request_id = ? AND reviewer = ?",
            (request_id, reviewer),
        ).fetchone()
        return None if row is None else str(row["approval_id"])

    def count_all_pending(self) -> int:
        """PENDING requests of every profile (the pending gauge)."""
        row = self._conn.execute(
            "SELECT COUNT(*) AS n FROM approvals WHERE status = ?", (PENDING,)
        ).fetchone()
        return int(row["n"])

    def count_pending(self, profile: str) -> int:
        """PENDING requests of one profile."""
        row = self._conn.execute(
            "SELECT COUNT(*) AS n FROM approvals WHERE status = ? AND profile = ?",
            (PENDING, profile),
        ).fetchone()
        return int(row["n"])

    def list_pending(
        self, *, profiles: tuple[str, ...] | None, after: tuple[float, str] | None, limit: int
    ) -> list[approval_pb2.ApprovalRequest]:
        """PENDING requests oldest first, after a position, optionally in some profiles."""
        sql = "SELECT body FROM approvals WHERE status = ?"
        args: list[object] = [PENDING]
        if profiles is not None:
            sql += f" AND profile IN ({', '.join('?' for _ in profiles)})"
            args.extend(profiles)
        if after is not None:
            sql += " AND (created_at, approval_id) > (?, ?)"
            args.extend(after)
        sql += " ORDER BY created_at, approval_id LIMIT ?"
        args.append(limit)
        return [
            approval_pb2.ApprovalRequest.FromString(row["body"])
            for row in self._conn.execute(sql, args)
        ]

    def earliest_expiry(self) -> float | None:
        """When the next PENDING request expires."""
        row = self._conn.execute(
            "SELECT MIN(expires_at) AS t FROM approvals WHERE status = ?", (PENDING,)
        ).fetchone()
        return None if row["t"] is None else float(row["t"])

    def due(self, now: float) -> list[str]:
        """Ids of PENDING requests whose expiry time has come."""
        rows = self._conn.execute(
            "SELECT approval_id FROM approvals WHERE status = ? AND expires_at <= ?"
            " ORDER BY expires_at",
            (PENDING, now),
        )
        return [str(row["approval_id"]) for row in rows]


__all__ = ["ApprovalStore", "StoredRequest"]
