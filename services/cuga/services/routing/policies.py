"""Routing policies: given the eligible workers for one step, pick one and say why.

Every policy implements :class:`RoutingPolicyImpl`: a synchronous ``choose`` over a
non-empty list of :class:`Candidate` ordered by worker id. ``choose`` never awaits, so
under the event loop one decision (and a whole batch) is atomic with respect to other
callers; that is what makes the round-robin cursor fair across concurrent callers
without a lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from cuga.common.v1 import common_pb2


@dataclass(frozen=True)
class StepNeed:
    """What a step requires of a worker.

    Attributes:
        tool: the tool it calls.
        capability: the capability it needs ("" for none).
    """

    tool: str
    capability: str = ""

    def describe(self) -> str:
        """``tool `x``` or ``tool `x` with capability `y```."""
        if self.capability:
            return f"tool `{self.tool}` with capability `{self.capability}`"
        return f"tool `{self.tool}`"


@dataclass(frozen=True)
class Candidate:
    """An eligible worker as a policy sees it.

    Attributes:
        worker_id: its id.
        address: host:port of its WorkerService.
        tools: tools it runs.
        capabilities: capabilities it offers.
        in_flight: calls in flight: the last reported value plus decisions taken earlier
            in the same batch.
        recent_latency_s: recent step latency it reported, seconds.
    """

    worker_id: str
    address: str
    tools: frozenset[str]
    capabilities: frozenset[str]
    in_flight: int = 0
    recent_latency_s: float = 0.0


@dataclass(frozen=True)
class Alternative:
    """An eligible worker that was not chosen."""

    candidate: Candidate
    score: float
    reason: str


@dataclass(frozen=True)
class Choice:
    """A policy's pick.

    Attributes:
        chosen: the worker.
        score: its score (higher is better).
        reasoning: a sentence a person can read.
        alternatives: every other candidate, with its score and why it lost.
    """

    chosen: Candidate
    score: float
    reasoning: str
    alternatives: tuple[Alternative, ...]


class RoutingPolicyImpl(Protocol):
    """One way of choosing a worker."""

    name: ClassVar[str]
    """Configuration name (``round_robin`` ...)."""
    proto: ClassVar[common_pb2.RoutingPolicy]
    """The contract's enum value."""

    def choose(self, need: StepNeed, candidates: Sequence[Candidate]) -> Choice:
        """Pick one of ``candidates`` (non-empty, ordered by worker id)."""
        ...


def _load(c: Candidate) -> str:
    return f"{c.in_flight} in flight"


def _latency(c: Candidate) -> str:
    return f"{c.recent_latency_s * 1000:.0f} ms"


class RoundRobinPolicy:
    """Rotate over the eligible workers, one cursor per (tool, capability).

    The cursor remembers the last worker chosen for that need; the next pick is the first
    eligible worker whose id sorts after it (wrapping around). Keyed by id rather than a
    position, so a worker joining or leaving does not make the rotation skip or repeat
    anyone; with a stable set, N picks differ by at most one between workers.
    """

    name: ClassVar[str] = "round_robin"
    proto: ClassVar[common_pb2.RoutingPolicy] = common_pb2.ROUTING_POLICY_ROUND_ROBIN

    def __init__(self) -> None:
        self._last: dict[StepNeed, str] = {}

    def choose(self, need: StepNeed, candidates: Sequence[Candidate]) -> Choice:
        """The next worker in rotation for ``need``."""
        n = len(candidates)
        last = self._last.get(need)
        start = 0
        if last is not None:
            start = next((i for i, c in enumerate(candidates) if c.worker_id > last), 0)
        chosen = candidates[start]
        self._last[need] = chosen.worker_id
        alternatives = []
        for k in range(1, n):
            c = candidates[(start + k) % n]
            # Score falls with the distance from the front of the rotation.
            alternatives.append(
                Alternative(c, 1.0 - k / n, f"not its turn: {k} pick(s) later in the rotation")
            )
        return Choice(
            chosen=chosen,
            score=1.0,
            reasoning=(
                f"round_robin policy chose {chosen.worker_id}: next in rotation among {n} "
                f"available worker(s) offering {need.describe()}"
            ),
            alternatives=tuple(alternatives),
        )


