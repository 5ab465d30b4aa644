"""Signed checkpoints of the audit log: the key, the signing, the sink outside the database.

A checkpoint is the log's size and root, signed (Ed25519) in the note form of
:mod:`cuga.shared.transparency`. The service signs one when the log has grown, every
``audit.checkpoint_interval_s``, on demand and at shutdown; each goes to the backend
(``GetCheckpoint`` answers from there) and to the **sink**, which is not the database:
a file an operator ships elsewhere, or log lines.

The service never signs a tree that contradicts a checkpoint it signed before (smaller,
or with other leaves under that size: its :attr:`Checkpointer.anchor`, read from the
store and from the sink's last line at start). A log rewritten behind its back therefore
gets no new checkpoint; ``GetCheckpoint`` answers FAILED_PRECONDITION ``LOG_INCONSISTENT``
and the service logs an ALARM. Whoever holds an older checkpoint detects the rewrite
anyway, with or without the service's help.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cuga.services.audit.backend import AuditBackend
from cuga.services.audit.merkle import Frontier, LogDamagedError, root_at
from cuga.services.audit.records import StoredCheckpoint, ns_to_ts
from cuga.shared.clock import Clock
from cuga.shared.config import ConfigError
from cuga.shared.errors import FailedPreconditionError
from cuga.shared.files import open_private, private_dir, tighten, write_private
from cuga.shared.signing import (
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_text,
)
from cuga.shared.transparency import (
    ProofError,
    checkpoint_body,
    key_hash,
    open_checkpoint,
    sign_checkpoint,
)

log = logging.getLogger("cuga.audit")
sink_log = logging.getLogger("cuga.audit.checkpoints")

#: Where the key lives under the data directory when ``audit.checkpoint_key_file`` is unset.
DEFAULT_KEY_PATH = Path("audit-keys") / "checkpoint.key"
#: Where checkpoints go under the data directory when ``audit.checkpoint_sink`` is unset.
DEFAULT_SINK_PATH = Path("audit-checkpoints") / "checkpoints.jsonl"


class LogInconsistentError(FailedPreconditionError):
    """The stored log contradicts a checkpoint the service signed: it was rewritten."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="LOG_INCONSISTENT", domain="cuga.audit")


class CheckpointSigner(Protocol):
    """What signs checkpoints: a key file by default, or anything holding an Ed25519 key
    (an HSM, a KMS) passed to :func:`cuga.services.audit.app.build`."""

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key verifiers pin."""

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""


@dataclass(frozen=True)
class KeySigner:
    """A :class:`CheckpointSigner` over a private key held in memory."""

    key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def load_key_signer(path: Path, *, create: bool) -> KeySigner:
    """The checkpoint key at ``path``; made there (0600) first when missing and ``create``.

    Raises:
        ConfigError: the file is missing (and may not be made) or is not an Ed25519 key.
    """
    if not path.exists():
        if not create:
            raise ConfigError("audit.checkpoint_key_file", f"{path} does not exist")
        private_dir(path.parent)
        write_private(path, private_key_pem(generate_private_key()))
        log.warning(
            "created a new audit checkpoint key at %s: give its public key to auditors"
            " (cuga audit checkpoint shows it) and keep the file apart from the database",
            path,
        )
    tighten(path)
    try:
        return KeySigner(load_private_key(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError("audit.checkpoint_key_file", f"{path}: {exc}") from None


def default_origin(public_key: Ed25519PublicKey) -> str:
    """``cuga-audit/<16 hex of SHA-256(public key text)>``: one name per key."""
    return "cuga-audit/" + hashlib.sha256(public_key_text(public_key).encode()).hexdigest()[:16]


def checkpoint_json(cp: StoredCheckpoint, origin: str, public_key: str) -> str:
    """One checkpoint as a JSON object: a sink line, and the file ``cuga audit checkpoint``
    saves (:func:`cuga.shared.transparency.open_checkpoint` checks its ``note``)."""
    data = {
        "note": cp.note,
        "origin": origin,
        "public_key": public_key,
        "root_hash": cp.root.hex(),
        "timestamp": ns_to_ts(cp.time_ns).ToJsonString(),
        "tree_size": cp.tree_size,
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def last_line(path: Path, chunk: int = 65536) -> str:
    """The last non-empty line of a text file ("" when there is none)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            data = b""
            while end > 0:
                start = max(0, end - chunk)
                f.seek(start)
                data = f.read(end - start) + data
                end = start
                lines = [x for x in data.split(b"\n") if x.strip()]
                if len(lines) > 1 or (lines and end == 0):
                    return lines[-1].decode("utf-8", "replace")
            return ""
    except FileNotFoundError:
        return ""


