"""The CUGA roadmap's shapes on the public API (issue 23; docs/migrating-from-cuga.md).

Code written against the roadmap — ``create_coordinator(planner, workers, memory, ...)``,
``ToolBudget(ceiling=100, policy="warn")``, ``ApprovalPolicy(callable)``,
``audit_trail.get_decisions(trace_id)`` — runs on this engine through the names here:
thin adapters over the authorities, no second implementation of any of them.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import json_format

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._engine import CoordinatorAgent
from cuga.orchestrator._errors import ErrorAction
from cuga.orchestrator._policy import ExponentialBackoffPolicy
from cuga.orchestrator._protocol import ErrorPropagation
from cuga.shared.auth import Identity
from cuga.shared.authorities import AuditTrail
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.errors import FailedPreconditionError, FailureMode
from cuga.shared.messages import timestamp
from cuga.tools import ToolSpec
from cuga.worker.v1 import worker_pb2

if TYPE_CHECKING:
    from cuga.services.approval.policy import ApprovalPolicy as RulePolicy
    from cuga.services.approval.policy import PolicyDecision
    from cuga.services.planning.memory import Embedder, MemoryHit
    from cuga.services.planning.memory import VectorMemory as StoredMemory
    from cuga.services.routing.registry import WorkerRegistry
    from cuga.services.worker.domain import WorkerAgent

# --------------------------------------------------------------------------- strings

_BUDGET_POLICIES = {
    "warn": common_pb2.BUDGET_POLICY_WARN,
    "block": common_pb2.BUDGET_POLICY_BLOCK,
    "unspecified": common_pb2.BUDGET_POLICY_UNSPECIFIED,
}
_STRATEGIES = {
    "fail_fast": ErrorPropagation.FAIL_FAST,
    "retry": ErrorPropagation.RETRY,
    "continue": ErrorPropagation.CONTINUE,
    "unspecified": ErrorPropagation.UNSPECIFIED,
}


def _name(value: str, prefix: str) -> str:
    return value.strip().lower().removeprefix(prefix.lower()).replace("-", "_")


def budget_policy(value: str | int) -> int:
    """``"warn"``, ``"block"``, ``"BUDGET_POLICY_WARN"`` or the enum value, as the enum value.

    Raises:
        ValueError: anything else, listing the valid names.
    """
    if isinstance(value, str):
        key = _name(value, "BUDGET_POLICY_")
        if key not in _BUDGET_POLICIES:
            raise ValueError(f"budget policy must be one of warn, block; got {value!r}")
        return _BUDGET_POLICIES[key]
    if value not in common_pb2.BudgetPolicy.values():
        raise ValueError(f"{value!r} is not a BudgetPolicy")
    return int(value)


def error_strategy(value: str | int) -> int:
    """``"fail_fast"``, ``"retry"``, ``"continue"`` (any case, ``ERROR_PROPAGATION_``
    prefix allowed) or an ``ErrorPropagation`` value, as the enum value.

    Raises:
        ValueError: anything else, listing the valid names.
    """
    if isinstance(value, str):
        key = _name(value, "ERROR_PROPAGATION_")
        if key not in _STRATEGIES:
            raise ValueError(
                f"error strategy must be one of fail_fast, retry, continue; got {value!r}"
            )
        return int(_STRATEGIES[key])
    if value not in common_pb2.ErrorPropagation.values():
        raise ValueError(f"{value!r} is not an ErrorPropagation")
    return int(value)


class _MessageAlias(type):
    """Makes a factory class stand for a message class: ``isinstance`` and class
    attributes (``FromString``, ``DESCRIPTOR`` ...) answer as the message's."""

    _message: type

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, cls._message)

    def __getattr__(cls, name: str) -> Any:
        return getattr(cls._message, name)


