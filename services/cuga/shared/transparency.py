"""The verifiable audit log's public rules: leaf encoding, RFC 9162 hashing, proof
verification and signed checkpoints.

Everything a verifier needs, in any language, is defined here and nowhere else:

* **Leaf data** — a record's content as RFC 8785 canonical JSON (the ``rfc8785`` package):
  the object of :data:`LEAF_FIELDS` (``timestamp`` as the protobuf JSON form of a
  Timestamp, RFC 3339 UTC; ``payload`` the record's Struct as a JSON object, numbers being
  IEEE doubles; ``chain_index`` the record's position in its trace, from 1).
* **Tree** — RFC 9162 section 2.1: ``leaf hash = SHA-256(0x00 || leaf data)``,
  ``node hash = SHA-256(0x01 || left || right)``, the root of the empty tree is
  ``SHA-256("")``; inclusion and consistency proofs are verified as in sections 2.1.3.2 and
  2.1.4.2.
* **Checkpoint** — a signed note in the C2SP ``tlog-checkpoint`` shape: the body is the
  log's origin, the tree size in decimal, the root hash in standard base64 and a
  ``time <RFC 3339>`` line, each ending in a newline; after a blank line comes one
  signature line ``— <origin> <base64(key hash || Ed25519 signature)>`` where the key hash
  is the first 4 bytes of ``SHA-256(origin || "\\n" || 0x01 || public key)`` and the
  signature covers the body's bytes. Public keys are shown as
  :func:`cuga.shared.signing.public_key_text` shows every key (base64url of the 32 bytes).

The audit service uses these to build its log; ``cuga audit`` and the Node client use
them (or their few-line equivalents) to check what the service answers, trusting nothing
but a checkpoint key they pinned.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from json import encoder as json_encoder
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf import struct_pb2

from cuga.audit.v1 import audit_pb2
from cuga.shared.messages import struct_to_dict
from cuga.shared.signing import load_public_key

#: The members of a leaf's JSON object (RFC 8785 orders them; this is that order).
LEAF_FIELDS: tuple[str, ...] = (
    "actor",
    "chain_index",
    "kind",
    "payload",
    "profile",
    "record_id",
    "run_id",
    "timestamp",
    "trace_id",
)
HASH_SIZE = 32
#: RFC 9162 root of the empty tree.
EMPTY_ROOT = hashlib.sha256(b"").digest()
_SIGNATURE_DASH = "\u2014"
_ED25519_ALGORITHM = b"\x01"


class ProofError(ValueError):
    """A proof, a checkpoint or a leaf does not check out; the message says what."""


# -- leaves and nodes --------------------------------------------------------------------


def _doubles(value: Any) -> Any:
    """``value`` with every number a double, as JSON (and JavaScript) has them: a parser
    that reads ``9007199254740993`` as an exact integer would hash another number."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _doubles(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_doubles(v) for v in value]
    return value


def leaf_data(content: Mapping[str, Any]) -> bytes:
    """The leaf data of a record given as a JSON object (an exported line, a parsed
    record): RFC 8785 canonical JSON of its :data:`LEAF_FIELDS`, every number read as
    an IEEE double.

    Raises:
        KeyError: a leaf field is missing.
        ValueError: a value JSON cannot carry (NaN, Infinity).
    """
    return rfc8785.dumps({name: _doubles(content[name]) for name in LEAF_FIELDS})


def canonical_json(value: Any) -> str:
    """RFC 8785 canonical JSON text of a JSON-like value.

    The common case — keys below U+D800, strings without surrogates, integers and whole
    floats within 2^53, other floats at least 10^-4 in magnitude — is
    written by the standard library's C encoder, whose output is then the same text (see
    :func:`_plain_json`); anything else by the ``rfc8785`` package. A property test pins
    the two against each other.

    Raises:
        ValueError: a value JSON cannot carry (NaN, Infinity, an integer beyond 2^53).
    """
    plain = _plain_json(value)
    if plain is not _NOT_PLAIN:
        return _encode_plain(plain)
    return rfc8785.dumps(value).decode("utf-8")