class CapabilityBasedPolicy:
    """Only workers offering the step's capability and tool; best overlap, then load, then id.

    The score is the capability overlap: the fraction of the step's requirements (its
    tool and, when set, its capability) the worker offers. Eligibility already demands
    both, so every candidate scores 1.0 and the decision is made by the tie-breaks:
    fewest calls in flight, then worker id.
    """

    name: ClassVar[str] = "capability"
    proto: ClassVar[common_pb2.RoutingPolicy] = common_pb2.ROUTING_POLICY_CAPABILITY

    @staticmethod
    def overlap(need: StepNeed, candidate: Candidate) -> float:
        """Fraction of ``need``'s requirements that ``candidate`` offers (0 to 1)."""
        required = [need.tool in candidate.tools]
        if need.capability:
            required.append(need.capability in candidate.capabilities)
        return sum(required) / len(required)

    def choose(self, need: StepNeed, candidates: Sequence[Candidate]) -> Choice:
        """The best-overlapping, least-loaded worker (ties by id)."""
        ranked = sorted(
            candidates, key=lambda c: (-self.overlap(need, c), c.in_flight, c.worker_id)
        )
        chosen = ranked[0]
        best = self.overlap(need, chosen)
        offers = f"`{need.capability}`" if need.capability else f"tool `{need.tool}`"
        alternatives = []
        for c in ranked[1:]:
            score = self.overlap(need, c)
            if score < best:
                reason = f"lower capability overlap ({score:.2f} vs {best:.2f})"
            elif c.in_flight > chosen.in_flight:
                reason = f"same overlap, more load ({_load(c)} vs {chosen.in_flight})"
            else:
                reason = f"same overlap and load; {chosen.worker_id} sorts first by id"
            alternatives.append(Alternative(c, score, reason))
        reasoning = f"capability policy chose {chosen.worker_id}: offers {offers}"
        if ranked[1:]:
            runner = ranked[1]
            reasoning += f"; {_load(chosen)} vs {runner.in_flight} on {runner.worker_id}"
        else:
            reasoning += "; the only eligible worker"
        return Choice(chosen, best, reasoning, tuple(alternatives))


class LoadBalancedPolicy:
    """Least calls in flight, then lowest recent latency, then worker id.

    The score is ``1 / (1 + in_flight)``: 1.0 for an idle worker, falling with load.
    """

    name: ClassVar[str] = "load_balanced"
    proto: ClassVar[common_pb2.RoutingPolicy] = common_pb2.ROUTING_POLICY_LOAD_BALANCED

    @staticmethod
    def score(candidate: Candidate) -> float:
        """Higher for less loaded workers."""
        return 1.0 / (1.0 + candidate.in_flight)

    def choose(self, need: StepNeed, candidates: Sequence[Candidate]) -> Choice:
        """The least-loaded worker (then fastest, then by id)."""
        ranked = sorted(candidates, key=lambda c: (c.in_flight, c.recent_latency_s, c.worker_id))
        chosen = ranked[0]
        alternatives = []
        for c in ranked[1:]:
            if c.in_flight > chosen.in_flight:
                reason = f"more load ({_load(c)} vs {chosen.in_flight})"
            elif c.recent_latency_s > chosen.recent_latency_s:
                reason = f"same load, slower ({_latency(c)} vs {_latency(chosen)})"
            else:
                reason = f"same load and latency; {chosen.worker_id} sorts first by id"
            alternatives.append(Alternative(c, self.score(c), reason))
        reasoning = f"load_balanced policy chose {chosen.worker_id}: {_load(chosen)}"
        if ranked[1:]:
            runner = ranked[1]
            reasoning += f" vs {runner.in_flight} on {runner.worker_id}"
            if runner.in_flight == chosen.in_flight:
                reasoning += (
                    f", recent latency {_latency(chosen)} vs {_latency(runner)}"
                    if runner.recent_latency_s != chosen.recent_latency_s
                    else ", tie broken by id"
                )
        else:
            reasoning += ", the only eligible worker"
        return Choice(chosen, self.score(chosen), reasoning, tuple(alternatives))


__all__ = [
    "Alternative",
    "Candidate",
    "CapabilityBasedPolicy",
    "Choice",
    "LoadBalancedPolicy",
    "RoundRobinPolicy",
    "RoutingPolicyImpl",
    "StepNeed",
]
