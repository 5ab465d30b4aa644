"""The CUGA seed's shape on cuga-orchestrator: a planner, two workers, memory, a Python
approval policy, a partial result, a resume and an audit query, all in one process.

Run it with ``python examples/seed_example.py``; docs/migrating-from-cuga.md shows it
line for line and explains each name. Everything comes from public modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from cuga.orchestrator import (
    ApprovalCheck,
    ApprovalStatus,
    EmbeddedCoordinator,
    EmbeddedWorker,
    ExecutionContext,
    LifecycleStage,
    OrchestrationEvent,
    PlanningRequest,
    ToolBudget,
    VectorMemory,
    create_coordinator,
)

GOAL = "add the two invoices, then pay the total"


def planner(request: PlanningRequest) -> list[dict[str, object]]:
    """The seed's planner: any callable from the request to steps (or a Planner)."""
    assert {"calculator", "transfer_funds"} <= set(request.tools), "both workers' tools"
    return [
        {"id": "add", "tool": "calculator", "input": {"expression": "1200 + 34"}},
        {
            "id": "pay",
            "tool": "transfer_funds",
            "depends_on": ["add"],
            "input": {
                "from_account": "DE00DEMO0001",
                "to_account": "FR00DEMO0002",
                "amount": "{{steps.add.output.result}}",
                "currency": "EUR",
            },
        },
    ]


def needs_approval(step: ApprovalCheck) -> bool:
    """The approval policy as a Python callable: payments above 1000 need a reviewer."""
    return step.tool == "transfer_funds" and float(step.input["amount"]) > 1000


async def run(
    agent: EmbeddedCoordinator, stream: AsyncIterator[OrchestrationEvent], verdict: str
) -> list[OrchestrationEvent]:
    """Print a run's events; a pending approval is decided by rita (never bob, the
    requester: the coordinator refuses that)."""
    events = []
    async for event in stream:
        events.append(event)
        print(event.seq, LifecycleStage(event.stage).name, event.step_id)
        pending = ApprovalStatus(event.approval.status) is ApprovalStatus.PENDING
        if event.HasField("approval") and pending:
            if verdict == "deny":
                await agent.deny(event.approval.approval_id, by="rita", reason="check the total")
            else:
                await agent.approve(event.approval.approval_id, by="rita", reason="checked")
    return events


async def main() -> None:
    memory = VectorMemory()  # the default embedder; pass your own (name, dims, embed)
    agent = await create_coordinator(
        planner,
        [
            EmbeddedWorker("math-worker", ["calculator"], capabilities=["math"]),
            EmbeddedWorker("payments-worker", ["transfer_funds"]),
        ],
        memory,
        routing_policy="capability",
        approval_policy=needs_approval,
        data_dir="./.cuga-seed",
    )
    try:
        context = ExecutionContext(user_id="bob", profile="finance")
        budget = ToolBudget(ceiling=100, policy="warn")

        # 1. The reviewer denies the payment: the run fails with a partial result.
        first = await run(
            agent,
            agent.orchestrate(GOAL, context, error_strategy="fail_fast", budget=budget),
            "deny",
        )
        partial = first[-1].partial
        print(
            "partial result:",
            [s.step_id for s in partial.completed_steps],
            "done,",
            partial.failed_step,
            "failed",
        )

        # 2. Resume from the partial result: the payment asks again and is approved.
        resumed = await run(agent, agent.resume(partial), "approve")
        run_id = resumed[-1].run_id
        await agent.wait_run(run_id)  # the completed goal is remembered

        # 3. Memory: the completed goal, in this profile only.
        hits = memory.search("finance", GOAL)
        print(
            "memory:",
            hits[0].text if hits else None,
            "| other profile:",
            memory.search("default", GOAL),
        )

        # 4. The audit trail: the decisions of the run's trace.
        await agent.flush_audit(30)
        decisions = await agent.audit_trail.get_decisions(first[0].trace_id)
        print("decisions:", ", ".join(r.kind for r in decisions))
    finally:
        await agent.close()


if __name__ == "__main__":
    asyncio.run(main())