def canonical_struct_json(payload: struct_pb2.Struct) -> str:
    """``canonical_json(struct_to_dict(payload))``, the same text, in one walk of the Struct.

    Every audit record's payload is canonicalised (its leaf data); walking the Struct into
    a dict and then that dict into its plain form was two Python passes over it. The walk
    here reads each value once and makes the plain form (:func:`_plain_json`'s rules)
    directly; a payload with anything off the fast path (or a number JSON cannot carry)
    goes the long way, which decides the text or the error. A property test pins the two.

    Raises:
        ValueError: a number is NaN or Infinity (as :func:`struct_to_dict` raises).
    """
    plain = _plain_struct(payload)
    if plain is _NOT_PLAIN:
        return canonical_json(struct_to_dict(payload))
    return _encode_plain(plain)


#: Sorted keys, no whitespace, UTF-8 text as is, only quote, backslash and control
#: characters escaped (``\b \t \n \f \r``, else ``\u00xx`` in lowercase): RFC 8785's
#: string and structure rules.
_PLAIN_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)
_NOT_PLAIN: Any = object()
_MAX_SAFE_INT = 2**53 - 1


def _no_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")  # never: plain values only


# The C encoder _PLAIN_ENCODER.encode builds on every call, built once (its arguments are
# JSONEncoder.iterencode's for _PLAIN_ENCODER; no cycle check: a plain value is a tree).
_MAKE_C_ENCODER = getattr(json_encoder, "c_make_encoder", None)
_C_ENCODER = (
    None
    if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(
        None, _no_default, json_encoder.encode_basestring, None, ":", ",", True, False, False
    )
)


def _encode_plain(plain: Any) -> str:
    """``_PLAIN_ENCODER.encode(plain)`` for a value :func:`_plain_json` returned."""
    if _C_ENCODER is None:
        return _PLAIN_ENCODER.encode(plain)
    return "".join(_C_ENCODER(plain, 0))


def _plain_text(text: str) -> bool:
    # Non-ASCII text: UTF-16 order = code point order below U+D800, and no lone surrogate
    # (which UTF-8 cannot encode; rfc8785 refuses it).
    return text.isascii() or max(text) < "\ud800"


def _plain_json(value: Any) -> Any:
    """``value`` with whole floats as ints, when json's encoder writes it as RFC 8785
    does; ``_NOT_PLAIN`` otherwise.

    Where the two differ, and this returns ``_NOT_PLAIN``: object keys are sorted by
    UTF-16 code units (Python sorts by code points: they agree below U+D800); numbers
    are written as ECMAScript does: a whole double without a fraction (json writes
    ``1.0``; exact below 2^53, beyond that its shortest digits padded with zeros up to
    10^21, then as an exponent: those go to the package); a fraction in fixed notation down to
    10^-6 (json switches to an exponent below 10^-4, so those go to the package); NaN,
    Infinity and integers beyond 2^53 are refused (the package raises).
    """
    if isinstance(value, str):
        return value if _plain_text(value) else _NOT_PLAIN
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT else _NOT_PLAIN
    if isinstance(value, float):
        if value.is_integer():
            return int(value) if abs(value) <= _MAX_SAFE_INT else _NOT_PLAIN
        return value if math.isfinite(value) and abs(value) >= 1e-4 else _NOT_PLAIN
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not _plain_text(key):
                return _NOT_PLAIN
            plain = _plain_json(item)
            if plain is _NOT_PLAIN:
                return _NOT_PLAIN
            out[key] = plain
        return out
    if isinstance(value, list | tuple):
        items = []
        for item in value:
            plain = _plain_json(item)
            if plain is _NOT_PLAIN:
                return _NOT_PLAIN
            items.append(plain)
        return items
    return _NOT_PLAIN


