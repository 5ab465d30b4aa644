"""The planning authority's domain: build, validate, store and advance plans.

:class:`Planner` is the local :class:`~cuga.shared.authorities.PlanningAuthority`: the
servicer maps the gRPC contract onto it, and the embedded coordinator calls it directly.
It owns no network code; the tool catalogue, storage, memory and clock are injected.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from cuga.common.v1 import common_pb2
from cuga.planning.v1 import planning_pb2
from cuga.services.planning.catalog import ToolCatalog
from cuga.services.planning.config import PlanningConfig
from cuga.services.planning.dag import (
    SchemaValidators,
    validate_steps,
)
from cuga.services.planning.memory import VectorMemory, normalise_profile
from cuga.services.planning.planners import (
    KeywordPlanner,
    PlannerLike,
    PlanningRequest,
    Recall,
    ToolInfo,
    planner_name,
    propose,
)
from cuga.services.planning.store import CREATE, PlanStore
from cuga.shared.clock import Clock, SystemClock
from cuga.shared.config import Limits
from cuga.shared.errors import (
    AlreadyExistsError,
    CugaError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from cuga.shared.messages import timestamp
from cuga.shared.sqldb import AsyncDatabase
from cuga.shared.validation import (
    MAX_STEP_REASON_CHARS,
    check_budget,
    check_context,
    check_count,
    check_id,
    check_length,
    check_request_id,
)

log = logging.getLogger("cuga.planning")

S = common_pb2
#: Allowed moves of the plan state machine (a repeat of the current state is a no-op).
#: The coordinator moves a plan CREATED -> ROUTED once routing answered for its first steps
#: (it routes lazily, a window of ready steps at a time), then EXECUTING. CREATED ->
#: EXECUTING is allowed for a run that ends before any step was routed (its final state
#: must follow EXECUTING), and FAILED -> EXECUTING for a run that is resumed (a FAILED run
#: is resumable, and a resumed run that completes makes its plan COMPLETED).
TRANSITIONS: Mapping[int, frozenset[int]] = {
    S.PLAN_STATE_CREATED: frozenset(
        {S.PLAN_STATE_ROUTED, S.PLAN_STATE_EXECUTING, S.PLAN_STATE_CANCELLED}
    ),
    S.PLAN_STATE_ROUTED: frozenset({S.PLAN_STATE_EXECUTING, S.PLAN_STATE_CANCELLED}),
    S.PLAN_STATE_EXECUTING: frozenset(
        {S.PLAN_STATE_COMPLETED, S.PLAN_STATE_FAILED, S.PLAN_STATE_CANCELLED}
    ),
    S.PLAN_STATE_COMPLETED: frozenset(),
    S.PLAN_STATE_FAILED: frozenset({S.PLAN_STATE_EXECUTING}),
    S.PLAN_STATE_CANCELLED: frozenset(),
}
TERMINAL = frozenset({S.PLAN_STATE_COMPLETED, S.PLAN_STATE_FAILED, S.PLAN_STATE_CANCELLED})
#: Most states a TransitionPlan request may move through before its target (``via``).
MAX_VIA_STATES = 4
_STATES = frozenset(common_pb2.PlanState.values())


def _check_state(field: str, state: int, unset: str = "must not be UNSPECIFIED") -> None:
    """``state`` is a PlanState this build knows, not UNSPECIFIED (``unset`` says why)."""
    if state == S.PLAN_STATE_UNSPECIFIED:
        raise InvalidArgumentError(field, unset)
    if state not in _STATES:
        raise InvalidArgumentError(field, f"{state} is not a PlanState")


_MODE_NAMES: Mapping[str, int] = {
    "explicit": S.PLANNING_MODE_EXPLICIT,
    "default": S.PLANNING_MODE_DEFAULT,
    "budget_aware": S.PLANNING_MODE_BUDGET_AWARE,
    "memory_augmented": S.PLANNING_MODE_MEMORY_AUGMENTED,
}
_POLICY_NAMES: Mapping[str, int] = {"warn": S.BUDGET_POLICY_WARN, "block": S.BUDGET_POLICY_BLOCK}
MEMORY_CANDIDATES = 3


def state_name(state: int) -> str:
    """``CREATED`` for PLAN_STATE_CREATED (or the number if unknown)."""
    try:
        return common_pb2.PlanState.Name(state).removeprefix("PLAN_STATE_")
    except ValueError:
        return str(state)


def _new_plan_id() -> str:
    return f"plan-{uuid.uuid4().hex}"


def _fingerprint(message: object) -> str:
    data = message.SerializeToString(deterministic=True)  # type: ignore[attr-defined]
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Draft:
    steps: list[common_pb2.PlanStep]
    notes: list[str] = field(default_factory=list)
    source_run_id: str = ""
    planner: str = ""
    cost: float = 0.0
    exchanges: list[common_pb2.PlannerExchange] = field(default_factory=list)


@dataclass(frozen=True)
class _Ask:
    """What every mode passes on to the planner."""

    request: planning_pb2.CreatePlanRequest
    budget: common_pb2.ToolBudget
    timeout: float | None


class Planner:
    """Builds plans in four modes, checks them against tools and budget, owns their state.

    Args:
        store: durable plan storage.
        catalog: the tools plans may use.
        memory: vector memory of completed plans (memory-augmented mode).
        config: the ``planning`` configuration section.
        limits: goal, step and input limits.
        clock: time source for ``created_at``/``updated_at`` and transition stamps.
        new_id: plan id factory (tests pin it).
        planner: what proposes steps in the non-explicit modes (a ``Planner`` or a
            callable, see ``planners.py``; default the keyword ranker).
    """

    def __init__(
        self,
        store: PlanStore,
        catalog: ToolCatalog,
        memory: VectorMemory,
        *,
        config: PlanningConfig | None = None,
        limits: Limits | None = None,
        clock: Clock | None = None,
        new_id: Callable[[], str] = _new_plan_id,
        planner: PlannerLike | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._memory = memory
        self._config = config or PlanningConfig()
        self._limits = limits or Limits()
        self._clock = clock or SystemClock()
        self._new_id = new_id
        self._validators = SchemaValidators()
        self._planner: PlannerLike = planner or KeywordPlanner(
            rank_threshold=self._config.rank_threshold,
            max_steps=self._config.max_ranked_steps,
        )

    # ----------------------------------------------------------------- CreatePlan

    async def create_plan(
        self, request: planning_pb2.CreatePlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Build, validate and store a plan (state CREATED).

        Raises:
            InvalidArgumentError: a malformed request or plan, naming the field and step.
            FailedPreconditionError: over budget under BLOCK, or no tool matches the goal.
            AlreadyExistsError: the request id was used for a different request.
            UnavailableError: the tool catalogue cannot be read.
        """
        profile, mode, budget = self._check_create(request)
        fingerprint = self._create_fingerprint(request, profile)
        if request.request_id:
            stored = await self._store.lookup_request(CREATE, request.request_id)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    raise AlreadyExistsError(
                        f"request_id {request.request_id!r} was already used for a different"
                        " create request",
                        reason="REQUEST_ID_REUSED",
                    )
                return await self._store.get(stored.plan_id)
        tools = await self._tools(timeout)
        ask = _Ask(request, budget, timeout)
        if mode == S.PLANNING_MODE_EXPLICIT:
            draft = _Draft(validate_steps(request.steps, tools, self._limits, self._validators))
        elif mode == S.PLANNING_MODE_DEFAULT:
            draft = await self._default(request.goal, tools, ask)
        elif mode == S.PLANNING_MODE_BUDGET_AWARE:
            draft = await self._budget_aware(request.goal, tools, budget, ask)
        else:
            draft = await self._memory_augmented(profile, request.goal, tools, ask)
        if draft.cost:
            # What planning itself cost (an LLM's tokens) is the run's first expense.
            budget.spent = draft.cost
            draft.notes.append(f"planning cost {draft.cost:g} of the budget")
        total = math.fsum(s.estimated_cost for s in draft.steps)
        self._check_budget(budget, total + draft.cost, draft.notes)
        self._check_calls(budget, len(draft.steps), draft.notes)
        now = self._clock.now()
        plan = common_pb2.Plan(
            plan_id=self._new_id(),
            goal=request.goal,
            steps=draft.steps,
            budget=budget,
            state=S.PLAN_STATE_CREATED,
            mode=mode,  # type: ignore[arg-type]
            created_at=timestamp(now),
            updated_at=timestamp(now),
            profile=profile,
            source_run_id=draft.source_run_id,
            notes=draft.notes,
            estimated_cost=total,
            planner=draft.planner,
            planning_cost=draft.cost,
            planner_exchanges=draft.exchanges,
        )
        stored_plan = await self._store.insert(
            plan, request_id=request.request_id, fingerprint=fingerprint
        )
        log.info(
            "plan %s created (%s, %d steps, cost %g)",
            stored_plan.plan_id,
            common_pb2.PlanningMode.Name(stored_plan.mode),
            len(stored_plan.steps),
            stored_plan.estimated_cost,
        )
        return stored_plan

    def _check_create(
        self, request: planning_pb2.CreatePlanRequest
    ) -> tuple[str, int, common_pb2.ToolBudget]:
        check_request_id(request.request_id)
        check_length("goal", request.goal, self._limits.max_goal_chars, required=True)
        check_context("context", request.context)
        if request.mode not in common_pb2.PlanningMode.values():
            raise InvalidArgumentError("mode", f"{request.mode} is not a PlanningMode")
        budget = self._check_budget_fields(request.budget)
        if len(request.steps) > self._limits.max_steps:
            raise InvalidArgumentError(
                "steps", f"has {len(request.steps)} steps, the limit is {self._limits.max_steps}"
            )
        mode = request.mode
        if mode == S.PLANNING_MODE_UNSPECIFIED:
            mode = (
                S.PLANNING_MODE_EXPLICIT
                if request.steps
                else _MODE_NAMES[self._config.default_mode]  # type: ignore[assignment]
            )
        if mode == S.PLANNING_MODE_EXPLICIT and not request.steps:
            raise InvalidArgumentError("steps", "explicit mode needs at least one step")
        if mode != S.PLANNING_MODE_EXPLICIT and request.steps:
            raise InvalidArgumentError(
                "steps",
                f"steps may only be given in explicit mode, not"
                f" {common_pb2.PlanningMode.Name(mode)}",
            )
        return normalise_profile(request.context.profile), mode, budget

    def _check_budget_fields(self, budget: common_pb2.ToolBudget) -> common_pb2.ToolBudget:
        check_budget("budget", budget)
        out = common_pb2.ToolBudget()
        out.CopyFrom(budget)
        out.spent = 0.0  # output only: a new plan has spent nothing
        return out

    @staticmethod
    def _create_fingerprint(request: planning_pb2.CreatePlanRequest, profile: str) -> str:
        # Retries may carry a fresh trace or run id; what defines "the same request" is
        # what shapes the plan.
        key = planning_pb2.CreatePlanRequest()
        key.CopyFrom(request)
        key.request_id = ""
        key.context.Clear()
        key.context.profile = profile
        return _fingerprint(key)

    async def _tools(self, timeout: float | None) -> Mapping[str, common_pb2.ToolSpec]:
        if timeout is None:
            return await self._catalog.tools()
        try:
            return await asyncio.wait_for(self._catalog.tools(), timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                "the tool catalogue did not answer within the call's deadline"
            ) from None

    def _check_budget(self, budget: common_pb2.ToolBudget, total: float, notes: list[str]) -> None:
        if budget.ceiling <= 0:
            return
        policy = budget.policy or _POLICY_NAMES[self._config.default_budget_policy]
        if total > budget.ceiling:
            if policy == S.BUDGET_POLICY_BLOCK:
                raise FailedPreconditionError(
                    f"plan needs {total:g} cost units, budget allows {budget.ceiling:g}",
                    reason="BUDGET_EXCEEDED",
                    metadata={"required": f"{total:g}", "available": f"{budget.ceiling:g}"},
                )
            notes.append(
                f"budget warning: plan needs {total:g} cost units, budget allows"
                f" {budget.ceiling:g} (policy WARN: accepted)"
            )

    def _check_calls(self, budget: common_pb2.ToolBudget, calls: int, notes: list[str]) -> None:
        """A plan needs at least one tool call per step (retries come on top at run time)."""
        if budget.max_calls <= 0 or calls <= budget.max_calls:
            return
        policy = budget.policy or _POLICY_NAMES[self._config.default_budget_policy]
        if policy == S.BUDGET_POLICY_BLOCK:
            raise FailedPreconditionError(
                f"plan needs {calls} tool calls, budget allows {budget.max_calls}",
                reason="BUDGET_EXCEEDED",
                metadata={"required": str(calls), "available": str(budget.max_calls)},
            )
        notes.append(
            f"budget warning: plan needs {calls} tool calls, budget allows"
            f" {budget.max_calls} (policy WARN: accepted)"
        )

    # ------------------------------------------------------------------- modes

    async def _propose(
        self,
        goal: str,
        tools: Mapping[str, common_pb2.ToolSpec],
        ask: _Ask,
        mode: str,
        recalls: tuple[Recall, ...] = (),
    ) -> _Draft:
        """Ask the planner, then validate its steps like a client's plan."""
        name = planner_name(self._planner)
        planning_request = PlanningRequest(
            goal=goal,
            context=ask.request.context,
            tools={n: ToolInfo.from_spec(spec) for n, spec in tools.items()},
            recalls=recalls,
            budget=ask.budget,
            mode=mode,
            deadline_s=ask.timeout,
        )
        try:
            proposal = await propose(self._planner, planning_request)
        except ValueError as exc:
            raise FailedPreconditionError(
                f"planner {name!r} answered something that is not a plan: {exc}",
                reason="PLANNER_INVALID_PLAN",
            ) from None
        notes = list(proposal.notes)
        if not proposal.steps:
            detail = f" ({'; '.join(notes)})" if notes else ""
            raise FailedPreconditionError(
                f"no registered tool matches the goal{detail}", reason="NO_MATCHING_TOOL"
            )
        try:
            steps = validate_steps(proposal.steps, tools, self._limits, self._validators)
        except InvalidArgumentError as exc:
            # The client asked for a goal; a bad plan is the planner's fault, not theirs.
            raise FailedPreconditionError(
                f"planner {name!r} proposed an invalid plan: {exc.message}",
                reason="PLANNER_INVALID_PLAN",
            ) from None
        return _Draft(steps, notes, planner=name, cost=proposal.cost, exchanges=proposal.exchanges)

    async def _default(
        self, goal: str, tools: Mapping[str, common_pb2.ToolSpec], ask: _Ask
    ) -> _Draft:
        return await self._propose(goal, tools, ask, "default")

    async def _budget_aware(
        self,
        goal: str,
        tools: Mapping[str, common_pb2.ToolSpec],
        budget: common_pb2.ToolBudget,
        ask: _Ask,
    ) -> _Draft:
        draft = await self._propose(goal, tools, ask, "budget_aware")
        if budget.ceiling <= 0 and budget.max_calls <= 0:
            return draft
        ceiling = budget.ceiling if budget.ceiling > 0 else math.inf
        max_calls = budget.max_calls or len(draft.steps)
        # Greedy by rank: keep a step while the plan still fits, so a cheaper, lower-ranked
        # tool can stand in when the best one alone would cross the ceiling.
        kept: list[common_pb2.PlanStep] = []
        dropped: list[str] = []
        spent = 0.0
        for step in draft.steps:
            if spent + step.estimated_cost <= ceiling and len(kept) < max_calls:
                kept.append(step)
                spent += step.estimated_cost
            else:
                dropped.append(f"{step.step_id} ({step.tool}, cost {step.estimated_cost:g})")
        if not kept:
            # Nothing fits: keep the best step and let the budget policy decide.
            kept, dropped = draft.steps[:1], dropped[1:]
        if kept and kept[0].optional:
            kept[0].optional = False
        if dropped:
            draft.notes.append(
                f"dropped to fit the budget of {_budget_text(budget)}: {', '.join(dropped)}"
            )
        draft.steps = _close_dependencies(kept, draft.notes)
        return draft

    async def _memory_augmented(
        self, profile: str, goal: str, tools: Mapping[str, common_pb2.ToolSpec], ask: _Ask
    ) -> _Draft:
        notes: list[str] = []
        hits = await self._memory.asearch(
            profile,
            goal,
            limit=MEMORY_CANDIDATES,
            min_score=self._config.memory_similarity_threshold,
        )
        recalls: list[Recall] = []
        for hit in hits:
            run_id = str(hit.payload.get("run_id", ""))
            try:
                past = common_pb2.Plan.FromString(base64.b64decode(str(hit.payload["plan"])))
                recalls.append(Recall(hit.text, hit.score, run_id, tuple(past.steps)))
                steps = validate_steps(past.steps, tools, self._limits, self._validators)
            except CugaError as exc:
                notes.append(f"past run {run_id} no longer validates: {exc.message}")
                continue
            except (KeyError, ValueError):
                notes.append(f"memory record {hit.record_id} is unreadable")
                continue
            for step in steps:
                reused = f"reused from run {run_id} (similarity {hit.score:.2f})"
                step.reason = (f"{reused}; {step.reason}" if step.reason else reused)[
                    :MAX_STEP_REASON_CHARS
                ]
            notes.append(
                f"reused the plan of run {run_id} for the similar goal {hit.text[:200]!r}"
                f" (similarity {hit.score:.2f})"
            )
            return _Draft(steps, notes, source_run_id=run_id, planner="memory")
        notes.append(
            "no similar completed goal in memory"
            f" (threshold {self._config.memory_similarity_threshold:g}); planned in default mode"
            if not recalls
            else "no remembered plan validates today; the planner was given them as examples"
        )
        draft = await self._propose(goal, tools, ask, "memory_augmented", tuple(recalls))
        draft.notes[:0] = notes
        return draft

    # ------------------------------------------------------------------ GetPlan

    async def get_plan(self, plan_id: str, *, timeout: float | None = None) -> common_pb2.Plan:
        """A stored plan.

        Raises:
            InvalidArgumentError: empty or malformed id.
            NotFoundError: no such plan.
        """
        check_id("plan_id", plan_id)
        return await self._store.get(plan_id)

    # ------------------------------------------------------------ TransitionPlan

    async def transition_plan(
        self, request: planning_pb2.TransitionPlanRequest, *, timeout: float | None = None
    ) -> common_pb2.Plan:
        """Move a plan to another state, through the ``via`` states first.

        Moving to the state it is already in is a no-op. Each ``via`` state is a move of its
        own, checked and recorded as one, in the same transaction; one the plan is in
        already is passed over. With ``to_state`` COMPLETED and a ``run_id``, the goal and
        plan are remembered (same transaction) for memory-augmented planning.

        Raises:
            InvalidArgumentError: malformed request.
            NotFoundError: no such plan.
            FailedPreconditionError: the move is not allowed, naming both states.
            AlreadyExistsError: the request id was used for a different transition.
        """
        check_request_id(request.request_id)
        check_id("plan_id", request.plan_id)
        target = request.to_state
        _check_state("to_state", target, "is required")
        check_count("via", request.via, MAX_VIA_STATES)
        for i, state in enumerate(request.via):
            _check_state(f"via[{i}]", state)
        path = [*request.via, target]
        check_length("reason", request.reason, 1024)
        check_id("run_id", request.run_id, required=False)
        now = self._clock.now()

        def decide(plan: common_pb2.Plan) -> tuple[list[int], common_pb2.Plan] | None:
            if plan.state == target:
                return None
            states: list[int] = []
            at = plan.state
            for state in path:
                if state == at:
                    continue
                if state not in TRANSITIONS.get(at, frozenset()):
                    raise FailedPreconditionError(
                        f"plan {plan.plan_id} cannot move from {state_name(at)} to"
                        f" {state_name(state)}",
                        reason="INVALID_TRANSITION",
                        metadata={"from": state_name(at), "to": state_name(state)},
                    )
                states.append(state)
                at = state
            updated = common_pb2.Plan()
            updated.CopyFrom(plan)
            updated.state = target
            updated.updated_at.CopyFrom(timestamp(now))
            return states, updated

        also: Callable[[AsyncDatabase, common_pb2.Plan], Awaitable[None]] | None = None
        if target == S.PLAN_STATE_COMPLETED and request.run_id:
            run_id = request.run_id

            async def also(conn: AsyncDatabase, plan: common_pb2.Plan) -> None:
                await self._memory.aadd_in(
                    conn,
                    plan.profile,
                    plan.goal,
                    {
                        "plan_id": plan.plan_id,
                        "run_id": run_id,
                        "plan": base64.b64encode(plan.SerializeToString()).decode(),
                    },
                    key=f"run:{run_id}",
                )

        key = planning_pb2.TransitionPlanRequest()
        key.CopyFrom(request)
        key.request_id = ""
        plan = await self._store.transition(
            request.plan_id,
            decide,
            at=now,
            reason=request.reason,
            run_id=request.run_id,
            request_id=request.request_id,
            fingerprint=_fingerprint(key),
            also=also,
        )
        return plan


def _budget_text(budget: common_pb2.ToolBudget) -> str:
    """``3`` (cost units), ``2 tool calls`` or both: the ceilings a budget sets."""
    parts = []
    if budget.ceiling > 0:
        parts.append(f"{budget.ceiling:g}")
    if budget.max_calls > 0:
        parts.append(f"{budget.max_calls} tool calls")
    return " and ".join(parts)


def _close_dependencies(
    steps: list[common_pb2.PlanStep], notes: list[str]
) -> list[common_pb2.PlanStep]:
    """``steps`` without those that depend, directly or not, on a step that was dropped
    (they are in topological order, so one pass sees every dependency first)."""
    kept: list[common_pb2.PlanStep] = []
    ids: set[str] = set()
    orphans: list[str] = []
    for step in steps:
        missing = [d for d in step.depends_on if d not in ids]
        if missing:
            orphans.append(f"{step.step_id} (needs {', '.join(missing)})")
            continue
        kept.append(step)
        ids.add(step.step_id)
    if orphans:
        notes.append(f"dropped with the steps they depend on: {', '.join(orphans)}")
    return kept


__all__ = ["TERMINAL", "TRANSITIONS", "Planner", "state_name"]