class ToolBudget(metaclass=_MessageAlias):
    """``cuga.common.v1.ToolBudget``, built with the roadmap's strings.

    ``ToolBudget(ceiling=100, policy="warn")`` returns the message (policy WARN);
    ``isinstance(b, ToolBudget)`` and ``ToolBudget.FromString`` work as on the message.

    Args:
        ceiling: most cost units the run may spend (0: unlimited).
        policy: ``"warn"`` | ``"block"`` or a ``BudgetPolicy`` value.
        max_calls: most tool calls (0: unlimited).
        warn_fraction: share of the ceiling at which a warning is emitted.
        spent: output only; what was spent.
    """

    _message = common_pb2.ToolBudget

    def __new__(  # type: ignore[misc]
        cls,
        ceiling: float = 0.0,
        policy: str | int = common_pb2.BUDGET_POLICY_UNSPECIFIED,
        *,
        max_calls: int = 0,
        warn_fraction: float = 0.0,
        spent: float = 0.0,
    ) -> common_pb2.ToolBudget:
        return common_pb2.ToolBudget(
            ceiling=ceiling,
            policy=budget_policy(policy),  # type: ignore[arg-type]
            max_calls=max_calls,
            warn_fraction=warn_fraction,
            spent=spent,
        )


def as_budget(value: common_pb2.ToolBudget | Mapping[str, Any] | float | None) -> Any:
    """A ``ToolBudget`` message from a message, a mapping of its fields, or a ceiling."""
    if value is None or isinstance(value, common_pb2.ToolBudget):
        return value
    if isinstance(value, Mapping):
        return ToolBudget(**value)
    if isinstance(value, int | float):
        return ToolBudget(ceiling=float(value))
    raise TypeError(
        f"budget must be a ToolBudget, a mapping or a number, not {type(value).__name__}"
    )


# --------------------------------------------------------------------------- approvals


class ApprovalStatus(enum.IntEnum):
    """Where an approval stands (values match ``cuga.common.v1.ApprovalStatus``):
    ``ApprovalStatus(event.approval.status) is ApprovalStatus.PENDING`` is a step waiting
    for a reviewer."""

    UNSPECIFIED = 0
    """No approval information (an event without an approval)."""
    NOT_REQUIRED = 1
    """The policy let the step run without a reviewer."""
    PENDING = 2
    """Waiting for a reviewer's decision."""
    APPROVED = 3
    """A reviewer approved; the step runs."""
    DENIED = 4
    """A reviewer denied; the step fails with POLICY (a resume asks again)."""
    EXPIRED = 5
    """Nobody decided before the request's timeout; the step fails with POLICY."""
    WITHDRAWN = 6
    """The run was cancelled while the request was pending."""


@dataclass(frozen=True)
class ApprovalCheck:
    """What an approval callable is asked about one step.

    Attributes:
        tool: the tool the step calls.
        input: the step's input (references resolved).
        profile: the run's profile.
        sensitive: whether the tool is declared sensitive.
        context: the run's context as a mapping (``user_id``, ``metadata`` ...).
    """

    tool: str
    input: Mapping[str, Any]
    profile: str
    sensitive: bool
    context: Mapping[str, Any]


def ApprovalPolicy(
    check: Callable[[ApprovalCheck], bool] | None = None,
    *,
    timeout_s: float = 3600.0,
    file: str | None = None,
) -> RulePolicy:
    """The approval authority's policy: a Python callable (embedded), a policy file, or
    the default (every sensitive tool needs one approval).

    ``ApprovalPolicy(lambda step: step.tool == "transfer_funds" and step.input["amount"] > 1000)``
    holds every matching step for a reviewer for at most ``timeout_s``. The callable runs
    in the coordinator's process, so it exists embedded only; over gRPC the approval
    service's rules file is the policy (docs/approval.md).
    """
    from cuga.services.approval.policy import ApprovalPolicy as Rules
    from cuga.services.approval.policy import load_policy

    if check is not None and file is not None:
        raise ValueError("give a callable or a policy file, not both")
    if file is not None:
        from pathlib import Path

        return load_policy(Path(file), default_timeout_s=timeout_s)
    if check is None:
        return Rules.default(timeout_s)
    if not callable(check):
        raise TypeError(f"ApprovalPolicy takes a callable, not {type(check).__name__}")
    return _callable_policy(check, timeout_s)


