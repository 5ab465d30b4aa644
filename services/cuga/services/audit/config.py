"""Configuration of the audit service (the ``audit:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cuga.shared.config import ConfigError
from cuga.shared.sqldb import PoolConfig

Backend = Literal["sqlite", "jsonl", "postgres", "none"]
FsyncPolicy = Literal["always", "batch", "never"]


@dataclass(frozen=True)
class AuditConfig:
    """Where and how the audit trail is stored."""

    backend: Backend = "sqlite"
    """Storage: ``sqlite`` (embedded default, ``audit.db`` under data_dir), ``jsonl``
    (append-only JSON-lines files), ``postgres`` (by ``dsn``, for several replicas) or
    ``none`` (records nothing)."""
    dsn: str = ""
    """PostgreSQL connection string (libpq DSN or URI). Required when backend is postgres."""
    pool: PoolConfig = field(default_factory=PoolConfig)
    """With backend postgres: the connection pool (``min_size``, ``max_size``,
    ``timeout_s``, ``connect_timeout_s``); each call's transaction takes one connection."""
    jsonl_dir: Path | None = None
    """Directory of the JSON-lines files; default ``<data_dir>/audit``."""
    jsonl_rotate_bytes: int = 64 * 1024 * 1024
    """A JSON-lines file is closed and a new one started past this size, bytes (>= 1024).
    Files also rotate when the (UTC) day changes."""
    fsync: FsyncPolicy = "batch"
    """JSON-lines durability: ``always`` fsyncs after every record, ``batch`` once per
    Record/RecordBatch call, ``never`` leaves flushing to the OS."""
    retention_days: int = 0
    """Traces whose newest record is older than this many days are pruned (whole traces,
    so every remaining chain still verifies). 0 keeps everything forever."""
    prune_interval_s: float = 3600.0
    """How often the service prunes expired traces when retention_days > 0, seconds (> 0)."""
    max_batch: int = 1000
    """Most records in one RecordBatch, 1 to 1000."""
    checkpoint_interval_s: float = 60.0
    """How often the service signs a checkpoint of the log when it has grown, seconds
    (> 0). Checkpoints are also signed on demand (GetCheckpoint, Verify) and at shutdown."""
    checkpoint_key_file: Path | None = None
    """The checkpoint signing key (Ed25519, PKCS#8 PEM, owner-only). Default
    ``<data_dir>/audit-keys/checkpoint.key``, created (0600, in a 0700 directory) at first
    start; a path set here must exist. Keep it out of reach of whoever can write the
    database; replicas of one log share it."""
    checkpoint_origin: str = ""
    """The log's name in its checkpoints (no spaces, no ``+``). Default
    ``cuga-audit/<first 16 hex digits of the SHA-256 of the public key>``."""
    checkpoint_sink: str = ""
    """Where each signed checkpoint is also written, outside the database, for someone
    else to keep (a witness): a file path (one JSON object per line, the form of
    ``cuga audit checkpoint --output``), ``log`` (one INFO line per checkpoint on the
    ``cuga.audit.checkpoints`` logger, for a log shipper) or ``none``. Default
    ``<data_dir>/audit-checkpoints/checkpoints.jsonl``."""

    def __post_init__(self) -> None:
        if self.backend == "postgres" and not self.dsn.strip():
            raise ConfigError("dsn", "is required when backend is postgres")
        if self.jsonl_rotate_bytes < 1024:
            raise ConfigError("jsonl_rotate_bytes", "must be at least 1024")
        if self.retention_days < 0:
            raise ConfigError("retention_days", "must be >= 0 (0 keeps records forever)")
        if self.prune_interval_s <= 0:
            raise ConfigError("prune_interval_s", "must be > 0")
        if not 1 <= self.max_batch <= 1000:
            raise ConfigError("max_batch", "must be between 1 and 1000")
        if self.checkpoint_interval_s <= 0:
            raise ConfigError("checkpoint_interval_s", "must be > 0")
        if any(c.isspace() or c == "+" for c in self.checkpoint_origin):
            raise ConfigError("checkpoint_origin", "must not hold spaces or '+'")


__all__ = ["AuditConfig", "Backend", "FsyncPolicy"]
