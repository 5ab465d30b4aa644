"""cuga.shared.transparency against an independent RFC 9162 implementation (issue 24).

Valid proofs are built here from the recursive definitions of RFC 9162 2.1.3.1 (PATH) and
2.1.4.1 (SUBPROOF), written from the text with none of the code under test; every way a
proof or a checkpoint can be wrong is then refused with its own message.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cuga.audit.v1 import audit_pb2
from cuga.shared.signing import public_key_text
from cuga.shared.transparency import (
    ProofError,
    canonical_json,
    checkpoint_body,
    leaf_content,
    leaf_data,
    leaf_hash,
    open_checkpoint,
    root_of,
    sign_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from tests.support.rfc9162 import H, mth, path, subproof

LEAVES = [H(b"\x00" + bytes([i])) for i in range(9)]


def test_root_of_matches_the_recursive_definition_and_the_empty_tree() -> None:
    # RFC 9162 2.1.1: the empty tree's hash is SHA-256 of the empty string.
    assert root_of([]) == bytes.fromhex(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    for n in range(1, 10):
        assert root_of(LEAVES[:n]) == mth(LEAVES[:n])


def test_every_valid_inclusion_proof_verifies() -> None:
    for n in range(1, 10):
        for m in range(n):
            verify_inclusion(LEAVES[m], m, n, path(m, LEAVES[:n]), mth(LEAVES[:n]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p, m, n: ([*p[:-1], p[-1][:31]], m, n), "not 32 bytes"),
        (lambda p, m, n: ([*p, b"\x00" * 33], m, n), "not 32 bytes"),
        (lambda p, m, n: (p, n, n), "outside a tree of 7 leaves"),
        (lambda p, m, n: (p, -1, n), "leaf index -1 is outside"),
        (lambda p, m, n: ([*p, H(b"x")], m, n), "longer than the tree is deep"),
        (lambda p, m, n: (p[:-1], m, n), "shorter than the tree is deep"),
        (lambda p, m, n: (p, m + 1, n), "not in the tree of size 7"),
        (lambda p, m, n: ([H(b"x"), *p[1:]], m, n), "leaf 2 is not in the tree"),
        (lambda p, m, n: ([p[1], p[0], p[2]], m, n), "leaf 2 is not in the tree of size 7"),
    ],
)
def test_a_wrong_inclusion_proof_is_refused_saying_why(change, message) -> None:  # type: ignore[no-untyped-def]
    n, m = 7, 2
    proof, index, size = change(path(m, LEAVES[:n]), m, n)
    with pytest.raises(ProofError, match=message):
        verify_inclusion(LEAVES[m], index, size, proof, mth(LEAVES[:n]))


def test_every_valid_consistency_proof_verifies() -> None:
    for n in range(1, 10):
        for m in range(0, n + 1):
            proof = [] if m in (0, n) else subproof(m, LEAVES[:n], True)
            verify_consistency(m, n, proof, mth(LEAVES[:m]), mth(LEAVES[:n]))


def test_wrong_consistency_proofs_are_refused_saying_why() -> None:
    old, new = mth(LEAVES[:3]), mth(LEAVES[:7])
    good = subproof(3, LEAVES[:7], True)
    cases = [
        (3, 7, [*good[:-1], good[-1][:5]], old, new, "not 32 bytes"),
        (7, 3, [], new, old, "went from 7 down to 3"),
        (3, 3, [H(b"x")], old, old, "between equal sizes must be empty"),
        (3, 3, [], old, new, "two different roots for the same tree size 3"),
        (0, 7, [H(b"x")], H(b""), new, "from the empty tree must be empty"),
        (3, 7, [], old, new, "empty consistency proof"),
        (3, 7, [*good, H(b"x")], old, new, "longer than the tree is deep"),
        (3, 7, good[:-1], old, new, "shorter than the tree is deep"),
        (3, 7, good, mth(LEAVES[1:4]), new, "first 3 records are not the ones checkpointed"),
        (3, 7, good, old, mth(LEAVES[:6]), "does not lead to the root of size 7"),
        # old size a power of two: the old root is the proof's first node, so a wrong one
        # shows as a wrong new root
        (4, 7, subproof(4, LEAVES[:7], True), old, new, "does not lead to the root of size 7"),
    ]
    for m, n, proof, r1, r2, message in cases:
        with pytest.raises(ProofError, match=message):
            verify_consistency(m, n, proof, r1, r2)


# -- checkpoints ---------------------------------------------------------------------------

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ROOT = mth(LEAVES[:5])


def note(origin: str = "cuga.test/log", key: Ed25519PrivateKey = KEY) -> str:
    body = checkpoint_body(origin, 5, ROOT, 1_700_000_000_123_456_789)
    return sign_checkpoint(body, origin, key.public_key(), key.sign)


def test_a_checkpoint_is_a_c2sp_signed_note_verified_independently() -> None:
    text = note()
    body, _, sig = text.partition("\n\n")
    assert body.split("\n") == [
        "cuga.test/log",
        "5",
        base64.b64encode(ROOT).decode(),
        "time 2023-11-14T22:13:20.123456Z",
    ]
    dash, name, blob = sig.rstrip("\n").split(" ")
    raw = base64.b64decode(blob)
    pub = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert (dash, name) == ("\u2014", "cuga.test/log")
    assert raw[:4] == H(b"cuga.test/log\n\x01" + pub)[:4]
    KEY.public_key().verify(raw[4:], (body + "\n").encode())
    opened = open_checkpoint(text, public_key_text(KEY), origin="cuga.test/log")
    assert (opened.origin, opened.tree_size, opened.root_hash) == ("cuga.test/log", 5, ROOT)
    assert opened.time == "2023-11-14T22:13:20.123456Z"
    assert opened.note == text


@pytest.mark.parametrize("origin", ["", "has space", "a+b", "tab\there"])
def test_a_checkpoint_origin_must_be_one_word_without_plus(origin: str) -> None:
    with pytest.raises(ValueError, match="origin is non-empty"):
        checkpoint_body(origin, 1, ROOT, 0)


def test_a_signature_that_is_not_64_bytes_is_not_signed_into_a_note() -> None:
    body = checkpoint_body("o", 1, ROOT, 0)
    with pytest.raises(ValueError, match="64 bytes"):
        sign_checkpoint(body, "o", KEY.public_key(), lambda data: KEY.sign(data)[:63])


def _resign(text: str, body: str) -> str:
    """The same signature line under another body (what a forger who alters it gets)."""
    return body + "\n" + text.partition("\n\n")[2]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t.replace("\n\n", "\n"), "not a signed note"),
        (lambda t: t.rstrip("\n"), "not a signed note"),
        (lambda t: _resign(t, "cuga.test/log\n5\n"), "an origin, a size and a root"),
        (lambda t: t.replace("\n5\n", "\n-5\n", 1), "tree size is not a decimal"),
        (lambda t: t.replace("\n5\n", "\n\u0665\n", 1), "tree size is not a decimal"),
        (lambda t: t.replace("\n5\n", "\n" + "9" * 21 + "\n", 1), "not a decimal"),
        (
            lambda t: t.replace(base64.b64encode(ROOT).decode(), "not*base64", 1),
            "root is not base64",
        ),
        (
            lambda t: t.replace(
                base64.b64encode(ROOT).decode(), base64.b64encode(ROOT[:31]).decode(), 1
            ),
            "root is not 32 bytes",
        ),
        (lambda t: t.replace("\n5\n", "\n6\n", 1), "does not verify"),
        (lambda t: t.replace("Z\n\n", "Z\ngarbage\n\n", 1), "does not verify"),
        (lambda t: note(key=OTHER), "not signed by the pinned key"),
        (lambda t: t.replace(" cuga.test/log ", " other ", 1), "not signed by the pinned"),
        (lambda t: t.rsplit(" ", 1)[0] + " !!!\n", "not signed by the pinned key"),
        (
            lambda t: (
                t.rsplit(" ", 1)[0]
                + " "
                + base64.b64encode(base64.b64decode(t.rsplit(" ", 1)[1])[:67]).decode()
                + "\n"
            ),
            "not signed by the pinned key",
        ),
    ],
)
def test_a_bad_checkpoint_is_refused_saying_why(make, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProofError, match=message):
        open_checkpoint(make(note()), public_key_text(KEY))


def test_a_checkpoint_of_another_log_or_under_a_malformed_key_is_refused() -> None:
    with pytest.raises(ProofError, match=r"of log 'cuga\.test/log', expected 'other/log'"):
        open_checkpoint(note(), public_key_text(KEY), origin="other/log")
    with pytest.raises(ProofError, match="checkpoint key: public_key must be 32 bytes"):
        open_checkpoint(note(), public_key_text(KEY)[:-4])
    with pytest.raises(ProofError, match="checkpoint key: public_key is not base64url"):
        open_checkpoint(note(), "a")


# -- leaves --------------------------------------------------------------------------------

PAYLOAD: dict[str, Any] = {"n": 9007199254740993, "z": [True, None, 1.5, "\u00e9"], "a": {"b": 2}}
LEAF = {
    "actor": "alice",
    "chain_index": 3,
    "kind": "run_started",
    "payload": PAYLOAD,
    "profile": "default",
    "record_id": "r1",
    "run_id": "run-1",
    "timestamp": "2026-01-01T00:00:00Z",
    "trace_id": "",
    "not_a_leaf_field": "ignored",
}


def test_leaf_data_is_rfc8785_of_the_leaf_fields_with_numbers_as_doubles() -> None:
    # Written by hand from RFC 8785: members sorted, integers read as IEEE doubles
    # (2^53 + 1 becomes 2^53), no whitespace, UTF-8 as is.
    expected = (
        '{"actor":"alice","chain_index":3,"kind":"run_started",'
        '"payload":{"a":{"b":2},"n":9007199254740992,"z":[true,null,1.5,"\u00e9"]},'
        '"profile":"default","record_id":"r1","run_id":"run-1",'
        '"timestamp":"2026-01-01T00:00:00Z","trace_id":""}'
    ).encode()
    assert leaf_data(LEAF) == expected


def test_a_stored_record_s_leaf_is_its_exported_json_form() -> None:
    # What a verifier reads from an exported line must hash like the stored record.
    record = audit_pb2.AuditRecord(
        record_id="r1",
        trace_id="",
        run_id="run-1",
        kind="run_started",
        actor="alice",
        profile="default",
        chain_index=3,
    )
    record.timestamp.FromJsonString("2026-01-01T00:00:00Z")
    record.payload.update(PAYLOAD)
    content = leaf_content(record)
    assert content["timestamp"] == "2026-01-01T00:00:00Z"
    assert leaf_data(content) == leaf_data(LEAF)
    assert leaf_hash(leaf_data(content)) == H(b"\x00" + leaf_data(LEAF))


def test_a_leaf_missing_a_field_or_carrying_what_json_cannot_is_refused() -> None:
    with pytest.raises(KeyError, match="trace_id"):
        leaf_data({k: v for k, v in LEAF.items() if k != "trace_id"})
    with pytest.raises(ValueError, match="nan is not representable"):
        leaf_data({**LEAF, "payload": {"x": float("nan")}})
    with pytest.raises(ValueError, match="unsupported type"):
        leaf_data({**LEAF, "payload": {"x": b"bytes"}})
    with pytest.raises(ValueError, match="exceeds safe integer domain"):
        canonical_json({"x": 2**60})
    assert canonical_json({"b": 1, "a": [1.0, "x"]}) == '{"a":[1,"x"],"b":1}'