def _plain_struct(struct: struct_pb2.Struct) -> Any:
    """``_plain_json(struct_to_dict(struct))``, or ``_NOT_PLAIN`` (also for a number JSON
    cannot carry, which the long way then refuses)."""
    fields = struct.fields
    out = {}
    for key in fields:  # keys then lookups: the map's items() is a slow generator
        if not (key.isascii() or max(key) < "\ud800"):
            return _NOT_PLAIN
        plain = _plain_value(fields[key])
        if plain is _NOT_PLAIN:
            return _NOT_PLAIN
        out[key] = plain
    return out


def _plain_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        return text if text.isascii() or max(text) < "\ud800" else _NOT_PLAIN
    if kind == "number_value":
        number = value.number_value
        if number.is_integer():
            return int(number) if -_MAX_SAFE_INT <= number <= _MAX_SAFE_INT else _NOT_PLAIN
        return number if math.isfinite(number) and abs(number) >= 1e-4 else _NOT_PLAIN
    if kind == "struct_value":
        return _plain_struct(value.struct_value)
    if kind == "list_value":
        items = []
        for item in value.list_value.values:
            plain = _plain_value(item)
            if plain is _NOT_PLAIN:
                return _NOT_PLAIN
            items.append(plain)
        return items
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind set (struct_to_dict reads both as None)


