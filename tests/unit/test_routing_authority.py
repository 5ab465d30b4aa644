"""PolicyBasedRoutingAuthority: eligibility, decisions, batches, defaults, config."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.config import RoutingConfig
from cuga.services.routing.domain import PolicyBasedRoutingAuthority
from cuga.services.routing.registry import WorkerRegistry
from cuga.shared.authorities import RoutingAuthority
from cuga.shared.clock import FakeClock
from cuga.shared.config import ConfigError
from cuga.shared.errors import FailedPreconditionError, InvalidArgumentError

RR = common_pb2.ROUTING_POLICY_ROUND_ROBIN
CAP = common_pb2.ROUTING_POLICY_CAPABILITY
LB = common_pb2.ROUTING_POLICY_LOAD_BALANCED


def _step(step_id: str = "s1", tool: str = "search", capability: str = "") -> common_pb2.PlanStep:
    return common_pb2.PlanStep(step_id=step_id, tool=tool, capability=capability)


def _route(policy: int = 0, exclude: tuple[str, ...] = (), **step: str) -> routing_pb2.RouteRequest:
    return routing_pb2.RouteRequest(
        step=_step(**step),
        policy=policy,
        exclude_worker_ids=list(exclude),  # type: ignore[arg-type]
    )


async def _authority(
    clock: FakeClock | None = None, **config: object
) -> tuple[PolicyBasedRoutingAuthority, FakeClock]:
    clock = clock or FakeClock()
    cfg = RoutingConfig(**config)  # type: ignore[arg-type]
    registry = WorkerRegistry(clock, heartbeat_timeout_s=cfg.liveness_timeout_s)
    return PolicyBasedRoutingAuthority(registry, config=cfg), clock


async def _add(
    authority: PolicyBasedRoutingAuthority,
    worker_id: str,
    tools: tuple[str, ...] = ("search",),
    caps: tuple[str, ...] = (),
    in_flight: int = 0,
) -> None:
    await authority.registry.register(worker_id, f"{worker_id}.local:50056", tools, caps)
    authority.registry.heartbeat(worker_id, in_flight, 0.0)


async def test_satisfies_the_routing_authority_protocol() -> None:
    authority, _ = await _authority()
    assert isinstance(authority, RoutingAuthority)


async def test_decision_carries_target_policy_reasoning_and_alternatives() -> None:
    authority, clock = await _authority()
    await _add(authority, "w1", caps=("payments",), in_flight=5)
    await _add(authority, "w2", caps=("payments",), in_flight=3)
    await _add(authority, "w3")  # lacks the capability: not an alternative
    decision = await authority.route(_route(CAP, capability="payments"))
    assert decision.step_id == "s1"
    assert len(decision.decision_id) == 32 and int(decision.decision_id, 16) >= 0
    assert decision.target == common_pb2.WorkerTarget(worker_id="w2", address="w2.local:50056")
    assert decision.policy == CAP
    assert (
        decision.reasoning
        == "capability policy chose w2: offers `payments`; 3 in flight vs 5 on w1"
    )
    assert [(a.target.worker_id, a.score) for a in decision.alternatives] == [("w1", 1.0)]
    assert "more load" in decision.alternatives[0].reason
    assert decision.score == 1.0
    assert decision.decided_at.seconds == int(clock.now())


async def test_unspecified_policy_uses_the_configured_default() -> None:
    authority, _ = await _authority(default_policy="load_balanced")
    await _add(authority, "w1", in_flight=2)
    await _add(authority, "w2", in_flight=1)
    decision = await authority.route(_route())
    assert decision.policy == LB
    assert decision.target.worker_id == "w2"


async def test_unknown_policy_number_is_invalid_argument_listing_valid_ones() -> None:
    authority, _ = await _authority()
    await _add(authority, "w1")
    with pytest.raises(InvalidArgumentError) as info:
        await authority.route(_route(policy=9))
    assert info.value.field == "policy"
    assert "ROUTING_POLICY_LOAD_BALANCED" in info.value.message


def test_config_rejects_unknown_default_policy_and_bad_timing() -> None:
    with pytest.raises(ConfigError, match="round_robin, capability, load_balanced"):
        RoutingConfig(default_policy="random")
    with pytest.raises(ConfigError, match="heartbeat_interval_s"):
        RoutingConfig(heartbeat_interval_s=0)
    with pytest.raises(ConfigError, match="heartbeat_timeout_s"):
        RoutingConfig(heartbeat_interval_s=2, heartbeat_timeout_s=1)
    with pytest.raises(ConfigError, match="max_workers"):
        RoutingConfig(max_workers=0)
    assert RoutingConfig().liveness_timeout_s == 6.0
    assert RoutingConfig(heartbeat_interval_s=5).liveness_timeout_s == 15.0


async def test_no_worker_registered() -> None:
    authority, _ = await _authority()
    with pytest.raises(FailedPreconditionError) as info:
        await authority.route(_route())
    assert info.value.reason == "NO_ELIGIBLE_WORKER"
    assert "tool `search`" in info.value.message
    assert "no workers are registered" in info.value.message


async def test_none_offers_the_tool_or_capability() -> None:
    authority, _ = await _authority()
    await _add(authority, "w1", tools=("fetch",))
    await _add(authority, "w2", caps=("fx",))
    with pytest.raises(FailedPreconditionError) as info:
        await authority.route(_route(capability="payments"))
    message = info.value.message
    assert "tool `search` with capability `payments`" in message
    assert "none offers it" in message
    assert "1 do not offer tool `search`" in message
    assert "1 lack capability `payments`" in message
    assert info.value.metadata["lacking_tool"] == "1"


async def test_unavailable_and_excluded_workers_are_counted() -> None:
    authority, clock = await _authority()
    await _add(authority, "w1")
    clock.advance(10)
    await _add(authority, "w2")
    with pytest.raises(FailedPreconditionError) as info:
        await authority.route(_route(exclude=("w2",)))
    assert "1 excluded by the request" in info.value.message
    assert "1 unavailable (no heartbeat for more than 6 s)" in info.value.message
    assert "none offers it" not in info.value.message


async def test_unavailable_worker_is_skipped_then_routed_again_after_heartbeat() -> None:
    authority, clock = await _authority()
    await _add(authority, "w1")
    await _add(authority, "w2")
    clock.advance(7)
    authority.registry.heartbeat("w2", 0, 0.0)
    for _ in range(3):
        assert (await authority.route(_route(RR))).target.worker_id == "w2"
    authority.registry.heartbeat("w1", 0, 0.0)
    picks = {(await authority.route(_route(RR))).target.worker_id for _ in range(2)}
    assert picks == {"w1", "w2"}


async def test_route_batch_counts_earlier_decisions_as_in_flight() -> None:
    authority, _ = await _authority()
    await _add(authority, "w1", in_flight=2)
    await _add(authority, "w2", in_flight=0)
    await _add(authority, "w3", in_flight=1)
    request = routing_pb2.RouteBatchRequest(steps=[_step(f"s{i}") for i in range(6)], policy=LB)
    decisions = await authority.route_batch(request)
    assert [d.step_id for d in decisions] == [f"s{i}" for i in range(6)]
    # Loads 2/0/1 -> the batch fills the least loaded first, ending level at 3 each.
    assert [d.target.worker_id for d in decisions] == ["w2", "w2", "w3", "w1", "w2", "w3"]
    assert Counter(d.target.worker_id for d in decisions) == {"w2": 3, "w3": 2, "w1": 1}
    assert len({d.decision_id for d in decisions}) == 6
    # The batch's load does not leak into later calls (the workers report their own).
    assert (await authority.route(_route(LB))).target.worker_id == "w2"


async def test_route_batch_fails_whole_when_one_step_has_no_worker() -> None:
    authority, _ = await _authority()
    await _add(authority, "w1")
    request = routing_pb2.RouteBatchRequest(steps=[_step("a"), _step("b", tool="fetch")])
    with pytest.raises(FailedPreconditionError, match="step 'b'"):
        await authority.route_batch(request)


async def test_round_robin_is_fair_across_concurrent_callers() -> None:
    authority, _ = await _authority()
    for i in range(3):
        await _add(authority, f"w{i}")
    decisions = await asyncio.gather(*(authority.route(_route(RR)) for _ in range(30)))
    batches = await asyncio.gather(
        *(
            authority.route_batch(
                routing_pb2.RouteBatchRequest(steps=[_step("a"), _step("b"), _step("c")], policy=RR)
            )
            for _ in range(10)
        )
    )
    counts = Counter(d.target.worker_id for d in decisions)
    assert counts == {"w0": 10, "w1": 10, "w2": 10}
    batch_counts = Counter(d.target.worker_id for batch in batches for d in batch)
    assert batch_counts == {"w0": 10, "w1": 10, "w2": 10}


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (routing_pb2.RouteRequest(), "step"),
        (routing_pb2.RouteRequest(step=common_pb2.PlanStep(tool="search")), "step.step_id"),
        (routing_pb2.RouteRequest(step=common_pb2.PlanStep(step_id="s1")), "step.tool"),
        (routing_pb2.RouteRequest(step=_step(tool="bad tool")), "step.tool"),
        (routing_pb2.RouteRequest(step=_step(capability="a b")), "step.capability"),
        (
            routing_pb2.RouteRequest(step=_step(), exclude_worker_ids=["bad id"]),
            "exclude_worker_ids[0]",
        ),
        (
            routing_pb2.RouteRequest(step=_step(), exclude_worker_ids=["w"] * 257),
            "exclude_worker_ids",
        ),
    ],
)
async def test_route_validation(request_: routing_pb2.RouteRequest, field: str) -> None:
    authority, _ = await _authority()
    with pytest.raises(InvalidArgumentError) as info:
        await authority.route(request_)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (routing_pb2.RouteBatchRequest(), "steps"),
        (routing_pb2.RouteBatchRequest(steps=[_step(f"s{i}") for i in range(257)]), "steps"),
        (routing_pb2.RouteBatchRequest(steps=[_step(), _step(tool="")]), "steps[1].tool"),
        (routing_pb2.RouteBatchRequest(steps=[_step("a"), _step("a")]), "steps[1].step_id"),
        (routing_pb2.RouteBatchRequest(steps=[_step()], policy=4), "policy"),  # type: ignore[arg-type]
    ],
)
async def test_route_batch_validation(request_: routing_pb2.RouteBatchRequest, field: str) -> None:
    authority, _ = await _authority()
    await _add(authority, "w1")
    with pytest.raises(InvalidArgumentError) as info:
        await authority.route_batch(request_)
    assert info.value.field == field
