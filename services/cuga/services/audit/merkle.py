"""The audit log's Merkle tree on the server side: appending leaves, and proofs in O(log n).

The hashing rules are :mod:`cuga.shared.transparency` (RFC 9162). What is stored:

* every leaf hash (the record's ``hash``; a pruned record keeps it as a tombstone);
* every *complete* interior node at level :data:`STORED_LEVEL` or above (a node at level
  ``L`` covers ``2^L`` leaves; node ``(L, i)`` covers leaves ``[i * 2^L, (i + 1) * 2^L)``).
  Lower nodes are hashed again from at most ``2^STORED_LEVEL`` leaf hashes when a proof
  needs them, which costs less than writing them: a leaf writes 1/8 of a node row on
  average instead of one;
* the **frontier**: the hashes of the perfect subtrees that make up the whole tree (one
  per set bit of its size, largest first), from which the next leaf's new nodes and the
  root follow without reading anything else.

A proof is a list of subtree hashes (RFC 9162 2.1.3.1 and 2.1.4.1); every such subtree
splits into at most ``log2 n`` perfect subtrees, each of which is one stored node or at
most ``2^STORED_LEVEL`` leaf hashes, and all the leaf hashes a proof needs lie in at most
two leaf blocks. So a proof reads ``O(log n)`` rows in two queries, whatever the size of
the log (``bench/b5_audit.py`` measures it up to 10^6 leaves).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cuga.shared.errors import FailedPreconditionError
from cuga.shared.transparency import EMPTY_ROOT, HASH_SIZE, node_hash, root_of

_sha256 = hashlib.sha256

#: Interior nodes of this level and above are stored (levels below are rehashed).
STORED_LEVEL = 4

#: ``(level, index)`` of a perfect subtree.
NodeKey = tuple[int, int]
#: ``[start, end)`` leaf range.
LeafRange = tuple[int, int]


class LogDamagedError(FailedPreconditionError):
    """A leaf or node the tree needs is not in storage (deleted behind the service's back)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="LOG_DAMAGED", domain="cuga.audit")


class TreeSource(Protocol):
    """Where a backend's stored tree is read from."""

    def leaf_hashes(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes ``[start, end)`` in order (tombstones included).

        Raises:
            LogDamagedError: one of them is missing.
        """

    def stored_nodes(self, keys: Sequence[NodeKey]) -> dict[NodeKey, bytes]:
        """The stored nodes among ``keys`` (a missing one is left out)."""


@dataclass
class Frontier:
    """The perfect subtrees making up a tree of ``size`` leaves, largest first."""

    size: int = 0
    hashes: list[bytes] = field(default_factory=list)

    def append(self, leaf: bytes, nodes: list[tuple[int, int, bytes]]) -> None:
        """Add one leaf hash; the complete nodes of :data:`STORED_LEVEL` and above that it
        finishes are appended to ``nodes`` as ``(level, index, hash)``."""
        index = self.size
        hashes = self.hashes
        value, level, n = leaf, 0, index
        while n & 1:  # inline RFC 9162 node hashing: this runs for every leaf appended
            value = _sha256(b"\x01" + hashes.pop() + value).digest()
            level += 1
            n >>= 1
            if level >= STORED_LEVEL:
                nodes.append((level, index >> level, value))
        hashes.append(value)
        self.size = index + 1

    def root(self) -> bytes:
        """The tree's root (RFC 9162 MTH)."""
        if not self.hashes:
            return EMPTY_ROOT
        value = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            value = node_hash(left, value)
        return value

    def copy(self) -> Frontier:
        """An independent copy (a batch grows a copy; the stored one is kept on failure)."""
        return Frontier(self.size, list(self.hashes))

    def encode(self) -> str:
        """Hex text of the concatenated hashes, as stored."""
        return b"".join(self.hashes).hex()

    @classmethod
    def decode(cls, size: int, text: str) -> Frontier:
        """The frontier stored as ``(size, encode())``.

        Raises:
            LogDamagedError: the stored text does not fit the size.
        """
        try:
            blob = bytes.fromhex(text)
        except ValueError:
            raise LogDamagedError("the stored tree frontier is not hex") from None
        if size < 0 or len(blob) != HASH_SIZE * size.bit_count():
            raise LogDamagedError(f"the stored tree frontier does not fit a tree of {size}")
        return cls(size, [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)])


def perfect_subtrees(start: int, end: int) -> list[NodeKey]:
    """The perfect subtrees covering ``[start, end)``, left to right (each aligned)."""
    out: list[NodeKey] = []
    while start < end:
        size = 1 << ((end - start).bit_length() - 1)
        while start % size:
            size >>= 1
        level = size.bit_length() - 1
        out.append((level, start >> level))
        start += size
    return out


def _split(size: int) -> int:
    """The largest power of two smaller than ``size`` (``size`` >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def inclusion_ranges(index: int, size: int) -> list[LeafRange]:
    """The leaf ranges whose hashes make the audit path of leaf ``index`` in a tree of
    ``size`` leaves (RFC 9162 2.1.3.1), in proof order (from the leaf up)."""
    out: list[LeafRange] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            start += k
    out.reverse()
    return out


def consistency_ranges(old_size: int, new_size: int) -> list[LeafRange]:
    """The leaf ranges whose hashes make the consistency proof from ``old_size`` to
    ``new_size`` (RFC 9162 2.1.4.1), in proof order. Empty when the sizes are equal or
    ``old_size`` is 0."""
    if old_size == 0 or old_size == new_size:
        return []
    out: list[LeafRange] = []
    start, end, m, complete = 0, new_size, old_size, True
    while True:
        if m == end - start:
            if not complete:
                out.append((start, end))
            break
        k = _split(end - start)
        if m <= k:
            out.append((start + k, end))
            end = start + k
        else:
            out.append((start, start + k))
            m -= k
            start += k
            complete = False
    out.reverse()
    return out


def range_hashes(source: TreeSource, ranges: Sequence[LeafRange]) -> list[bytes]:
    """The RFC 9162 hash of each leaf range, reading every stored node in one call and
    the leaf hashes of the lower levels in one call per leaf block.

    Raises:
        LogDamagedError: a stored node or a leaf the ranges need is missing.
    """
    split = [perfect_subtrees(a, b) for a, b in ranges]
    high = sorted({key for keys in split for key in keys if key[0] >= STORED_LEVEL})
    low = {key for keys in split for key in keys if key[0] < STORED_LEVEL}
    nodes = source.stored_nodes(high) if high else {}
    missing = [key for key in high if key not in nodes]
    if missing:
        level, index = missing[0]
        raise LogDamagedError(
            f"tree node {level}/{index} (leaves {index << level}-{((index + 1) << level) - 1})"
            " is missing from storage"
        )
    if low:
        block = 1 << STORED_LEVEL
        for first in sorted({(i << level) // block for level, i in low}):
            a = first * block
            b = max(((i + 1) << level) for level, i in low if (i << level) // block == first)
            leaves = source.leaf_hashes(a, b)
            for level, i in low:
                if (i << level) // block == first:
                    lo = (i << level) - a
                    nodes[(level, i)] = root_of(leaves[lo : lo + (1 << level)])
    out = []
    for keys in split:
        value = nodes[keys[-1]]
        for key in reversed(keys[:-1]):
            value = node_hash(nodes[key], value)
        out.append(value)
    return out


def root_at(source: TreeSource, size: int) -> bytes:
    """The root of the tree's first ``size`` leaves, from storage."""
    if size == 0:
        return EMPTY_ROOT
    return range_hashes(source, [(0, size)])[0]


__all__ = [
    "STORED_LEVEL",
    "Frontier",
    "LeafRange",
    "LogDamagedError",
    "NodeKey",
    "TreeSource",
    "consistency_ranges",
    "inclusion_ranges",
    "perfect_subtrees",
    "range_hashes",
    "root_at",
]
