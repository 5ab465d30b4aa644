"""Profile-isolated vector memory of past goals, with a download-free default embedder.

Records are ``(profile, text, embedding, payload)``. Every read and write names exactly one
profile, and the profile is a bound SQL parameter compared byte for byte (stored as a BLOB
of its UTF-8 bytes), so no profile name — quotes, ``%``, NUL bytes — can match another
profile's rows. Search is a cosine over a profile-scoped scan, computed with numpy; the
scan is bounded because each profile keeps at most ``max_records_per_profile`` records
(the oldest are evicted). The same code runs on SQLite and on PostgreSQL (``BYTEA``
profile keys, an identity column standing in for SQLite's ``rowid`` as the tie-breaker).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cuga.shared.clock import Clock, SystemClock
from cuga.shared.migrations import Migration, Schema, migrate_postgres
from cuga.shared.sqldb import AsyncDatabase, Database, PostgresPool, as_database

DEFAULT_PROFILE = "default"

Vector = npt.NDArray[np.float32]

_WORD = re.compile(r"\w+", re.UNICODE)

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS memory (
    record_id TEXT PRIMARY KEY,
    profile BLOB NOT NULL,
    record_key TEXT NOT NULL,
    embedder TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (profile, record_key)
);
CREATE INDEX IF NOT EXISTS memory_profile_created ON memory (profile, created_at);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS memory (
    record_id TEXT PRIMARY KEY,
    profile BYTEA NOT NULL,
    record_key TEXT NOT NULL,
    embedder TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BYTEA NOT NULL,
    payload TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    n BIGINT GENERATED ALWAYS AS IDENTITY,
    UNIQUE (profile, record_key)
);
CREATE INDEX IF NOT EXISTS memory_profile_created ON memory (profile, created_at);
"""