def _callable_policy(check: Callable[[ApprovalCheck], bool], timeout_s: float) -> RulePolicy:
    from cuga.services.approval.policy import ApprovalPolicy as Rules
    from cuga.services.approval.policy import PolicyDecision, Rule

    name = getattr(check, "__name__", "python")
    rule = Rule(f"python:{name}"[:64], timeout_s=timeout_s)

    @dataclass(frozen=True)
    class CallablePolicy(Rules):
        """A policy whose one rule is a Python callable."""

        def decide(
            self,
            *,
            tool: str,
            profile: str,
            sensitive: bool,
            input: Mapping[str, Any],
            context: Mapping[str, Any],
        ) -> PolicyDecision:
            try:
                required = bool(check(ApprovalCheck(tool, input, profile, sensitive, context)))
            except Exception as exc:
                # Fail closed and say whose code failed: the step is not run unreviewed.
                raise FailedPreconditionError(
                    f"approval policy {name} raised {type(exc).__name__}: {exc}",
                    reason="APPROVAL_POLICY_FAILED",
                    failure_mode=FailureMode.POLICY,
                ) from exc
            return PolicyDecision(required, rule if required else None)

    return CallablePolicy((rule,), source=f"python callable {name}")


# --------------------------------------------------------------------------- audit


class _AuditReader(Protocol):
    async def query(
        self, flt: audit_pb2.RecordFilter, size: int = 0, token: str = ""
    ) -> tuple[list[audit_pb2.AuditRecord], str]: ...


#: The kinds of record that are decisions: a plan, a route, an approval's answer.
DECISION_KINDS = ("plan", "routing_decision", "approval_decided")


class AuditTrailView:
    """The roadmap's audit trail: ``record_plan``, ``record_decision``, ``get_decisions``.

    Writes go through the coordinator's audit trail (local, or the AuditService as the
    coordinator identity); reads through ``reader``: the local audit log, or an
    :class:`~cuga.client.AuditClient` holding an auditor's credentials (the coordinator
    identity may write the trail, not read it).

    Args:
        writer: where records are written.
        reader: where they are read (``None``: reads raise ``PermissionError`` naming what
            to pass).
        actor: who the records say wrote them.
        clock: time source of the records' timestamps (the coordinator's).
    """

    def __init__(
        self,
        writer: AuditTrail,
        reader: Any | None = None,
        *,
        actor: str = "coordinator",
        clock: Clock | None = None,
    ) -> None:
        self._writer = writer
        self._reader = reader
        self._actor = actor
        self._clock = clock or SystemClock()

    def with_reader(self, reader: Any) -> AuditTrailView:
        """The same trail read through ``reader`` (an AuditClient with an auditor's token)."""
        return AuditTrailView(self._writer, reader, actor=self._actor, clock=self._clock)

    async def _write(
        self,
        kind: str,
        context: common_pb2.ExecutionContext,
        payload: dict[str, Any],
    ) -> audit_pb2.AuditRecord:
        record = audit_pb2.AuditRecord(
            record_id=f"py-{uuid.uuid4().hex}",
            trace_id=context.trace_id or uuid.uuid4().hex,
            run_id=context.run_id,
            profile=context.profile,
            kind=kind,
            actor=self._actor,
            timestamp=timestamp(self._clock.now()),
        )
        record.payload.update(payload)
        await self._writer.record_batch([record])
        await self._writer.flush()
        return record

    async def record_plan(
        self, plan: common_pb2.Plan, context: common_pb2.ExecutionContext
    ) -> audit_pb2.AuditRecord:
        """Record a plan (kind ``plan``) under the context's trace."""
        return await self._write("plan", context, {"plan": _dict(plan)})

    async def record_decision(
        self, decision: common_pb2.RoutingDecision, context: common_pb2.ExecutionContext
    ) -> audit_pb2.AuditRecord:
        """Record a routing decision (kind ``routing_decision``) under the context's trace."""
        return await self._write("routing_decision", context, {"decision": _dict(decision)})

    async def get_decisions(
        self, trace_id: str, *, kinds: Sequence[str] = DECISION_KINDS
    ) -> list[audit_pb2.AuditRecord]:
        """Every decision record of a trace, in order (plans, routes, approval answers)."""
        if self._reader is None:
            raise PermissionError(
                "reading the audit trail needs an auditor: pass an AuditClient with an"
                " auditor's token to with_reader()"
            )
        flt = audit_pb2.RecordFilter(trace_id=trace_id, kinds=list(kinds))
        out: list[audit_pb2.AuditRecord] = []
        token = ""
        while True:
            records, token = await _query(self._reader, flt, token)
            out.extend(records)
            if not token:
                return out


