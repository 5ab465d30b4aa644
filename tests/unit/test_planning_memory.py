"""VectorMemory: profile isolation (adversarial names), similarity, eviction, embedder."""

from __future__ import annotations

import numpy as np
import pytest

from cuga.services.planning.memory import Embedder, HashingEmbedder, VectorMemory
from cuga.shared.clock import FakeClock
from tests.support.postgres import postgres_cluster, postgres_dsn  # noqa: F401
from tests.unit.test_planning_support import Location, open_db, store_location  # noqa: F401

ADVERSARIAL = [
    "a' OR '1'='1",
    "%",
    "_",
    "a\x00b",
    "a",
    "A",
    "default ",
    "*",
    "a'--",
    "é",
    "e\u0301",
]


def _memory(location: Location, **kw: object) -> VectorMemory:
    return VectorMemory(
        open_db(location, "m.db"),
        HashingEmbedder(128),
        clock=FakeClock(),
        **kw,  # type: ignore[arg-type]
    )


def test_each_profile_sees_only_its_own_records(store_location: Location) -> None:  # noqa: F811
    memory = _memory(store_location)
    for profile in ADVERSARIAL:
        memory.add(profile, "book a flight to Rome", {"owner": profile})
    for profile in ADVERSARIAL:
        hits = memory.search(profile, "book a flight to Rome", limit=100)
        assert [h.payload["owner"] for h in hits] == [profile]
        assert memory.count(profile) == 1
    assert memory.search("a\x00", "book a flight to Rome") == []
    assert memory.search("nobody", "book a flight to Rome") == []


def test_empty_profile_is_the_default_profile(store_location: Location) -> None:  # noqa: F811
    memory = _memory(store_location)
    memory.add("", "plan the offsite", {"n": 1})
    assert [h.payload["n"] for h in memory.search("default", "plan the offsite")] == [1]
    assert memory.search("Default", "plan the offsite") == []


def test_search_ranks_by_similarity_with_threshold(store_location: Location) -> None:  # noqa: F811
    memory = _memory(store_location)
    memory.add("p", "summarise the quarterly sales report", {"i": 1})
    memory.add("p", "water the plants in the garden", {"i": 2})
    hits = memory.search("p", "summarise the sales report for the quarter", limit=5)
    assert [h.payload["i"] for h in hits] == [1, 2]
    assert hits[0].score > 0.5 > hits[1].score
    assert [h.payload["i"] for h in memory.search("p", "quarterly sales", min_score=0.3)] == [1]
    assert memory.search("p", "anything", limit=0) == []


def test_key_replaces_and_cap_evicts_oldest(store_location: Location) -> None:  # noqa: F811
    clock = FakeClock()
    memory = VectorMemory(
        open_db(store_location, "m.db"), HashingEmbedder(64), clock=clock, max_records_per_profile=3
    )
    memory.add("p", "first", {"v": 1}, key="k")
    memory.add("p", "first again", {"v": 2}, key="k")
    assert memory.count("p") == 1
    for i in range(5):
        clock.advance(1)
        memory.add("p", f"note {i}", {"v": i})
    memory.add("q", "other profile", {})
    assert memory.count("p") == 3
    assert sorted(h.text for h in memory.search("p", "note", limit=10)) == [
        "note 2",
        "note 3",
        "note 4",
    ]
    assert memory.count("q") == 1


def test_cap_evicts_by_insertion_order_when_times_tie(store_location: Location) -> None:  # noqa: F811
    memory = VectorMemory(
        open_db(store_location, "m.db"),
        HashingEmbedder(64),
        clock=FakeClock(),
        max_records_per_profile=3,
    )
    for i in range(6):  # the clock never moves: every record has the same created_at
        memory.add("p", f"note {i}", {"v": i})
        assert memory.count("p") == min(i + 1, 3)
    assert sorted(h.text for h in memory.search("p", "note", limit=10)) == [
        "note 3",
        "note 4",
        "note 5",
    ]


def test_records_of_another_embedder_are_not_compared(store_location: Location) -> None:  # noqa: F811
    conn = open_db(store_location, "m.db")
    VectorMemory(conn, HashingEmbedder(64)).add("p", "hello world", {})
    assert VectorMemory(conn, HashingEmbedder(128)).search("p", "hello world") == []


def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    emb = HashingEmbedder(256)
    assert isinstance(emb, Embedder)
    a, b, empty = emb.embed(["Weather in Paris", "weather in paris", ""])
    assert a.dtype == np.float32 and a.shape == (256,)
    assert np.allclose(a, b)
    assert np.isclose(np.linalg.norm(a), 1.0)
    assert not empty.any()
    # A fresh instance (as after a restart) gives the same vector: no salted hash().
    assert np.allclose(HashingEmbedder(256).embed(["Weather in Paris"])[0], a)


def test_custom_embedder_can_be_plugged(store_location: Location) -> None:  # noqa: F811
    class Fixed:
        name = "fixed"
        dims = 2

        def embed(self, texts: object) -> np.ndarray:
            return np.array(
                [[1.0, 0.0] if "x" in t else [0.0, 1.0] for t in texts],  # type: ignore[attr-defined]
                dtype=np.float32,
            )

    memory = VectorMemory(open_db(store_location, "m.db"), Fixed())
    memory.add("p", "x marks", {"i": 1})
    memory.add("p", "nothing", {"i": 2})
    assert memory.search("p", "xyz", limit=1)[0].payload == {"i": 1}


def test_invalid_cap_is_refused(store_location: Location) -> None:  # noqa: F811
    with pytest.raises(ValueError):
        _memory(store_location, max_records_per_profile=0)
