"""The live state of one run in this process (:class:`LiveRun`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanContext, TraceFlags

from cuga.approval.v1 import approval_pb2
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator._policy import template_references
from cuga.shared.messages import value_to_python

TERMINAL = frozenset(
    {
        common_pb2.LIFECYCLE_STAGE_COMPLETE,
        common_pb2.LIFECYCLE_STAGE_FAILED,
        common_pb2.LIFECYCLE_STAGE_CANCELLED,
    }
)


class LiveRun:
    """The live state of one run in this process."""

    def __init__(
        self,
        run: coordinator_pb2.Run,
        request: coordinator_pb2.OrchestrateRequest,
        plan: common_pb2.Plan,
        results: dict[str, common_pb2.StepResult],
        span_ctx: SpanContext,
    ) -> None:
        self.run = run
        self.request = request
        self.plan = plan
        self.results = results
        self.span_ctx = span_ctx
        self.seq = run.last_seq
        # None tells a watcher the run stopped here without a terminal event (shutdown).
        self.subscribers: list[asyncio.Queue[common_pb2.OrchestrationEvent | None]] = []
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason = ""
        self.failures: list[common_pb2.ErrorDetail] = []
        self.skipped: set[str] = set()
        # Steps the scheduler started in this process (a cancel skips the others).
        self.started: set[str] = set()
        # A resumed run goes on from what its record says it spent (every attempt of every
        # step, failed ones too), at least what planning (an LLM planner's tokens, in the
        # plan's budget.spent) and its stored results cost.
        run.spent = max(run.spent, plan.budget.spent + sum(r.cost for r in results.values()))
        run.tool_calls = max(run.tool_calls, sum(r.attempt or 1 for r in results.values()))
        self.warned: set[str] = set()
        # Whether the run had events before this process took it up (a resume).
        self.resumed = run.last_seq > 0
        # Set once routing answered for the run's first steps (the plan is ROUTED).
        self.routed = asyncio.Event()
        # Routes asked ahead of their steps, with when they were asked (monotonic).
        self.routes: dict[str, tuple[float, common_pb2.RoutingDecision]] = {}
        # Steps started (in start order) that have not taken their route yet: the next
        # route window asks for them first, so ready siblings are routed together.
        self.unrouted: dict[str, None] = {}
        self.approvals: dict[str, approval_pb2.ApprovalRequest] = {}
        # A step's latest DENIED or EXPIRED approval in the stored log (a resumed run asks
        # afresh, superseding it, instead of replaying the denial).
        self.supersede: dict[str, str] = {}
        # Worker calls in flight when the run was cancelled (step id -> the call and its
        # attempt), and those that had not finished when it stopped waiting for them.
        self.in_flight: dict[str, tuple[asyncio.Future[common_pb2.StepResult], int]] = {}
        self.unfinished: list[str] = []
        self.finished = asyncio.Event()
        self.prepare_lock = asyncio.Lock()
        self.executing: asyncio.Task[None] | None = None
        self.deadline_passed = False
        # Set when a deferred write of this run's events failed: the run stops there.
        self.store_failed: BaseException | None = None
        # The steps each step's input refers to, by step id (see references).
        self._references: dict[str, frozenset[str]] = {}

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def spent(self) -> float:
        """Budget cost units charged so far (kept on the run record, stored with it)."""
        return self.run.spent

    @spent.setter
    def spent(self, value: float) -> None:
        self.run.spent = value

    @property
    def calls(self) -> int:
        """Tool calls made so far (kept on the run record, stored with it)."""
        return self.run.tool_calls

    @calls.setter
    def calls(self, value: int) -> None:
        self.run.tool_calls = value

    @property
    def context(self) -> common_pb2.ExecutionContext:
        return self.run.context

    def references(self, step: common_pb2.PlanStep) -> frozenset[str]:
        """The step ids ``step``'s input refers to (``{{steps.<id>.output...}}``), a step of
        this run's plan. Read once per step: the plan does not change during a run, and
        the route window and the step itself both ask (walking the input each time)."""
        found = self._references.get(step.step_id)
        if found is None:
            found = self._references[step.step_id] = frozenset(template_references(step))
        return found

    def outputs(self, step_ids: Iterable[str]) -> dict[str, Any]:
        """The outputs of ``step_ids`` that have one, as Python values.

        Only the steps a template refers to: converting every completed output for every
        step would make a run O(n²) in its length.
        """
        return {
            sid: value_to_python(self.results[sid].output)
            for sid in step_ids
            if sid in self.results
        }


def span_context(trace_ctx: str) -> SpanContext | None:
    """The span context stored as ``<trace_id>:<span_id>`` (None when malformed)."""
    trace_hex, _, span_hex = trace_ctx.partition(":")
    if len(trace_hex) != 32 or len(span_hex) != 16:
        return None
    return SpanContext(
        int(trace_hex, 16), int(span_hex, 16), is_remote=True, trace_flags=TraceFlags(1)
    )


@functools.cache  # a handful of values, asked on every step and attempt
def policy_name(policy: int) -> str:
    """``round_robin`` for ROUTING_POLICY_ROUND_ROBIN (span and metric attribute)."""
    return common_pb2.RoutingPolicy.Name(policy)[len("ROUTING_POLICY_") :].lower()


__all__ = ["TERMINAL", "LiveRun", "policy_name", "span_context"]