def leaf_content(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    """The JSON object whose canonical form is a stored record's leaf data."""
    return {
        "actor": record.actor,
        "chain_index": int(record.chain_index),
        "kind": record.kind,
        "payload": struct_to_dict(record.payload),
        "profile": record.profile,
        "record_id": record.record_id,
        "run_id": record.run_id,
        "timestamp": record.timestamp.ToJsonString(),
        "trace_id": record.trace_id,
    }


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_of(hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash (RFC 9162 MTH) of leaf hashes, in O(n) time and O(log n) room."""
    stack: list[tuple[int, bytes]] = []  # (size, hash) of perfect subtrees, largest first
    for h in hashes:
        size, value = 1, h
        while stack and stack[-1][0] == size:
            left = stack.pop()[1]
            size, value = size * 2, node_hash(left, value)
        stack.append((size, value))
    if not stack:
        return EMPTY_ROOT
    value = stack[-1][1]
    for _, left in reversed(stack[:-1]):
        value = node_hash(left, value)
    return value


# -- proof verification (RFC 9162 2.1.3.2 and 2.1.4.2) -------------------------------------


def _check_hashes(proof: Iterable[bytes]) -> list[bytes]:
    out = list(proof)
    if any(len(h) != HASH_SIZE for h in out):
        raise ProofError("a proof hash is not 32 bytes")
    return out


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Iterable[bytes], root: bytes
) -> None:
    """Check that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of ``size`` leaves
    whose root is ``root``.

    Raises:
        ProofError: it is not (or the proof is malformed).
    """
    path = _check_hashes(proof)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError(f"leaf {index} is not in the tree of size {size} with that root")


def verify_consistency(
    old_size: int, new_size: int, proof: Iterable[bytes], old_root: bytes, new_root: bytes
) -> None:
    """Check that the tree of ``old_size`` leaves with ``old_root`` is a prefix of the tree
    of ``new_size`` leaves with ``new_root``.

    Raises:
        ProofError: it is not (history was rewritten), or the proof is malformed.
    """
    path = _check_hashes(proof)
    if not 0 <= old_size <= new_size:
        raise ProofError(f"tree size went from {old_size} down to {new_size}")
    if old_size == new_size:
        if path:
            raise ProofError("a consistency proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {old_size}")
        return
    if old_size == 0:
        if path:
            raise ProofError("a consistency proof from the empty tree must be empty")
        return
    if not path:
        raise ProofError("empty consistency proof")
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        path = [old_root, *path]
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"the log's first {old_size} records are not the ones checkpointed")
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the root of size {new_size}")


# -- checkpoints (signed notes) ------------------------------------------------------------


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint read from its signed note."""

    origin: str
    """The log's name."""
    tree_size: int
    """Leaves in the tree."""
    root_hash: bytes
    """RFC 9162 root of the first ``tree_size`` leaves."""
    time: str
    """When it was signed (RFC 3339, UTC)."""
    note: str
    """The signed note, byte for byte."""


def key_hash(origin: str, public_key: Ed25519PublicKey | str) -> bytes:
    """The 4-byte key hash of a note signature: ``SHA-256(origin || "\\n" || 0x01 || key)``."""
    key = load_public_key(public_key) if isinstance(public_key, str) else public_key
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(origin.encode() + b"\n" + _ED25519_ALGORITHM + raw).digest()[:4]


def checkpoint_body(origin: str, tree_size: int, root: bytes, time_ns: int) -> str:
    """The text a checkpoint signs."""
    if not origin or any(c.isspace() or c == "+" for c in origin):
        raise ValueError("a checkpoint origin is non-empty, without spaces or '+'")
    when = dt.datetime.fromtimestamp(time_ns // 1_000_000_000, dt.UTC).replace(
        microsecond=(time_ns % 1_000_000_000) // 1000
    )
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return f"{origin}\n{tree_size}\n{base64.b64encode(root).decode()}\ntime {stamp}\n"


def sign_checkpoint(
    body: str, origin: str, public_key: Ed25519PublicKey, sign: Callable[[bytes], bytes]
) -> str:
    """The signed note of ``body``: the body, a blank line, one signature line.

    Args:
        body: :func:`checkpoint_body` output.
        origin: the log's name (the signature's key name).
        public_key: the key ``sign`` signs for.
        sign: Ed25519 signature of bytes (a private key's ``sign``, or a remote signer).
    """
    signature = sign(body.encode("utf-8"))
    if len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 bytes")
    blob = base64.b64encode(key_hash(origin, public_key) + signature).decode()
    return f"{body}\n{_SIGNATURE_DASH} {origin} {blob}\n"


def open_checkpoint(note: str, public_key: str, *, origin: str = "") -> SignedCheckpoint:
    """Verify a checkpoint's signature with a pinned key and read it.

    Args:
        note: the signed note.
        public_key: the checkpoint key (:func:`~cuga.shared.signing.public_key_text` form).
        origin: when set, the log the checkpoint must be for.

    Raises:
        ProofError: malformed, for another log, or not signed by that key.
    """
    body, sep, signatures = note.partition("\n\n")
    if not sep or not signatures.endswith("\n"):
        raise ProofError("not a signed note (no blank line before the signatures)")
    body += "\n"
    lines = body.split("\n")[:-1]
    if len(lines) < 3:
        raise ProofError("a checkpoint has an origin, a size and a root hash")
    name, size_text, root_text = lines[0], lines[1], lines[2]
    if origin and name != origin:
        raise ProofError(f"checkpoint of log {name!r}, expected {origin!r}")
    if not size_text.isascii() or not size_text.isdigit() or len(size_text) > 20:
        raise ProofError("checkpoint tree size is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        raise ProofError("checkpoint root is not base64") from None
    if len(root) != HASH_SIZE:
        raise ProofError("checkpoint root is not 32 bytes")
    time = next((x[5:] for x in lines[3:] if x.startswith("time ")), "")
    try:
        key = load_public_key(public_key)
    except ValueError as exc:
        raise ProofError(f"checkpoint key: {exc}") from None
    wanted = key_hash(name, key)
    for line in signatures[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _SIGNATURE_DASH or parts[1] != name:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(blob) != 68 or blob[:4] != wanted:
            continue
        try:
            key.verify(blob[4:], body.encode("utf-8"))
        except InvalidSignature:
            raise ProofError("checkpoint signature does not verify (forged or altered)") from None
        return SignedCheckpoint(name, int(size_text), root, time, note)
    raise ProofError("checkpoint is not signed by the pinned key")


__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "LEAF_FIELDS",
    "ProofError",
    "SignedCheckpoint",
    "canonical_json",
    "canonical_struct_json",
    "checkpoint_body",
    "key_hash",
    "leaf_content",
    "leaf_data",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "root_of",
    "sign_checkpoint",
    "verify_consistency",
    "verify_inclusion",
]
