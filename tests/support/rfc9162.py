"""RFC 9162 section 2.1, written from the text and independent of the code under test:
the Merkle Tree Hash, inclusion paths and consistency proofs by the recursive definitions,
which the tests hold the log's own (iterative) code to."""

from __future__ import annotations

import hashlib


def H(data: bytes) -> bytes:
    """SHA-256."""
    return hashlib.sha256(data).digest()


def split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n`` > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: list[bytes]) -> bytes:
    """MTH over leaf hashes (2.1.1)."""
    n = len(leaves)
    if n == 0:
        return H(b"")
    if n == 1:
        return leaves[0]
    k = split(n)
    return H(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]): the inclusion proof of leaf ``m`` (2.1.3.1)."""
    n = len(leaves)
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) (2.1.4.1)."""
    n = len(leaves)
    if m == n:
        return [] if b else [mth(leaves)]
    k = split(n)
    if m <= k:
        return [*subproof(m, leaves[:k], b), mth(leaves[k:])]
    return [*subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]): the consistency proof from size ``m`` (empty for 0 and n)."""
    return [] if m in (0, len(leaves)) else subproof(m, leaves, True)
