"""The idempotency store: one record per finished execution, keyed by idempotency key."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from cuga.shared.sqlite import Transaction, open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    idempotency_key TEXT PRIMARY KEY,
    fingerprint     TEXT NOT NULL,
    tool            TEXT NOT NULL,
    step_id         TEXT NOT NULL,
    ok              INTEGER NOT NULL,
    result          BLOB,
    error_code      TEXT,
    error_message   TEXT,
    error_reason    TEXT,
    failure_mode    INTEGER,
    error_metadata  TEXT,
    tool_error      INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL
) WITHOUT ROWID
"""
# WITHOUT ROWID: a record is one B-tree entry keyed by its idempotency key, not a table row
# plus a separate key index, so each insert writes one page less. Stores created before
# keep their rowid table; both read and write the same way.


@dataclass(frozen=True)
class StoredExecution:
    """A finished execution: a serialised ``StepResult`` or a (non-retryable) failure.

    Attributes:
        key: the idempotency key.
        fingerprint: hash of tool, step id and input; a key reused for a different step
            is refused.
        tool: tool name.
        step_id: step id.
        result: serialised ``cuga.common.v1.StepResult`` when the tool succeeded.
        error_code: gRPC status code name of the stored failure.
        error_message: its message.
        error_reason: its ErrorInfo reason.
        failure_mode: its FailureMode value.
        error_metadata: its ErrorInfo metadata.
        tool_error: whether it was a :class:`ToolExecutionError` (vs a CugaError the tool
            raised itself).
        created_at: epoch seconds the record was written.
    """

    key: str
    fingerprint: str
    tool: str
    step_id: str
    result: bytes | None = None
    error_code: str = ""
    error_message: str = ""
    error_reason: str = ""
    failure_mode: int = 0
    error_metadata: dict[str, str] = field(default_factory=dict)
    tool_error: bool = False
    created_at: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the stored outcome is a result (not a failure)."""
        return self.result is not None


class IdempotencyStore:
    """SQLite-backed records of finished executions.

    A record is written in one transaction only once an execution has finished, so a crash
    mid-execution leaves no record and the step runs again; the first record for a key
    wins (``INSERT OR IGNORE``).
    """

    def __init__(self, path: str | Path, *, synchronous: str = "normal") -> None:
        self._conn: sqlite3.Connection = open_sqlite(path, synchronous=synchronous)
        with Transaction(self._conn) as conn:
            conn.execute(_SCHEMA)

    def get(self, key: str) -> StoredExecution | None:
        """The record for ``key``, if any."""
        row = self._conn.execute(
            "SELECT * FROM executions WHERE idempotency_key = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        return StoredExecution(
            key=row["idempotency_key"],
            fingerprint=row["fingerprint"],
            tool=row["tool"],
            step_id=row["step_id"],
            result=bytes(row["result"]) if row["ok"] else None,
            error_code=row["error_code"] or "",
            error_message=row["error_message"] or "",
            error_reason=row["error_reason"] or "",
            failure_mode=int(row["failure_mode"] or 0),
            error_metadata=json.loads(row["error_metadata"] or "{}"),
            tool_error=bool(row["tool_error"]),
            created_at=float(row["created_at"]),
        )

    def put(self, record: StoredExecution) -> bool:
        """Store a finished execution; False when the key already had a record."""
        # One statement in autocommit mode is its own transaction: no BEGIN/COMMIT round.
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO executions (idempotency_key, fingerprint, tool, step_id,"
            " ok, result, error_code, error_message, error_reason, failure_mode,"
            " error_metadata, tool_error, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.key,
                record.fingerprint,
                record.tool,
                record.step_id,
                1 if record.ok else 0,
                record.result,
                record.error_code,
                record.error_message,
                record.error_reason,
                record.failure_mode,
                json.dumps(record.error_metadata, sort_keys=True)
                if record.error_metadata
                else None,
                1 if record.tool_error else 0,
                record.created_at,
            ),
        )
        return cur.rowcount == 1

    def count(self) -> int:
        """How many records are stored."""
        return int(self._conn.execute("SELECT COUNT(*) FROM executions").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._conn.close()
