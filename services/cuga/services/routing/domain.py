"""The routing authority: validates requests, finds eligible workers, applies a policy.

:class:`PolicyBasedRoutingAuthority` is the local implementation of
:class:`cuga.shared.authorities.RoutingAuthority` (used embedded and by the servicer). It
speaks the contract's messages and raises :mod:`cuga.shared.errors` exceptions.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.protobuf import duration_pb2

from cuga.common.v1 import common_pb2
from cuga.routing.v1 import routing_pb2
from cuga.services.routing.config import POLICY_NAMES, RoutingConfig
from cuga.services.routing.policies import (
    Candidate,
    CapabilityBasedPolicy,
    Choice,
    LoadBalancedPolicy,
    RoundRobinPolicy,
    RoutingPolicyImpl,
    StepNeed,
)
from cuga.services.routing.registry import WorkerRecord, WorkerRegistry
from cuga.shared.config import Limits
from cuga.shared.errors import FailedPreconditionError, FailureMode, InvalidArgumentError
from cuga.shared.messages import timestamp
from cuga.shared.metrics import POLICY, RoutingMetrics
from cuga.shared.validation import (
    CAPABILITY_PATTERN,
    ID_PATTERN,
    TOOL_NAME_PATTERN,
    check_context,
    check_count,
    check_duration,
    check_id,
    check_map,
    check_plan_step,
    check_request_id,
    decode_page_token,
    encode_page_token,
    page_size,
)

log = logging.getLogger("cuga.routing")

MAX_TOOLS = 1024
"""Most tools one worker registers."""
MAX_CAPABILITIES = 256
"""Most capabilities one worker registers."""
MAX_LABELS = 64
"""Most labels one worker registers."""
MAX_LABEL_KEY_CHARS = 128
"""Longest label key."""
MAX_LABEL_VALUE_CHARS = 256
"""Longest label value."""
MAX_ADDRESS_CHARS = 255
"""Longest worker address."""
MAX_EXCLUDED = 256
"""Most ``exclude_worker_ids`` in one request."""
MAX_BATCH_STEPS = 256
"""Most steps in one RouteBatch."""
MAX_PAGE_SIZE = 1000
"""Largest ListWorkers page."""
MAX_IN_FLIGHT = 1_000_000
"""Largest in-flight count a heartbeat may report (anything above is a bug)."""
MAX_LATENCY_S = 86_400.0
"""Largest recent latency a heartbeat may report, seconds."""

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._\-]+)$")

_POLICY_BY_NAME: Mapping[str, common_pb2.RoutingPolicy] = {
    "round_robin": common_pb2.ROUTING_POLICY_ROUND_ROBIN,
    "capability": common_pb2.ROUTING_POLICY_CAPABILITY,
    "load_balanced": common_pb2.ROUTING_POLICY_LOAD_BALANCED,
}


def check_address(field: str, value: str) -> None:
    """Check a ``host:port`` (IPv6 hosts in brackets)."""
    if not value:
        raise InvalidArgumentError(field, "is required")
    if len(value) > MAX_ADDRESS_CHARS:
        raise InvalidArgumentError(field, f"is longer than {MAX_ADDRESS_CHARS} characters")
    host, sep, port = value.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        shown = value if len(value) <= 60 else value[:60] + "..."
        raise InvalidArgumentError(field, f"{shown!r} is not host:port (port 1 to 65535)")


def _check_names(field: str, values: Sequence[str], limit: int, pattern: re.Pattern[str]) -> None:
    check_count(field, values, limit)
    for i, value in enumerate(values):
        check_id(f"{field}[{i}]", value, pattern=pattern)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


@dataclass(frozen=True)
class _Eligibility:
    """Why workers were or were not eligible for one step."""

    eligible: list[WorkerRecord]
    registered: int
    lacking_tool: int
    lacking_capability: int
    excluded: int
    unavailable: int


class PolicyBasedRoutingAuthority:
    """Chooses a worker per step from the live registry with a pluggable policy.

    Args:
        registry: the live workers.
        config: default policy and heartbeat interval (defaults when ``None``).
        policies: policy instances by configuration name; defaults to one
            :class:`RoundRobinPolicy`, :class:`CapabilityBasedPolicy` and
            :class:`LoadBalancedPolicy`. Instances keep state (the round-robin cursor), so
            one authority keeps the same instances for its lifetime.
        metrics: decision counters (no-op when ``None``).
        limits: input limits (a step's input size and ``depends_on`` count); defaults when
            ``None``.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        config: RoutingConfig | None = None,
        policies: Mapping[str, RoutingPolicyImpl] | None = None,
        metrics: RoutingMetrics | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._registry = registry
        self._limits = limits or Limits()
        self._metrics = metrics or RoutingMetrics()
        self._policy_attrs = {proto: {POLICY: name} for name, proto in _POLICY_BY_NAME.items()}
        self._config = config or RoutingConfig()
        impls: dict[str, RoutingPolicyImpl] = dict(
            policies
            or {
                "round_robin": RoundRobinPolicy(),
                "capability": CapabilityBasedPolicy(),
                "load_balanced": LoadBalancedPolicy(),
            }
        )
        missing = [name for name in POLICY_NAMES if name not in impls]
        if missing:
            raise ValueError(f"policies missing: {', '.join(missing)}")
        self._policies: dict[int, RoutingPolicyImpl] = {
            _POLICY_BY_NAME[name]: impls[name] for name in POLICY_NAMES
        }
        self._default = _POLICY_BY_NAME[self._config.default_policy]

    @property
    def registry(self) -> WorkerRegistry:
        """The live workers."""
        return self._registry

    @property
    def heartbeat_interval_s(self) -> float:
        """Seconds between a worker's heartbeats."""
        return self._config.heartbeat_interval_s

    # -- routing -----------------------------------------------------------------------

    async def route(
        self, request: routing_pb2.RouteRequest, *, timeout: float | None = None
    ) -> common_pb2.RoutingDecision:
        """One decision for one step (``timeout`` is accepted and unused: nothing waits).

        Raises:
            InvalidArgumentError: a field is missing or malformed (named in the message).
            FailedPreconditionError: no worker is eligible (the message says why).
        """
        policy = self._policy(request.policy)
        if not request.HasField("step"):
            raise InvalidArgumentError("step", "is required")
        self._check_step("step", request.step)
        check_context("context", request.context)
        excluded = self._excluded(request.exclude_worker_ids)
        return self._decide(request.step, policy, excluded, {})

    async def route_batch(
        self, request: routing_pb2.RouteBatchRequest, *, timeout: float | None = None
    ) -> list[common_pb2.RoutingDecision]:
        """One decision per step, in order; earlier decisions count as in flight.

        ``timeout`` is accepted for the :class:`RoutingAuthority` protocol; a local
        decision never waits.
        """
        policy = self._policy(request.policy)
        check_count("steps", request.steps, MAX_BATCH_STEPS, minimum=1)
        seen: dict[str, int] = {}
        for i, step in enumerate(request.steps):
            self._check_step(f"steps[{i}]", step)
            if step.step_id in seen:
                raise InvalidArgumentError(
                    f"steps[{i}].step_id", f"duplicates steps[{seen[step.step_id]}]"
                )
            seen[step.step_id] = i
        check_context("context", request.context)
        excluded = self._excluded(request.exclude_worker_ids)
        # No await between the decisions: the batch sees one consistent registry and
        # no other caller's decision lands in the middle of it.
        added: dict[str, int] = {}
        decisions = []
        for step in request.steps:
            decision = self._decide(step, policy, excluded, added)
            added[decision.target.worker_id] = added.get(decision.target.worker_id, 0) + 1
            decisions.append(decision)
        self._metrics.decisions.add(len(decisions), self._policy_attrs[policy.proto])
        return decisions

    def _policy(self, value: int) -> RoutingPolicyImpl:
        if value == common_pb2.ROUTING_POLICY_UNSPECIFIED:
            return self._policies[self._default]
        impl = self._policies.get(value)
        if impl is None:
            valid = ", ".join(
                common_pb2.RoutingPolicy.Name(p) for p in common_pb2.RoutingPolicy.values()
            )
            raise InvalidArgumentError(
                "policy", f"{value} is not a routing policy (valid: {valid})"
            )
        return impl

    def _check_step(self, field: str, step: common_pb2.PlanStep) -> None:
        check_plan_step(
            field,
            step,
            max_input_bytes=self._limits.max_input_bytes,
            max_depends_on=self._limits.max_steps,
        )

    @staticmethod
    def _excluded(ids: Sequence[str]) -> frozenset[str]:
        check_count("exclude_worker_ids", ids, MAX_EXCLUDED)
        for i, worker_id in enumerate(ids):
            check_id(f"exclude_worker_ids[{i}]", worker_id)
        return frozenset(ids)

    def _eligibility(self, need: StepNeed, excluded: frozenset[str]) -> _Eligibility:
        now = self._registry.now()
        eligible: list[WorkerRecord] = []
        lacking_tool = lacking_capability = n_excluded = unavailable = 0
        workers = self._registry.workers()
        for w in workers:
            if need.tool not in w.tools:
                lacking_tool += 1
            elif need.capability and need.capability not in w.capabilities:
                lacking_capability += 1
            elif w.worker_id in excluded:
                n_excluded += 1
            elif not self._registry.is_available(w, now):
                unavailable += 1
            else:
                eligible.append(w)
        return _Eligibility(
            eligible, len(workers), lacking_tool, lacking_capability, n_excluded, unavailable
        )

    def _decide(
        self,
        step: common_pb2.PlanStep,
        policy: RoutingPolicyImpl,
        excluded: frozenset[str],
        added: Mapping[str, int],
    ) -> common_pb2.RoutingDecision:
        need = StepNeed(step.tool, step.capability)
        found = self._eligibility(need, excluded)
        if not found.eligible:
            self._metrics.no_worker.add(1, self._policy_attrs[policy.proto])
            raise _no_eligible_worker(step.step_id, need, found, self._registry)
        candidates = [
            Candidate(
                worker_id=w.worker_id,
                address=w.address,
                tools=w.tools,
                capabilities=w.capabilities,
                in_flight=w.in_flight + added.get(w.worker_id, 0),
                recent_latency_s=w.recent_latency_s,
            )
            for w in found.eligible
        ]
        choice = policy.choose(need, candidates)
        decision = _to_decision(step.step_id, policy, choice, self._registry.now())
        log.debug("step %s: %s", step.step_id, choice.reasoning)
        return decision

    # -- registry ----------------------------------------------------------------------

    async def register_worker(
        self, request: routing_pb2.RegisterWorkerRequest
    ) -> routing_pb2.WorkerStatus:
        """Register (or re-register) a worker; idempotent by worker id."""
        check_request_id(request.request_id)
        if not request.HasField("worker"):
            raise InvalidArgumentError("worker", "is required")
        info = request.worker
        check_id("worker.worker_id", info.worker_id)
        check_address("worker.address", info.address)
        _check_names("worker.tools", info.tools, MAX_TOOLS, TOOL_NAME_PATTERN)
        _check_names("worker.capabilities", info.capabilities, MAX_CAPABILITIES, CAPABILITY_PATTERN)
        check_map(
            "worker.labels",
            info.labels,
            max_entries=MAX_LABELS,
            max_key_chars=MAX_LABEL_KEY_CHARS,
            max_value_chars=MAX_LABEL_VALUE_CHARS,
        )
        record = await self._registry.register(
            info.worker_id, info.address, info.tools, info.capabilities, dict(info.labels)
        )
        return self.status(record)

    async def heartbeat(self, request: routing_pb2.HeartbeatRequest) -> routing_pb2.WorkerStatus:
        """Record a worker's load; NOT_FOUND when it must register again."""
        check_id("worker_id", request.worker_id)
        if request.in_flight > MAX_IN_FLIGHT:
            raise InvalidArgumentError(
                "in_flight", f"is {request.in_flight}, the limit is {MAX_IN_FLIGHT}"
            )
        latency = check_duration("recent_latency", request.recent_latency, MAX_LATENCY_S)
        record = self._registry.heartbeat(request.worker_id, request.in_flight, latency)
        return self.status(record)

    async def deregister_worker(self, request: routing_pb2.DeregisterWorkerRequest) -> bool:
        """Remove a worker; ``False`` when it was not registered (not an error)."""
        check_request_id(request.request_id)
        check_id("worker_id", request.worker_id)
        return await self._registry.deregister(request.worker_id)

    async def list_workers(
        self, request: routing_pb2.ListWorkersRequest
    ) -> tuple[list[routing_pb2.WorkerStatus], str]:
        """One page of workers ordered by id, and the next page token ("" on the last)."""
        size = page_size("page_size", request.page_size, MAX_PAGE_SIZE)
        after = decode_page_token("page_token", request.page_token)
        # A well-formed token must still name a worker id, or it was not issued here.
        if request.page_token and not ID_PATTERN.fullmatch(after):
            raise InvalidArgumentError("page_token", "is not a token this service issued")
        check_id("tool", request.tool, required=False, pattern=TOOL_NAME_PATTERN)
        records, more = self._registry.page(after=after, limit=size, tool=request.tool)
        token = encode_page_token(records[-1].worker_id) if more and records else ""
        return [self.status(r) for r in records], token

    def status(self, record: WorkerRecord) -> routing_pb2.WorkerStatus:
        """The contract's view of a registered worker."""
        return routing_pb2.WorkerStatus(
            info=routing_pb2.WorkerInfo(
                worker_id=record.worker_id,
                address=record.address,
                tools=sorted(record.tools),
                capabilities=sorted(record.capabilities),
                labels=dict(record.labels),
            ),
            available=self._registry.is_available(record),
            in_flight=record.in_flight,
            recent_latency=_duration(record.recent_latency_s),
            last_seen=timestamp(record.last_seen),
            registered_at=timestamp(record.registered_at),
        )

    def heartbeat_interval(self) -> duration_pb2.Duration:
        """The heartbeat interval workers are told to keep."""
        return _duration(self._config.heartbeat_interval_s)


def _no_eligible_worker(
    step_id: str, need: StepNeed, found: _Eligibility, registry: WorkerRegistry
) -> FailedPreconditionError:
    head = f"no eligible worker for step {step_id!r} ({need.describe()})"
    if found.registered == 0:
        why = "no workers are registered"
    else:
        parts = []
        if found.lacking_tool:
            parts.append(f"{found.lacking_tool} do not offer tool `{need.tool}`")
        if found.lacking_capability:
            parts.append(f"{found.lacking_capability} lack capability `{need.capability}`")
        if found.excluded:
            parts.append(f"{found.excluded} excluded by the request")
        if found.unavailable:
            parts.append(
                f"{found.unavailable} unavailable (no heartbeat for more than "
                f"{registry.heartbeat_timeout_s:g} s)"
            )
        why = f"{found.registered} registered: " + ", ".join(parts)
        if found.lacking_tool + found.lacking_capability == found.registered:
            why = "none offers it; " + why
    # Nobody offers the tool: the plan is wrong (USER, never retried). Workers that offer it
    # exist but are away, or none is registered yet (a restart, a rolling upgrade): the
    # condition passes, so it is SYSTEM and the coordinator's retry policy applies.
    permanent = 0 < found.registered == found.lacking_tool + found.lacking_capability
    return FailedPreconditionError(
        f"{head}: {why}",
        reason="NO_ELIGIBLE_WORKER",
        failure_mode=FailureMode.USER if permanent else FailureMode.SYSTEM,
        metadata={
            "tool": need.tool,
            "capability": need.capability,
            "registered": str(found.registered),
            "lacking_tool": str(found.lacking_tool),
            "lacking_capability": str(found.lacking_capability),
            "excluded": str(found.excluded),
            "unavailable": str(found.unavailable),
        },
    )


def _to_decision(
    step_id: str, policy: RoutingPolicyImpl, choice: Choice, now: float
) -> common_pb2.RoutingDecision:
    return common_pb2.RoutingDecision(
        decision_id=uuid.uuid4().hex,
        step_id=step_id,
        target=common_pb2.WorkerTarget(
            worker_id=choice.chosen.worker_id, address=choice.chosen.address
        ),
        policy=policy.proto,
        reasoning=choice.reasoning,
        alternatives=[
            common_pb2.RoutingAlternative(
                target=common_pb2.WorkerTarget(
                    worker_id=a.candidate.worker_id, address=a.candidate.address
                ),
                score=a.score,
                reason=a.reason,
            )
            for a in choice.alternatives
        ],
        score=choice.score,
        decided_at=timestamp(now),
    )


__all__ = ["PolicyBasedRoutingAuthority", "check_address"]