class Checkpointer:
    """Signs, stores and ships checkpoints of one backend's log.

    Args:
        backend: the log.
        signer: the checkpoint key.
        clock: the signing time.
        origin: the log's name ("" for :func:`default_origin`).
        sink: where checkpoints are also written: a file, ``log`` or ``none``.
    """

    def __init__(
        self,
        backend: AuditBackend,
        signer: CheckpointSigner,
        *,
        clock: Clock,
        origin: str = "",
        sink: Path | str = "none",
    ) -> None:
        self._backend = backend
        self._signer = signer
        self._clock = clock
        self.public_key = public_key_text(signer.public_key)
        self.origin = origin or default_origin(signer.public_key)
        self.key_hash = key_hash(self.origin, signer.public_key).hex()
        self._sink = sink
        self.anchor: StoredCheckpoint | None = None
        """The largest checkpoint known to be this key's: no tree it contradicts is signed."""
        self._alarmed = False

    def _stored(self) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest tree, when its signature is this key's (a
        row planted in the database is not)."""
        cp = self._backend.latest_checkpoint(self.key_hash)
        if cp is None:
            return None
        try:
            opened = open_checkpoint(cp.note, self.public_key, origin=self.origin)
        except ProofError as exc:
            log.error("ALARM: a stored audit checkpoint is not this service's: %s", exc)
            return None
        if (opened.tree_size, opened.root_hash) != (cp.tree_size, cp.root):
            log.error("ALARM: a stored audit checkpoint's columns do not match its note")
            return None
        return cp

    def load_anchor(self) -> None:
        """Read the largest earlier checkpoint from the store and the sink's last line."""
        found = [self._stored(), self._sink_last()]
        for cp in found:
            if cp is not None and (self.anchor is None or cp.tree_size > self.anchor.tree_size):
                self.anchor = cp

    def _sink_last(self) -> StoredCheckpoint | None:
        if not isinstance(self._sink, Path):
            return None
        text = last_line(self._sink)
        if not text:
            return None
        try:
            data = json.loads(text)
            opened = open_checkpoint(str(data["note"]), self.public_key, origin=self.origin)
        except (ValueError, KeyError, TypeError, ProofError) as exc:
            log.warning("the last line of checkpoint sink %s is not ours: %s", self._sink, exc)
            return None
        return StoredCheckpoint(self.key_hash, opened.tree_size, opened.root_hash, 0, opened.note)

    def check(self, frontier: Frontier) -> None:
        """Refuse a tree that contradicts :attr:`anchor`.

        Raises:
            LogInconsistentError: it does (the log was truncated or rewritten).
        """
        anchor = self.anchor
        if anchor is None:
            return
        problem = ""
        if frontier.size < anchor.tree_size:
            problem = (
                f"the log holds {frontier.size} records but a checkpoint this service signed"
                f" covers {anchor.tree_size}: records were removed from its end"
            )
        else:
            try:
                root = (
                    frontier.root()
                    if frontier.size == anchor.tree_size
                    else root_at(self._backend, anchor.tree_size)
                )
            except LogDamagedError as exc:
                root, problem = b"", f"{exc.message}; the log cannot be checked"
            if not problem and root != anchor.root:
                problem = (
                    f"the log's first {anchor.tree_size} records are not the ones a checkpoint"
                    " this service signed covers: they were changed, removed or reordered"
                )
        if problem:
            if not self._alarmed:
                self._alarmed = True
                log.error("ALARM: audit log inconsistent with its checkpoints: %s", problem)
            raise LogInconsistentError(problem)

    def current(self) -> StoredCheckpoint:
        """A checkpoint of the log as it is now: the stored one when the log has not grown
        since, else a new one.

        Raises:
            LogInconsistentError: the log contradicts an earlier checkpoint.
        """
        frontier = self._backend.frontier()
        latest = self._stored()
        if latest is not None and latest.tree_size == frontier.size:
            self.check(frontier)
            if latest.root == frontier.root():
                return latest
        return self.sign(frontier)

    def sign(self, frontier: Frontier) -> StoredCheckpoint:
        """Sign, store and ship a checkpoint of ``frontier``.

        Raises:
            LogInconsistentError: ``frontier`` contradicts an earlier checkpoint.
        """
        self.check(frontier)
        time_ns = int(self._clock.now() * 1e9)
        root = frontier.root()
        body = checkpoint_body(self.origin, frontier.size, root, time_ns)
        note = sign_checkpoint(body, self.origin, self._signer.public_key, self._signer.sign)
        cp = StoredCheckpoint(self.key_hash, frontier.size, root, time_ns, note)
        self._backend.save_checkpoint(cp)
        self._ship(cp)
        if self.anchor is None or cp.tree_size >= self.anchor.tree_size:
            self.anchor = cp
        return cp

    def sign_if_grown(self) -> StoredCheckpoint | None:
        """The interval's work: a new checkpoint when the log grew since the last one."""
        frontier = self._backend.frontier()
        latest = self._stored()
        if latest is not None and latest.tree_size >= frontier.size:
            return None
        return self.sign(frontier)

    def _ship(self, cp: StoredCheckpoint) -> None:
        line = checkpoint_json(cp, self.origin, self.public_key)
        if isinstance(self._sink, Path):
            private_dir(self._sink.parent)
            with open_private(self._sink, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        elif self._sink == "log":
            sink_log.info("%s", line)


def sink_of(value: str, data_dir: Path) -> Path | str:
    """The sink ``audit.checkpoint_sink`` names: a Path, ``log`` or ``none``."""
    if not value:
        return data_dir / DEFAULT_SINK_PATH
    if value in ("log", "none"):
        return value
    return Path(value)


__all__ = [
    "DEFAULT_KEY_PATH",
    "DEFAULT_SINK_PATH",
    "CheckpointSigner",
    "Checkpointer",
    "KeySigner",
    "LogInconsistentError",
    "checkpoint_json",
    "default_origin",
    "last_line",
    "load_key_signer",
    "sink_of",
]
