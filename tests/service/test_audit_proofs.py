"""Checkpoints and proofs over gRPC, checked against an independent RFC 9162 implementation.

Everything the service answers is recomputed here from first principles, with none of the
code under test: leaf hashes from each record's content (``rfc8785`` + SHA-256), the tree
hash and the audit paths by the recursive definitions of RFC 9162 section 2.1, and the
checkpoint's signature parsed and verified with ``cryptography`` directly.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.audit.v1 import audit_pb2
from cuga.client import AuditClient
from cuga.services.audit.app import build
from cuga.services.audit.merkle import (
    Frontier,
    consistency_ranges,
    inclusion_ranges,
    range_hashes,
)
from cuga.shared.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from cuga.shared.messages import to_struct
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.support.rfc9162 import H, mth, path, proof
from tests.support.servers import as_identity, make_settings, running_service, signed_as

# -- the independent implementation: tests/support/rfc9162.py, and the leaf by its definition


def leaf_of(record: audit_pb2.AuditRecord) -> bytes:
    content = {
        "actor": record.actor,
        "chain_index": record.chain_index,
        "kind": record.kind,
        "payload": json_format.MessageToDict(record.payload),
        "profile": record.profile,
        "record_id": record.record_id,
        "run_id": record.run_id,
        "timestamp": record.timestamp.ToJsonString(),
        "trace_id": record.trace_id,
    }
    return H(b"\x00" + rfc8785.dumps(content))


def open_note(note: str, public_key: str) -> tuple[str, int, bytes]:
    """(origin, size, root) of a C2SP signed note, its Ed25519 signature checked."""
    body, _, sigs = note.partition("\n\n")
    origin, size, root = body.split("\n")[:3]
    raw = base64.urlsafe_b64decode(public_key + "=")
    dash, name, blob = sigs.strip("\n").split(" ")
    assert (dash, name) == ("\u2014", origin)
    sig = base64.b64decode(blob)
    assert sig[:4] == H(origin.encode() + b"\n\x01" + raw)[:4]
    Ed25519PublicKey.from_public_bytes(raw).verify(sig[4:], (body + "\n").encode())
    return origin, int(size), base64.b64decode(root)


# -- the service ----------------------------------------------------------------------------


def _record(i: int) -> audit_pb2.AuditRecord:
    trace = f"{i % 3:032x}"
    return audit_pb2.AuditRecord(
        record_id=f"run-{i % 3}/e{i}",
        trace_id=trace,
        run_id=f"run-{i % 3}",
        profile="tenant-a" if i % 3 else "tenant-b",
        kind="step_result",
        actor="coordinator",
        payload=to_struct({"i": i, "x": i / 7, "big": 1e21, "small": 1e-7, "s": "ü\u2028"}),
    )


@pytest.fixture(params=["sqlite", "jsonl", "postgres"])
async def auditor(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditClient]:
    env = {"CUGA_AUDIT__BACKEND": request.param}
    if request.param == "postgres":
        env["CUGA_AUDIT__DSN"] = request.getfixturevalue("postgres_dsn")
    async with running_service("audit", build, make_settings(tmp_path / "d", env)) as server:
        async with AuditClient(server.address, metadata=signed_as("coordinator", "audit")) as w:
            for i in range(0, 37, 5):
                batch = [_record(j) for j in range(i, min(i + 5, 37))]
                await w.record_batch(audit_pb2.RecordBatchRequest(records=batch))
        async with AuditClient(server.address, metadata=as_identity("auditor")) as client:
            yield client


async def _leaves(client: AuditClient) -> list[audit_pb2.LogEntry]:
    entries: list[audit_pb2.LogEntry] = []
    token = ""
    while True:
        page = await client.list_entries(
            audit_pb2.ListEntriesRequest(page_size=10, page_token=token)
        )
        entries.extend(page.entries)
        token = page.next_page_token
        if not token:
            return entries


async def test_every_proof_is_the_rfc9162_one(auditor: AuditClient) -> None:
    resp = await auditor.get_checkpoint(audit_pb2.GetCheckpointRequest())
    origin, size, root = open_note(resp.checkpoint.note, resp.public_key)
    assert (origin, size, root) == (
        resp.checkpoint.origin,
        resp.checkpoint.tree_size,
        resp.checkpoint.root_hash,
    )
    assert size == 37
    entries = await _leaves(auditor)
    assert [e.leaf_index for e in entries] == list(range(37))
    leaves = [leaf_of(e.record) for e in entries]
    assert (
        leaves == [e.leaf_hash for e in entries] == [bytes.fromhex(e.record.hash) for e in entries]
    )
    assert mth(leaves) == root
    for e in entries:
        for n in (e.leaf_index + 1, 17, 32, 37):
            if n <= e.leaf_index:
                continue
            got = await auditor.get_inclusion_proof(
                audit_pb2.GetInclusionProofRequest(record_id=e.record.record_id, tree_size=n)
            )
            assert (got.leaf_index, got.tree_size) == (e.leaf_index, n)
            assert list(got.hashes) == path(e.leaf_index, leaves[:n])
    for n in (1, 2, 16, 17, 32, 37):
        for m in range(n + 1):
            got = await auditor.get_consistency_proof(
                audit_pb2.GetConsistencyProofRequest(old_size=m, new_size=n)
            )
            assert list(got.hashes) == proof(m, leaves[:n]), (m, n)
    latest = await auditor.get_consistency_proof(audit_pb2.GetConsistencyProofRequest(old_size=5))
    assert latest.new_size == 37 and latest.checkpoint.note == resp.checkpoint.note
    newest = await auditor.get_inclusion_proof(
        audit_pb2.GetInclusionProofRequest(record_id=entries[3].record.record_id)
    )
    assert newest.tree_size == 37 and list(newest.hashes) == path(3, leaves)


async def test_proof_requests_are_validated(auditor: AuditClient) -> None:
    rid = _record(10).record_id
    stored = "coordinator/" + rid
    cases = [
        (audit_pb2.GetInclusionProofRequest(record_id=stored, tree_size=10), "tree_size"),
        (audit_pb2.GetInclusionProofRequest(record_id=stored, tree_size=38), "tree_size"),
        (audit_pb2.GetInclusionProofRequest(record_id="has space"), "record_id"),
        (audit_pb2.GetInclusionProofRequest(), "record_id"),
    ]
    for request, field in cases:
        with pytest.raises(InvalidArgumentError) as info:
            await auditor.get_inclusion_proof(request)
        assert info.value.field == field
    with pytest.raises(NotFoundError):
        await auditor.get_inclusion_proof(audit_pb2.GetInclusionProofRequest(record_id=rid))
    for request, field in [
        (audit_pb2.GetConsistencyProofRequest(old_size=5, new_size=38), "new_size"),
        (audit_pb2.GetConsistencyProofRequest(old_size=6, new_size=5), "old_size"),
        (audit_pb2.GetConsistencyProofRequest(old_size=40), "old_size"),
    ]:
        with pytest.raises(InvalidArgumentError) as info:
            await auditor.get_consistency_proof(request)
        assert info.value.field == field
    for token in ("!!", "bm9wZQ"):
        with pytest.raises(InvalidArgumentError) as info:
            await auditor.list_entries(audit_pb2.ListEntriesRequest(page_token=token))
        assert info.value.field == "page_token"


async def test_a_scoped_auditor_proves_only_its_own_records(tmp_path: Path) -> None:
    async with running_service("audit", build, make_settings(tmp_path / "d")) as server:
        async with AuditClient(server.address, metadata=signed_as("coordinator", "audit")) as w:
            await w.record_batch(audit_pb2.RecordBatchRequest(records=[_record(0), _record(1)]))
        async with AuditClient(server.address, metadata=as_identity("auditor-a")) as client:
            mine = "coordinator/" + _record(1).record_id  # tenant-a
            theirs = "coordinator/" + _record(0).record_id  # tenant-b
            got = await client.get_inclusion_proof(
                audit_pb2.GetInclusionProofRequest(record_id=mine)
            )
            assert got.record.profile == "tenant-a"
            with pytest.raises(NotFoundError) as hidden:
                await client.get_inclusion_proof(
                    audit_pb2.GetInclusionProofRequest(record_id=theirs)
                )
            with pytest.raises(NotFoundError) as unknown:
                await client.get_inclusion_proof(
                    audit_pb2.GetInclusionProofRequest(record_id="coordinator/none")
                )
            assert hidden.value.message.replace(theirs, "X") == unknown.value.message.replace(
                "coordinator/none", "X"
            )
            with pytest.raises(PermissionDeniedError):
                await client.list_entries(audit_pb2.ListEntriesRequest())


class _Memory:
    """An in-memory tree source for the proof planner."""

    def __init__(self) -> None:
        self.frontier = Frontier()
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.leaves: list[bytes] = []

    def add(self, leaf: bytes) -> None:
        made: list[tuple[int, int, bytes]] = []
        self.frontier.append(leaf, made)
        self.leaves.append(leaf)
        self.nodes.update({(level, i): h for level, i, h in made})

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        return self.leaves[start:end]

    def stored_nodes(self, keys: object) -> dict[tuple[int, int], bytes]:
        return {k: self.nodes[k] for k in keys if k in self.nodes}  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 700), data=st.data())
def test_the_proof_planner_matches_the_definitions(n: int, data: st.DataObject) -> None:
    tree = _Memory()
    for i in range(n):
        tree.add(H(b"\x00" + str(i).encode()))
    assert tree.frontier.root() == mth(tree.leaves)
    m = data.draw(st.integers(0, n - 1))
    size = data.draw(st.integers(m + 1, n))
    assert range_hashes(tree, inclusion_ranges(m, size)) == path(m, tree.leaves[:size])
    old = data.draw(st.integers(0, size))
    assert range_hashes(tree, consistency_ranges(old, size)) == proof(old, tree.leaves[:size])
