"""Routing policies in isolation: choices, scores, explanations, and their invariants."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2
from cuga.services.routing.policies import (
    Candidate,
    CapabilityBasedPolicy,
    LoadBalancedPolicy,
    RoundRobinPolicy,
    StepNeed,
)


def _c(
    worker_id: str, in_flight: int = 0, latency: float = 0.0, caps: tuple[str, ...] = ()
) -> Candidate:
    return Candidate(
        worker_id=worker_id,
        address=f"{worker_id}:1",
        tools=frozenset({"search"}),
        capabilities=frozenset(caps),
        in_flight=in_flight,
        recent_latency_s=latency,
    )


NEED = StepNeed("search")

# -- round robin -------------------------------------------------------------------------


def test_round_robin_rotates_in_id_order_and_explains() -> None:
    policy = RoundRobinPolicy()
    cands = [_c("w1"), _c("w2"), _c("w3")]
    picks = [policy.choose(NEED, cands).chosen.worker_id for _ in range(6)]
    assert picks == ["w1", "w2", "w3", "w1", "w2", "w3"]
    choice = policy.choose(NEED, cands)
    assert choice.score == 1.0
    assert "round_robin policy chose w1" in choice.reasoning
    assert "3 available worker(s) offering tool `search`" in choice.reasoning
    assert [a.candidate.worker_id for a in choice.alternatives] == ["w2", "w3"]
    assert all(a.score < choice.score for a in choice.alternatives)
    assert "not its turn" in choice.alternatives[0].reason
    assert RoundRobinPolicy.proto == common_pb2.ROUTING_POLICY_ROUND_ROBIN


def test_round_robin_keeps_one_cursor_per_need() -> None:
    policy = RoundRobinPolicy()
    cands = [_c("w1"), _c("w2")]
    assert policy.choose(NEED, cands).chosen.worker_id == "w1"
    assert policy.choose(StepNeed("search", "fast"), cands).chosen.worker_id == "w1"
    assert policy.choose(NEED, cands).chosen.worker_id == "w2"


def test_round_robin_neither_skips_nor_repeats_when_a_worker_joins() -> None:
    policy = RoundRobinPolicy()
    assert policy.choose(NEED, [_c("w1"), _c("w3")]).chosen.worker_id == "w1"
    # w2 joins between w1 and w3: it is next, w3 is not skipped afterwards.
    cands = [_c("w1"), _c("w2"), _c("w3")]
    assert [policy.choose(NEED, cands).chosen.worker_id for _ in range(3)] == ["w2", "w3", "w1"]


def test_round_robin_wraps_when_the_last_chosen_worker_left() -> None:
    policy = RoundRobinPolicy()
    for _ in range(3):
        policy.choose(NEED, [_c("w1"), _c("w2"), _c("w3")])
    assert policy.choose(NEED, [_c("w1"), _c("w2")]).chosen.worker_id == "w1"


@settings(max_examples=60, deadline=None)
@given(n_workers=st.integers(1, 8), calls=st.integers(1, 60))
def test_round_robin_is_fair_over_n_calls(n_workers: int, calls: int) -> None:
    policy = RoundRobinPolicy()
    cands = [_c(f"w{i:02d}") for i in range(n_workers)]
    counts = Counter(policy.choose(NEED, cands).chosen.worker_id for _ in range(calls))
    per_worker = [counts.get(c.worker_id, 0) for c in cands]
    assert max(per_worker) - min(per_worker) <= 1
    assert sum(per_worker) == calls


# -- capability --------------------------------------------------------------------------


def test_capability_breaks_ties_by_load_then_id_and_explains() -> None:
    need = StepNeed("search", "payments")
    cands = [
        _c("w1", in_flight=5, caps=("payments",)),
        _c("w2", in_flight=3, caps=("payments",)),
        _c("w3", in_flight=3, caps=("payments", "fx")),
    ]
    choice = CapabilityBasedPolicy().choose(need, cands)
    assert choice.chosen.worker_id == "w2"
    assert choice.score == 1.0
    assert (
        choice.reasoning == "capability policy chose w2: offers `payments`; 3 in flight vs 3 on w3"
    )
    reasons = {a.candidate.worker_id: a.reason for a in choice.alternatives}
    assert reasons["w3"] == "same overlap and load; w2 sorts first by id"
    assert reasons["w1"] == "same overlap, more load (5 in flight vs 3)"


def test_capability_explains_a_single_candidate() -> None:
    choice = CapabilityBasedPolicy().choose(NEED, [_c("w1")])
    assert (
        choice.reasoning
        == "capability policy chose w1: offers tool `search`; the only eligible worker"
    )
    assert choice.alternatives == ()


def test_capability_overlap_counts_tool_and_capability() -> None:
    need = StepNeed("search", "payments")
    assert CapabilityBasedPolicy.overlap(need, _c("w1", caps=("payments",))) == 1.0
    assert CapabilityBasedPolicy.overlap(need, _c("w1")) == 0.5


_caps = st.frozensets(st.sampled_from(["payments", "fx", "gpu"]), max_size=3)


@settings(max_examples=80, deadline=None)
@given(
    workers=st.lists(st.tuples(st.integers(0, 20), _caps), min_size=1, max_size=8),
    capability=st.sampled_from(["payments", "fx", "gpu"]),
)
def test_capability_never_picks_a_worker_lacking_the_capability(
    workers: list[tuple[int, frozenset[str]]], capability: str
) -> None:
    # Candidates as the authority would pass them: only those offering the capability,
    # but a policy must still rank a mixed list (overlap) correctly.
    cands = [
        _c(f"w{i}", in_flight=load, caps=tuple(caps)) for i, (load, caps) in enumerate(workers)
    ]
    offering = [c for c in cands if capability in c.capabilities]
    need = StepNeed("search", capability)
    if offering:
        choice = CapabilityBasedPolicy().choose(need, cands)
        assert capability in choice.chosen.capabilities
        assert choice.chosen.in_flight == min(c.in_flight for c in offering)


# -- load balanced ------------------------------------------------------------------------


def test_load_balanced_prefers_least_in_flight_then_latency_then_id() -> None:
    policy = LoadBalancedPolicy()
    cands = [_c("w1", 2, 0.01), _c("w2", 1, 0.30), _c("w3", 1, 0.05), _c("w4", 1, 0.05)]
    choice = policy.choose(NEED, cands)
    assert choice.chosen.worker_id == "w3"
    assert choice.score == 0.5
    assert choice.reasoning == (
        "load_balanced policy chose w3: 1 in flight vs 1 on w4, tie broken by id"
    )
    reasons = {a.candidate.worker_id: a.reason for a in choice.alternatives}
    assert reasons["w1"] == "more load (2 in flight vs 1)"
    assert reasons["w2"] == "same load, slower (300 ms vs 50 ms)"
    assert reasons["w4"] == "same load and latency; w3 sorts first by id"
    assert {a.candidate.worker_id: a.score for a in choice.alternatives}["w1"] == 1 / 3


def test_load_balanced_reasoning_mentions_latency_when_it_decides() -> None:
    choice = LoadBalancedPolicy().choose(NEED, [_c("w1", 0, 0.2), _c("w2", 0, 0.1)])
    assert choice.reasoning == (
        "load_balanced policy chose w2: 0 in flight vs 0 on w1, recent latency 100 ms vs 200 ms"
    )


@settings(max_examples=80, deadline=None)
@given(
    loads=st.lists(
        st.tuples(st.integers(0, 10), st.floats(0, 5, allow_nan=False)), min_size=1, max_size=10
    )
)
def test_load_balanced_always_picks_a_minimal_in_flight_worker(
    loads: list[tuple[int, float]],
) -> None:
    cands = [_c(f"w{i:02d}", load, lat) for i, (load, lat) in enumerate(loads)]
    choice = LoadBalancedPolicy().choose(NEED, cands)
    least = min(c.in_flight for c in cands)
    assert choice.chosen.in_flight == least
    fastest = min(c.recent_latency_s for c in cands if c.in_flight == least)
    assert choice.chosen.recent_latency_s == fastest
    assert len(choice.alternatives) == len(cands) - 1
    assert all(a.score <= choice.score for a in choice.alternatives)
