"""Check the audit service's answers, trusting nothing but a checkpoint key you pinned.

``cuga audit checkpoint|verify --since|prove`` are built on this; so can any Python
auditor. Every check is done here, from the records' content, with the RFC 9162 and
RFC 8785 rules of ``cuga.shared.transparency``: the service supplies data and proofs,
never verdicts.

* :meth:`AuditVerifier.checkpoint` — the current checkpoint, its signature checked.
* :meth:`AuditVerifier.since` — from a checkpoint you saved to now: the new checkpoint
  signed by the same key for the same log, the consistency proof between the two (so
  nothing the old one covered was changed, removed or reordered), and then either every
  record of one trace proven included (positions 1, 2, 3 ... with no gap), or — with no
  trace — a full audit: every leaf read back, each record's leaf hash recomputed, both
  roots rebuilt from them.
* :meth:`AuditVerifier.prove` — one record's inclusion proof.

A failed check raises ``ProofError`` (``cuga.shared.transparency``) naming what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cuga.audit.v1 import audit_pb2
from cuga.client._clients import AuditClient
from cuga.shared.transparency import (
    ProofError,
    SignedCheckpoint,
    leaf_content,
    leaf_data,
    leaf_hash,
    open_checkpoint,
    root_of,
    verify_consistency,
    verify_inclusion,
)

#: Entries read per ListEntries call during a full audit.
ENTRIES_PAGE = 1000


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint as saved to a file (one JSON object per line; the last one counts)."""

    note: str
    """The checkpoint's signed note, as the service returned it."""
    public_key: str
    """The key that signed it (the one you pin), as the service names it."""
    origin: str
    """The log's name, the note's first line."""

    def to_json(self, checkpoint: SignedCheckpoint) -> str:
        """The line :func:`load_checkpoint` reads (also the service's sink line form)."""
        data = {
            "note": self.note,
            "origin": self.origin,
            "public_key": self.public_key,
            "root_hash": checkpoint.root_hash.hex(),
            "timestamp": checkpoint.time,
            "tree_size": checkpoint.tree_size,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


def load_checkpoint(path: str | Path) -> SavedCheckpoint:
    """The last checkpoint saved in a file (``cuga audit checkpoint -o``, or a sink file).

    Raises:
        ProofError: the file holds no checkpoint.
        OSError: the file cannot be read.
    """
    lines = [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    if not lines:
        raise ProofError(f"{path} holds no checkpoint")
    try:
        data = json.loads(lines[-1])
        return SavedCheckpoint(str(data["note"]), str(data["public_key"]), str(data["origin"]))
    except (ValueError, KeyError, TypeError):
        raise ProofError(f"{path}: the last line is not a saved checkpoint") from None


@dataclass
class Report:
    """What a verification found good."""

    old: SignedCheckpoint | None
    """The saved checkpoint the check started from; None when there was none."""
    new: SignedCheckpoint
    """The service's current checkpoint, its signature and consistency with ``old`` checked."""
    records_checked: int = 0
    """Records whose leaf hash was recomputed from their content and proven in the log."""
    pruned: int = 0
    """Leaves whose record retention removed (hash only: content not checkable)."""
    notes: list[str] = field(default_factory=list)
    """What a person should know about the result (what was not checked, and why)."""


def record_leaf(record: audit_pb2.AuditRecord) -> bytes:
    """A record's leaf hash, from its content (never its ``hash`` field)."""
    try:
        return leaf_hash(leaf_data(leaf_content(record)))
    except ValueError as exc:
        raise ProofError(f"record {record.record_id} cannot be hashed: {exc}") from None


def line_leaf(line: Mapping[str, Any]) -> bytes:
    """The leaf hash of an exported record (a JSON line of ``cuga audit export``)."""
    try:
        return leaf_hash(leaf_data(line))
    except (KeyError, ValueError) as exc:
        raise ProofError(f"an exported record cannot be hashed: {exc}") from None


class AuditVerifier:
    """Verifies an audit service's log against a pinned checkpoint key.

    Args:
        client: an auditor's client of the audit service.
        public_key: the pinned checkpoint key; None trusts the key the service states
            (first use: pin what :meth:`checkpoint` returns).
        origin: the log the checkpoints must be of ("" accepts the service's).
    """

    def __init__(
        self, client: AuditClient, public_key: str | None = None, origin: str = ""
    ) -> None:
        self._client = client
        self.public_key = public_key
        self.origin = origin

    async def checkpoint(self) -> tuple[SignedCheckpoint, SavedCheckpoint]:
        """The current checkpoint, signature checked, and the form to save it in.

        Raises:
            ProofError: the service's key is not the pinned one, or the signature fails.
        """
        resp = await self._client.get_checkpoint(audit_pb2.GetCheckpointRequest())
        key = self.public_key or resp.public_key
        if self.public_key and resp.public_key != self.public_key:
            raise ProofError(
                f"the service signs with key {resp.public_key}, not the pinned {self.public_key}"
            )
        cp = open_checkpoint(resp.checkpoint.note, key, origin=self.origin)
        return cp, SavedCheckpoint(resp.checkpoint.note, key, cp.origin)

    async def since(self, saved: SavedCheckpoint, trace_id: str = "") -> Report:
        """Everything from ``saved`` to now (see the module docstring).

        Raises:
            ProofError: naming the first thing that does not hold.
        """
        if self.public_key and self.public_key != saved.public_key:
            raise ProofError("the saved checkpoint was signed by another key than the pinned one")
        self.public_key = self.public_key or saved.public_key
        old = open_checkpoint(saved.note, self.public_key, origin=saved.origin)
        self.origin = old.origin
        records: list[audit_pb2.AuditRecord] = []
        if trace_id:
            records = await self._trace(trace_id)  # before the checkpoint, which covers them
        new, _ = await self.checkpoint()
        if new.tree_size < old.tree_size:
            raise ProofError(
                f"the log shrank from {old.tree_size} to {new.tree_size} records since the "
                "saved checkpoint: records were removed from its end"
            )
        resp = await self._client.get_consistency_proof(
            audit_pb2.GetConsistencyProofRequest(old_size=old.tree_size, new_size=new.tree_size)
        )
        try:
            verify_consistency(
                old.tree_size, new.tree_size, resp.hashes, old.root_hash, new.root_hash
            )
        except ProofError as exc:
            raise ProofError(
                f"the log is not an extension of the saved checkpoint ({exc}): records it "
                "covered were changed, removed or reordered"
            ) from None
        report = Report(old, new)
        if trace_id:
            await self._check_trace(trace_id, records, new, report)
        else:
            await self._full(old, new, report)
        return report

    async def _trace(self, trace_id: str) -> list[audit_pb2.AuditRecord]:
        records: list[audit_pb2.AuditRecord] = []
        token = ""
        while True:
            page = await self._client.query(
                audit_pb2.QueryRequest(
                    filter=audit_pb2.RecordFilter(trace_id=trace_id),
                    page_size=1000,
                    page_token=token,
                )
            )
            records.extend(page.records)
            token = page.next_page_token
            if not token:
                return records

    async def _check_trace(
        self,
        trace_id: str,
        records: list[audit_pb2.AuditRecord],
        new: SignedCheckpoint,
        report: Report,
    ) -> None:
        if not records:
            raise ProofError(
                f"no audit records for trace {trace_id} (if it had some before the saved "
                "checkpoint, a full audit — no trace id — shows where they went)"
            )
        for position, record in enumerate(records, start=1):
            if record.chain_index != position:
                raise ProofError(
                    f"trace {trace_id}: position {position} is missing (found "
                    f"{record.chain_index}, record {record.record_id})"
                )
            await self._include(record, new)
            report.records_checked += 1

    async def _include(self, record: audit_pb2.AuditRecord, cp: SignedCheckpoint) -> None:
        leaf = record_leaf(record)
        resp = await self._client.get_inclusion_proof(
            audit_pb2.GetInclusionProofRequest(record_id=record.record_id, tree_size=cp.tree_size)
        )
        try:
            verify_inclusion(leaf, resp.leaf_index, cp.tree_size, resp.hashes, cp.root_hash)
        except ProofError:
            raise ProofError(
                f"record {record.record_id} (position {record.chain_index} of its trace) is not "
                f"in the log its checkpoint of {cp.tree_size} records covers: edited, or moved"
            ) from None

    async def _full(self, old: SignedCheckpoint, new: SignedCheckpoint, report: Report) -> None:
        leaves: list[bytes] = []
        token = ""
        while len(leaves) < new.tree_size:
            page = await self._client.list_entries(
                audit_pb2.ListEntriesRequest(page_size=ENTRIES_PAGE, page_token=token)
            )
            for entry in page.entries:
                if entry.leaf_index != len(leaves):
                    raise ProofError(f"leaf {len(leaves)} is missing from the log")
                if entry.pruned:
                    leaves.append(bytes(entry.leaf_hash))
                    report.pruned += 1
                    continue
                record = entry.record
                leaf = record_leaf(record)
                if record.leaf_index != entry.leaf_index or leaf != entry.leaf_hash:
                    raise ProofError(
                        f"leaf {entry.leaf_index} (record {record.record_id}) does not hold the "
                        "record's content as stored (edited)"
                    )
                leaves.append(leaf)
                report.records_checked += 1
            token = page.next_page_token
            if not token:
                break
        if len(leaves) < new.tree_size:
            raise ProofError(
                f"the log lists {len(leaves)} leaves; its checkpoint covers {new.tree_size}"
            )
        if root_of(leaves[: old.tree_size]) != old.root_hash:
            raise ProofError(
                f"the records now in the log's first {old.tree_size} places are not the ones "
                "the saved checkpoint covers: changed, removed or reordered"
            )
        if root_of(leaves[: new.tree_size]) != new.root_hash:
            raise ProofError(
                "the records in the log do not make the root its current checkpoint signs"
            )
        if report.pruned:
            report.notes.append(
                f"{report.pruned} leaves are records removed by retention: their leaf hashes "
                "hold the tree, their content cannot be checked"
            )

    async def prove(
        self, record_id: str
    ) -> tuple[audit_pb2.GetInclusionProofResponse, SignedCheckpoint]:
        """One record's inclusion in the current checkpoint, every part checked here.

        Raises:
            ProofError: the checkpoint, the record's hash or the proof does not hold.
        """
        cp, _ = await self.checkpoint()
        resp = await self._client.get_inclusion_proof(
            audit_pb2.GetInclusionProofRequest(record_id=record_id, tree_size=cp.tree_size)
        )
        leaf = record_leaf(resp.record)
        try:
            verify_inclusion(leaf, resp.leaf_index, cp.tree_size, resp.hashes, cp.root_hash)
        except ProofError:
            raise ProofError(
                f"record {record_id} is not leaf {resp.leaf_index} of the log its checkpoint "
                "covers: edited, or moved"
            ) from None
        return resp, cp


__all__ = [
    "AuditVerifier",
    "Report",
    "SavedCheckpoint",
    "line_leaf",
    "load_checkpoint",
    "record_leaf",
]