#: Advisory lock key held while migrating the table (replicas start together).
_SCHEMA_LOCK = 0x637567_6D65
#: Plan memory's schema as numbered migrations (never edit a released one; add the next).
MEMORY_SCHEMA = Schema(
    "planning.memory",
    (Migration(1, "plan memory", _SQLITE_SCHEMA, _POSTGRES_SCHEMA),),
    lock_key=_SCHEMA_LOCK,
)
#: The insertion-order column that breaks ties of ``created_at``.
_ORDER = {"sqlite": "rowid", "postgres": "n"}


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit-length vectors; plug a real model in by implementing this."""

    @property
    def name(self) -> str:
        """Identifies the embedding space; vectors of different names are never compared."""
        ...

    @property
    def dims(self) -> int:
        """Length of every vector."""
        ...

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """A ``(len(texts), dims)`` float32 array of L2-normalised rows (zero rows allowed)."""
        ...


class HashingEmbedder:
    """Feature hashing of word unigrams, word bigrams and character trigrams.

    Deterministic across processes (blake2b, not Python's salted ``hash``), needs no model
    download, and makes texts that share words or word fragments similar. Each feature
    adds ``±weight`` to one of ``dims`` buckets (the sign from another hash bit keeps
    collisions from only ever adding up); rows are L2-normalised.
    """

    def __init__(self, dims: int = 512) -> None:
        if dims < 1:
            raise ValueError("dims must be >= 1")
        self._dims = dims

    @property
    def name(self) -> str:
        """``hashing-v1-<dims>``: another size is another embedding space."""
        return f"hashing-v1-{self._dims}"

    @property
    def dims(self) -> int:
        """The number of buckets, the length of every vector (512 by default)."""
        return self._dims

    @staticmethod
    def features(text: str) -> list[tuple[str, float]]:
        """The weighted features of a text (words weigh more than character trigrams)."""
        words = _WORD.findall(text.casefold())
        feats: list[tuple[str, float]] = [(f"w:{w}", 1.0) for w in words]
        feats += [(f"b:{a} {b}", 0.7) for a, b in itertools.pairwise(words)]
        for w in words:
            padded = f"#{w}#"
            feats += [(f"c:{padded[i : i + 3]}", 0.3) for i in range(max(1, len(padded) - 2))]
        return feats

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """A ``(len(texts), dims)`` float32 array, one L2-normalised row per text (a text
        without a word gives a zero row)."""
        out = np.zeros((len(texts), self._dims), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature, weight in self.features(text):
                digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
                value = int.from_bytes(digest, "little")
                sign = 1.0 if value & 1 else -1.0
                out[row, (value >> 1) % self._dims] += sign * weight
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


@dataclass(frozen=True)
class MemoryHit:
    """One search result."""

    record_id: str
    """The stored record's id."""
    key: str
    """The key it was stored under (unique per profile; storing the key again replaces it)."""
    text: str
    """The text that was embedded."""
    payload: Mapping[str, Any]
    """What was stored with the text (JSON)."""
    score: float
    """Cosine similarity to the query, -1 to 1."""
    created_at: float
    """When it was stored, seconds since the epoch."""


def normalise_profile(profile: str) -> str:
    """The profile a record belongs to: empty means ``default``."""
    return profile or DEFAULT_PROFILE


def _profile_key(profile: str) -> bytes:
    # surrogatepass: any Python str (even lone surrogates) maps to distinct bytes.
    return normalise_profile(profile).encode("utf-8", "surrogatepass")


class VectorMemory:
    """Per-profile memory of texts with JSON payloads, searched by cosine similarity.

    :meth:`add`, :meth:`search` and :meth:`count` are synchronous (SQLite: the embedded
    engine and its public ``VectorMemory``); :meth:`asearch` and :meth:`aadd_in` are their
    awaited forms, which the planning service uses, also on a PostgreSQL pool.

    Args:
        conn: a :class:`~cuga.shared.sqldb.Database` (SQLite or PostgreSQL) or an open
            SQLite connection (see :func:`cuga.shared.sqlite.open_sqlite`), the table
            created if missing; or a :class:`~cuga.shared.sqldb.PostgresPool` (migrated by
            :meth:`open`; awaited methods only). The database may be shared with other
            stores so a write can join their transaction (:meth:`add_in`).
        embedder: turns texts into vectors.
        max_records_per_profile: cap per profile; adding past it evicts the oldest.
        clock: timestamps records.
    """

    def __init__(
        self,
        conn: Database | sqlite3.Connection | PostgresPool,
        embedder: Embedder,
        *,
        max_records_per_profile: int = 5000,
        clock: Clock | None = None,
    ) -> None:
        if max_records_per_profile < 1:
            raise ValueError("max_records_per_profile must be >= 1")
        self._embedder = embedder
        self._max = max_records_per_profile
        self._clock = clock or SystemClock()
        self._pool = conn if isinstance(conn, PostgresPool) else None
        self._sync: Database | None = None
        if isinstance(conn, PostgresPool):
            self._order = _ORDER[conn.dialect]
        else:
            self._sync = as_database(conn)
            self._order = _ORDER[self._sync.dialect]
            MEMORY_SCHEMA.migrate(self._sync)

    async def open(self) -> None:
        """Apply the pending migrations of a pooled database; nothing otherwise."""
        if self._pool is not None:
            await migrate_postgres(self._pool.dsn, [MEMORY_SCHEMA])

    @property
    def _conn(self) -> Database:
        if self._sync is None:
            raise TypeError("this memory is on a connection pool: use asearch / aadd_in")
        return self._sync

    @property
    def embedder(self) -> Embedder:
        """The embedder in use."""
        return self._embedder

    def add(
        self, profile: str, text: str, payload: Mapping[str, Any], *, key: str | None = None
    ) -> str:
        """Remember ``text`` with ``payload`` for ``profile``; return the record id.

        ``key`` makes the write idempotent: a second record with the same key in the same
        profile replaces the first.
        """
        with self._conn.transaction() as conn:
            return self.add_in(conn, profile, text, payload, key=key)

    def add_in(
        self,
        conn: Database,
        profile: str,
        text: str,
        payload: Mapping[str, Any],
        *,
        key: str | None = None,
    ) -> str:
        """Like :meth:`add`, inside a transaction the caller holds on ``conn``."""
        record_id, insert, pkey = self._insert(profile, text, payload, key)
        conn.execute(*insert)
        boundary = conn.execute(*self._boundary(pkey)).fetchone()
        if boundary is not None:
            conn.execute(*self._evict(pkey, boundary))
        return record_id

    async def aadd_in(
        self,
        conn: AsyncDatabase,
        profile: str,
        text: str,
        payload: Mapping[str, Any],
        *,
        key: str | None = None,
    ) -> str:
        """:meth:`add_in` on an awaited database (a transaction's, maybe a pool's)."""
        record_id, insert, pkey = self._insert(profile, text, payload, key)
        await conn.execute(*insert)
        boundary = (await conn.execute(*self._boundary(pkey))).fetchone()
        if boundary is not None:
            await conn.execute(*self._evict(pkey, boundary))
        return record_id

    def _insert(
        self, profile: str, text: str, payload: Mapping[str, Any], key: str | None
    ) -> tuple[str, tuple[str, tuple[Any, ...]], bytes]:
        """The record id, the upsert of the record and the profile's key."""
        vector = self._embedder.embed([text])[0].astype(np.float32)
        record_id = uuid.uuid4().hex
        pkey = _profile_key(profile)
        statement = (
            "INSERT INTO memory (record_id, profile, record_key, embedder, text, embedding,"
            " payload, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (profile, record_key) DO UPDATE SET record_id = excluded.record_id,"
            " embedder = excluded.embedder, text = excluded.text,"
            " embedding = excluded.embedding, payload = excluded.payload,"
            " created_at = excluded.created_at",
            (
                record_id,
                pkey,
                key or record_id,
                self._embedder.name,
                text,
                vector.tobytes(),
                json.dumps(dict(payload), sort_keys=True),
                self._clock.now(),
            ),
        )
        return record_id, statement, pkey

    def _boundary(self, pkey: bytes) -> tuple[str, tuple[Any, ...]]:
        # Evict the oldest beyond the cap so a search never scans more than the cap: find
        # the newest record past the cap by walking the (profile, created_at) index, then
        # delete it and everything older. (A NOT IN over the newest `cap` ids sorted and
        # scanned the whole profile on every insert: ~19 ms per run at a full memory.)
        return (
            f"SELECT created_at, {self._order} FROM memory WHERE profile = ?"
            f" ORDER BY created_at DESC, {self._order} DESC LIMIT 1 OFFSET ?",
            (pkey, self._max),
        )

    def _evict(self, pkey: bytes, boundary: Any) -> tuple[str, tuple[Any, ...]]:
        return (
            "DELETE FROM memory WHERE profile = ? AND (created_at < ?"
            f" OR (created_at = ? AND {self._order} <= ?))",
            (pkey, boundary[0], boundary[0], boundary[1]),
        )

    def search(
        self, profile: str, text: str, *, limit: int = 5, min_score: float = -1.0
    ) -> list[MemoryHit]:
        """The records of ``profile`` most similar to ``text``, best first.

        Only rows of this profile and of the current embedder are read; ties are broken by
        recency.
        """
        if limit < 1:
            return []
        rows = self._conn.execute(*self._candidates(profile)).fetchall()
        return self._rank(rows, text, limit, min_score)

    async def asearch(
        self, profile: str, text: str, *, limit: int = 5, min_score: float = -1.0
    ) -> list[MemoryHit]:
        """:meth:`search`, awaited (on a pool, while the service serves other calls)."""
        if limit < 1:
            return []
        db: AsyncDatabase | None = self._pool
        if db is None:
            rows = self._conn.execute(*self._candidates(profile)).fetchall()
        else:
            rows = (await db.execute(*self._candidates(profile))).fetchall()
        return self._rank(rows, text, limit, min_score)

    def _candidates(self, profile: str) -> tuple[str, tuple[Any, ...]]:
        return (
            "SELECT record_id, record_key, text, embedding, payload, created_at FROM memory"
            f" WHERE profile = ? AND embedder = ? ORDER BY created_at DESC, {self._order} DESC"
            " LIMIT ?",
            (_profile_key(profile), self._embedder.name, self._max),
        )

    def _rank(
        self, rows: Sequence[Any], text: str, limit: int, min_score: float
    ) -> list[MemoryHit]:
        """The best ``limit`` of ``rows`` (newest first) by similarity to ``text``."""
        if not rows:
            return []
        matrix = np.frombuffer(b"".join(r["embedding"] for r in rows), dtype=np.float32)
        matrix = matrix.reshape(len(rows), self._embedder.dims)
        query = self._embedder.embed([text])[0]
        scores = matrix @ query
        # Stable sort on -score keeps the recency order (rows are newest first) for ties.
        order = np.argsort(-scores, kind="stable")
        hits: list[MemoryHit] = []
        for idx in order[:limit]:
            score = float(scores[idx])
            if score < min_score:
                break
            row = rows[int(idx)]
            hits.append(
                MemoryHit(
                    record_id=row["record_id"],
                    key=row["record_key"],
                    text=row["text"],
                    payload=json.loads(row["payload"]),
                    score=score,
                    created_at=row["created_at"],
                )
            )
        return hits

    def count(self, profile: str) -> int:
        """Records kept for ``profile``."""
        row = self._conn.execute(
            "SELECT COUNT(*) FROM memory WHERE profile = ?", (_profile_key(profile),)
        ).fetchone()
        return int(row[0])


__all__ = [
    "DEFAULT_PROFILE",
    "Embedder",
    "HashingEmbedder",
    "MemoryHit",
    "VectorMemory",
    "normalise_profile",
]