async def _query(
    reader: Any, flt: audit_pb2.RecordFilter, token: str
) -> tuple[list[audit_pb2.AuditRecord], str]:
    from cuga.client import AuditClient

    if isinstance(reader, AuditClient):
        response = await reader.query(
            audit_pb2.QueryRequest(filter=flt, page_size=1000, page_token=token)
        )
        return list(response.records), response.next_page_token
    records, nxt = await reader.query(flt, 1000, token)
    return list(records), nxt


def _dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return out


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class EmbeddedWorker:
    """One in-process worker: an id, the tools it runs, and what it advertises.

    Attributes:
        id: the worker id (routing decisions name it), ``[A-Za-z0-9._:-]``, 1 to 128.
        tools: installed tool names or ``ToolSpec`` objects (empty: every installed tool).
        capabilities: advertised on top of its tools' own.
    """

    id: str
    tools: Sequence[str | ToolSpec] = ()
    capabilities: Sequence[str] = ()

    @classmethod
    def of(cls, value: EmbeddedWorker | Mapping[str, Any]) -> EmbeddedWorker:
        """An EmbeddedWorker from itself or a mapping (``id``/``worker_id``, ``tools``,
        ``capabilities``)."""
        if isinstance(value, EmbeddedWorker):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"a worker is an EmbeddedWorker or a mapping, not {type(value).__name__}"
            )
        data = dict(value)
        worker_id = data.pop("id", None) or data.pop("worker_id", None)
        if not worker_id:
            raise ValueError("a worker needs an id")
        unknown = set(data) - {"tools", "capabilities"}
        if unknown:
            raise ValueError(f"worker {worker_id!r}: unknown keys {', '.join(sorted(unknown))}")
        return cls(
            str(worker_id), tuple(data.get("tools", ())), tuple(data.get("capabilities", ()))
        )


@dataclass
class _Load:
    in_flight: int = 0
    latency_s: float = 0.0


class EmbeddedWorkerPool:
    """Several in-process workers, each step run on the one routing chose.

    Reports each worker's in-flight count and recent latency to the local routing
    registry as it changes (what heartbeats carry between processes), so the
    ``load_balanced`` policy sees real load embedded.
    """

    def __init__(
        self,
        agents: Mapping[str, WorkerAgent],
        registry: WorkerRegistry | None = None,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._agents = dict(agents)
        self._registry = registry
        self._clock = clock or SystemClock()
        self._load = {worker_id: _Load() for worker_id in agents}

    def attach(self, registry: WorkerRegistry) -> None:
        """Report load to ``registry`` (the local routing authority's) from now on."""
        self._registry = registry

    @property
    def agents(self) -> Mapping[str, WorkerAgent]:
        """The workers, by id."""
        return self._agents

    def _agent(self, target: common_pb2.WorkerTarget) -> WorkerAgent:
        agent = self._agents.get(target.worker_id)
        if agent is None:
            from cuga.shared.errors import UnavailableError

            raise UnavailableError(f"no embedded worker {target.worker_id!r}")
        return agent

    def _report(self, worker_id: str) -> None:
        if self._registry is not None:
            load = self._load[worker_id]
            self._registry.heartbeat(worker_id, load.in_flight, load.latency_s)

    async def execute_step(
        self,
        target: common_pb2.WorkerTarget,
        request: worker_pb2.ExecuteStepRequest,
        *,
        timeout: float | None = None,
    ) -> common_pb2.StepResult:
        """Run one step on the worker ``target`` names."""
        agent = self._agent(target)
        load = self._load[target.worker_id]
        load.in_flight += 1
        self._report(target.worker_id)
        started = self._clock.monotonic()
        try:
            return await agent.execute(request, timeout=timeout)
        finally:
            load.in_flight -= 1
            elapsed = self._clock.monotonic() - started
            load.latency_s = (
                elapsed if load.latency_s == 0 else 0.8 * load.latency_s + 0.2 * elapsed
            )
            self._report(target.worker_id)

    async def list_tools(
        self, target: common_pb2.WorkerTarget, *, timeout: float | None = None
    ) -> list[common_pb2.ToolSpec]:
        """The tools of the worker ``target`` names."""
        return self._agent(target).list_tools()

    async def close(self) -> None:
        """Close every worker."""
        await asyncio.gather(*(agent.close() for agent in self._agents.values()))


# --------------------------------------------------------------------------- memory


class VectorMemory:
    """Vector memory of completed goals for memory-augmented planning, per profile.

    Give it to ``create_coordinator(memory=...)`` to choose the embedder (anything with
    ``name``, ``dims`` and ``embed(texts) -> float32 array``; default the offline
    feature-hashing one) and the cap per profile. Once the coordinator is built it is
    bound to planning's store (``planning.db``, the same transaction as the plan state),
    and :meth:`add`/:meth:`search` work on it. Every method takes exactly one profile:
    another profile's records are never seen.

    Args:
        embedder: turns texts into vectors (default ``HashingEmbedder``).
        max_records_per_profile: oldest records are evicted past it.
        similarity_threshold: cosine similarity a past goal needs to be reused (default:
            ``planning.memory_similarity_threshold``).
    """

    def __init__(
        self,
        embedder: Embedder | None = None,
        *,
        max_records_per_profile: int = 5000,
        similarity_threshold: float | None = None,
    ) -> None:
        if not 1 <= max_records_per_profile <= 100_000:
            raise ValueError("max_records_per_profile must be between 1 and 100000")
        if similarity_threshold is not None and not 0 < similarity_threshold <= 1:
            raise ValueError("similarity_threshold must be in (0, 1]")
        self.embedder = embedder
        self.max_records_per_profile = max_records_per_profile
        self.similarity_threshold = similarity_threshold
        self._bound: StoredMemory | None = None

    def bind(self, stored: StoredMemory) -> None:
        """Attach to planning's store (``create_coordinator`` does it)."""
        if self._bound is not None and self._bound is not stored:
            raise ValueError("this VectorMemory already serves another coordinator")
        self._bound = stored

    def _store(self) -> StoredMemory:
        if self._bound is None:
            raise RuntimeError("pass this VectorMemory to create_coordinator(memory=...) first")
        return self._bound

    def add(self, profile: str, text: str, payload: Mapping[str, Any]) -> str:
        """Remember ``text`` with ``payload`` for ``profile``; returns the record id."""
        return str(self._store().add(profile, text, dict(payload)))

    def search(
        self, profile: str, text: str, *, limit: int = 5, min_score: float = 0.0
    ) -> list[MemoryHit]:
        """The profile's records most similar to ``text``, best first."""
        return list(self._store().search(profile, text, limit=limit, min_score=min_score))

    def count(self, profile: str) -> int:
        """How many records the profile has."""
        return int(self._store().count(profile))


# --------------------------------------------------------------------------- the agent


class EmbeddedCoordinator(CoordinatorAgent):
    """The :class:`CoordinatorAgent` ``create_coordinator`` returns, with the roadmap's
    conveniences: strings for strategies and budgets, approvals decided from Python by a
    named reviewer, the audit trail's ``record_plan``/``record_decision``/
    ``get_decisions`` (:attr:`audit_trail`), and the embedded memory."""

    audit_view: AuditTrailView | None = None
    """What :attr:`audit_trail` answers with (``create_coordinator`` sets its reader)."""
    vector_memory: VectorMemory | None = None
    """The ``memory`` given to ``create_coordinator``, bound to planning's store."""

    def orchestrate(
        self,
        goal: str,
        context: common_pb2.ExecutionContext | None = None,
        *,
        error_strategy: str | int = common_pb2.ERROR_PROPAGATION_FAIL_FAST,
        plan: Sequence[common_pb2.PlanStep] | common_pb2.Plan | None = None,
        budget: common_pb2.ToolBudget | Mapping[str, Any] | float | None = None,
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Run ``goal``; ``error_strategy`` may be ``"fail_fast"``, ``"retry"``,
        ``"continue"``, and ``budget`` a mapping or a bare ceiling."""
        return super().orchestrate(
            goal,
            context,
            error_strategy=_strategy(error_strategy),
            plan=plan,
            budget=as_budget(budget),
        )

    def resume(
        self,
        target: str | common_pb2.PartialResult,
        *,
        error_strategy: str | int = common_pb2.ERROR_PROPAGATION_UNSPECIFIED,
        retry_policy: common_pb2.RetryPolicy | ExponentialBackoffPolicy | None = None,
    ) -> AsyncIterator[common_pb2.OrchestrationEvent]:
        """Continue a failed or interrupted run (strategy as in :meth:`orchestrate`;
        ``retry_policy`` the message or a :class:`RetryPolicy`)."""
        return super().resume(
            target,
            error_strategy=_strategy(error_strategy),
            retry_policy=retry_policy_message(retry_policy),
        )

    def handle_error(
        self,
        error: BaseException,
        strategy: str | int,
        *,
        attempt: int = 1,
        max_attempts: int = 1,
    ) -> ErrorAction:
        """What a failed attempt leads to; ``strategy`` may be ``"retry"`` and the like."""
        return super().handle_error(
            error, error_strategy(strategy), attempt=attempt, max_attempts=max_attempts
        )

    async def wait_run(self, run_id: str) -> coordinator_pb2.Run:
        """The run's record once its last bookkeeping is done: after its terminal event
        the plan's final state is still being recorded (and a completed goal
        remembered for memory-augmented planning)."""
        live = self._live.get(run_id)
        if live is not None:
            await asyncio.shield(live.finished.wait())
        return await self.get_run(run_id)

    async def close(self) -> None:
        """Stop, first letting runs past their terminal event record their plan's final
        state (at most the planning call's timeout), so a completed goal is remembered."""
        ended = [
            r.finished.wait()
            for r in list(self._live.values())
            if r.run.state in _ENDED and not r.finished.is_set()
        ]
        if ended:
            await asyncio.wait(
                [asyncio.ensure_future(w) for w in ended],
                timeout=self.options.timeout("planning"),
            )
        await super().close()

    @property
    def audit_trail(self) -> AuditTrailView:
        """``record_plan``, ``record_decision``, ``get_decisions(trace_id)``."""
        if self.audit_view is None:
            self.audit_view = AuditTrailView(self.audit, clock=self.clock)
        return self.audit_view

    async def approve(self, approval_id: str, *, by: str | Identity, reason: str = "") -> Any:
        """Approve a pending request as reviewer ``by`` (never the run's own user)."""
        return await self._decide(approval_id, approval_pb2.VERDICT_APPROVE, by, reason)

    async def deny(self, approval_id: str, *, by: str | Identity, reason: str) -> Any:
        """Deny a pending request as reviewer ``by``, saying why."""
        return await self._decide(approval_id, approval_pb2.VERDICT_DENY, by, reason)

    async def _decide(self, approval_id: str, verdict: int, by: str | Identity, reason: str) -> Any:
        reviewer = by if isinstance(by, Identity) else Identity(by, ("reviewer",))
        submit = getattr(self.approval, "submit_decision", None)
        if submit is None:
            raise TypeError(
                "approvals are decided from Python only embedded; over gRPC a reviewer"
                " calls SubmitDecision with their own token (cuga approvals approve)"
            )
        return await submit(approval_id, verdict, reason, reviewer)


_ENDED = frozenset(
    {
        coordinator_pb2.RUN_STATE_COMPLETED,
        coordinator_pb2.RUN_STATE_FAILED,
        coordinator_pb2.RUN_STATE_CANCELLED,
    }
)


def retry_policy_message(
    policy: common_pb2.RetryPolicy | ExponentialBackoffPolicy | None,
) -> common_pb2.RetryPolicy | None:
    """A ``RetryPolicy`` (the dataclass) as the ``cuga.common.v1.RetryPolicy`` message a
    resume request carries; a message or ``None`` is returned as it is."""
    if policy is None or isinstance(policy, common_pb2.RetryPolicy):
        return policy
    if not isinstance(policy, ExponentialBackoffPolicy):
        raise TypeError(
            f"retry_policy must be a RetryPolicy or its message, not {type(policy).__name__}"
        )
    message = common_pb2.RetryPolicy(multiplier=policy.multiplier, max_attempts=policy.max_attempts)
    message.base_delay.FromNanoseconds(round(policy.base_delay * 1e9))
    message.max_delay.FromNanoseconds(round(policy.max_delay * 1e9))
    return message


def _strategy(value: str | int) -> Any:
    # The engine's parameter is the protobuf enum type; its values are these ints.
    return error_strategy(value)


__all__ = [
    "DECISION_KINDS",
    "ApprovalCheck",
    "ApprovalPolicy",
    "ApprovalStatus",
    "AuditTrailView",
    "EmbeddedCoordinator",
    "EmbeddedWorker",
    "EmbeddedWorkerPool",
    "ToolBudget",
    "VectorMemory",
    "as_budget",
    "budget_policy",
    "error_strategy",
    "retry_policy_message",
]
