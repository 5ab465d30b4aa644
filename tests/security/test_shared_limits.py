"""The limits of the shared messages hold at every server boundary (issue 20, item 9).

The attack, before: each service checked the ``cuga.common.v1`` messages it received in
its own way, or not at all. A Resume with a 100,000-character ``request_id`` started the
run; planning, routing, approval and the worker took an ``ExecutionContext`` with 10,000
metadata entries, a megabyte ``user_id`` or a malformed ``trace_id``; a step's
``capability`` of any characters reached planning, and its ``depends_on`` and
``estimated_cost`` reached routing, approval and the worker unchecked.

Now one function per shared message (``cuga.shared.validation``) is called at every
boundary that receives it. The table below sends each over-limit field to each RPC that
takes it, over real gRPC with real credentials, and expects INVALID_ARGUMENT naming that
exact field path, with nothing written: every table of every service's store holds as
many rows after the refused call as before it (no run, no event, no plan, no approval, no
decision, no worker, no execution).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from cuga.approval.v1 import approval_pb2
from cuga.audit.v1 import audit_pb2
from cuga.client import ApprovalClient, AuditClient, CoordinatorClient, PlanningClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.planning.v1 import planning_pb2
from cuga.routing.v1 import routing_pb2
from cuga.shared.config import GRPC_SERVICE_NAMES
from cuga.shared.errors import CugaError, InvalidArgumentError
from cuga.shared.messages import to_struct
from cuga.shared.validation import MAX_TIMESTAMP_SECONDS
from cuga.worker.v1 import worker_pb2
from tests.support.rpc import raw_call
from tests.support.servers import (
    Cluster,
    as_identity,
    grant,
    make_settings,
    running_cluster,
    signed_as,
)

#: One cluster for the whole table: every call is refused, and each checks it wrote nothing.
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")

Mutation = Callable[[Any], None]


def _set(name: str, value: object) -> Mutation:
    def mutate(message: Any) -> None:
        setattr(message, name, value)

    return mutate


def _extend(name: str, values: list[str]) -> Mutation:
    def mutate(message: Any) -> None:
        getattr(message, name).extend(values)

    return mutate


def _update(name: str, entries: dict[str, str]) -> Mutation:
    def mutate(message: Any) -> None:
        getattr(message, name).update(entries)

    return mutate


def _timestamp(seconds: int, nanos: int = 0) -> Mutation:
    def mutate(message: Any) -> None:
        message.deadline.seconds = seconds
        message.deadline.nanos = nanos

    return mutate


def _input(size: int) -> Mutation:
    def mutate(step: Any) -> None:
        step.input.CopyFrom(to_struct({"text": "x" * size}))

    return mutate


def _duration(name: str, seconds: int, nanos: int = 0) -> Mutation:
    def mutate(policy: Any) -> None:
        getattr(policy, name).seconds = seconds
        getattr(policy, name).nanos = nanos

    return mutate


#: (field under the context, what is wrong, how to make it so): common.proto's limits.
CONTEXT_CASES: list[tuple[str, str, Mutation]] = [
    ("run_id", "129 chars", _set("run_id", "r" * 129)),
    ("run_id", "a space", _set("run_id", "run 1")),
    ("profile", "129 chars", _set("profile", "p" * 129)),
    ("profile", "a slash", _set("profile", "a/b")),
    ("user_id", "257 chars", _set("user_id", "u" * 257)),
    ("trace_id", "upper-case hex", _set("trace_id", "A" * 32)),
    ("trace_id", "33 chars", _set("trace_id", "a" * 33)),
    ("delegate_id", "129 chars", _set("delegate_id", "d" * 129)),
    ("metadata", "65 entries", _update("metadata", {f"k{i}": "v" for i in range(65)})),
    ("metadata", "a 129-char key", _update("metadata", {"k" * 129: "v"})),
    ("metadata['env']", "a 1025-char value", _update("metadata", {"env": "v" * 1025})),
    ("deadline", "after 9999", _timestamp(MAX_TIMESTAMP_SECONDS + 1)),
    ("deadline", "negative nanos", _timestamp(2_000_000_000, -1)),
]

#: (field under the step, what is wrong, how to make it so).
STEP_CASES: list[tuple[str, str, Mutation]] = [
    ("step_id", "65 chars", _set("step_id", "s" * 65)),
    ("tool", "129 chars", _set("tool", "t" * 129)),
    ("capability", "129 chars", _set("capability", "c" * 129)),
    ("capability", "a space", _set("capability", "pay ments")),
    ("depends_on[0]", "65 chars", _extend("depends_on", ["d" * 65])),
    ("depends_on", "257 entries", _extend("depends_on", [f"d{i}" for i in range(257)])),
    ("estimated_cost", "NaN", _set("estimated_cost", math.nan)),
    ("estimated_cost", "negative", _set("estimated_cost", -1.0)),
    ("reason", "1025 chars", _set("reason", "r" * 1025)),
    ("input", "over 64 KiB", _input(70_000)),
]

REQUEST_ID_CASES: list[tuple[str, str, Mutation]] = [
    ("request_id", "129 chars", _set("request_id", "r" * 129)),
    ("request_id", "100,000 chars", _set("request_id", "r" * 100_000)),
    ("request_id", "a newline", _set("request_id", "key\n1")),
]

BUDGET_CASES: list[tuple[str, str, Mutation]] = [
    ("ceiling", "negative", _set("ceiling", -1.0)),
    ("ceiling", "NaN", _set("ceiling", math.nan)),
    ("warn_fraction", "above 1", _set("warn_fraction", 2.0)),
    ("policy", "unknown", _set("policy", 7)),
]

RETRY_CASES: list[tuple[str, str, Mutation]] = [
    ("multiplier", "NaN", _set("multiplier", math.nan)),
    ("multiplier", "below 1", _set("multiplier", 0.5)),
    ("max_attempts", "21", _set("max_attempts", 21)),
    ("base_delay", "negative", _duration("base_delay", -1)),
    ("max_delay", "nanos out of range", _duration("max_delay", 1, 2_000_000_000)),
]

WORKER_INFO_CASES: list[tuple[str, str, Mutation]] = [
    ("capabilities[1]", "129 chars", _extend("capabilities", ["c" * 129])),
    ("labels", "65 entries", _update("labels", {f"k{i}": "v" for i in range(65)})),
    ("labels", "a 129-char key", _update("labels", {"k" * 129: "v"})),
    ("labels['zone']", "a 257-char value", _update("labels", {"zone": "v" * 257})),
]


@dataclasses.dataclass(frozen=True)
class Row:
    """One over-limit field sent to one RPC."""

    service: str
    rpc: str
    field: str
    why: str
    #: Where in the request the mutated message sits ("" for the request itself).
    path: str
    mutate: Mutation

    @property
    def id(self) -> str:
        return f"{self.service}.{self.rpc}:{self.field}({self.why})"


def _rows(service: str, rpc: str, prefix: str, cases: list[tuple[str, str, Mutation]]) -> list[Row]:
    return [
        Row(service, rpc, f"{prefix}.{f}" if prefix else f, why, prefix, mutate)
        for f, why, mutate in cases
    ]


ROWS: list[Row] = [
    # coordinator
    *_rows("coordinator", "Orchestrate", "", REQUEST_ID_CASES),
    *_rows("coordinator", "Orchestrate", "context", CONTEXT_CASES),
    *_rows("coordinator", "Orchestrate", "steps[0]", STEP_CASES),
    *_rows("coordinator", "Orchestrate", "budget", BUDGET_CASES),
    *_rows("coordinator", "Orchestrate", "retry_policy", RETRY_CASES),
    *_rows("coordinator", "Resume", "", REQUEST_ID_CASES),
    *_rows("coordinator", "Resume", "retry_policy", RETRY_CASES),
    *_rows("coordinator", "Resume", "partial.context", CONTEXT_CASES),
    *_rows("coordinator", "Resume", "partial.recovery_plan[0]", STEP_CASES),
    *_rows("coordinator", "Resume", "partial.budget", BUDGET_CASES),
    *_rows(
        "coordinator",
        "Resume",
        "partial",
        [
            ("run_id", "129 chars", _set("run_id", "r" * 129)),
            ("failed_step", "65 chars", _set("failed_step", "s" * 65)),
            ("plan_id", "129 chars", _set("plan_id", "p" * 129)),
            ("failure_mode", "unknown", _set("failure_mode", 99)),
        ],
    ),
    *_rows("coordinator", "Watch", "", [("run_id", "129 chars", _set("run_id", "r" * 129))]),
    *_rows("coordinator", "GetRun", "", [("run_id", "129 chars", _set("run_id", "r" * 129))]),
    *_rows("coordinator", "CancelRun", "", REQUEST_ID_CASES),
    *_rows("coordinator", "CancelRun", "", [("run_id", "129 chars", _set("run_id", "r" * 129))]),
    # planning
    *_rows("planning", "CreatePlan", "", REQUEST_ID_CASES),
    *_rows("planning", "CreatePlan", "context", CONTEXT_CASES),
    *_rows("planning", "CreatePlan", "steps[0]", STEP_CASES),
    *_rows("planning", "CreatePlan", "budget", BUDGET_CASES),
    *_rows("planning", "TransitionPlan", "", REQUEST_ID_CASES),
    *_rows("planning", "TransitionPlan", "", [("run_id", "129 chars", _set("run_id", "r" * 129))]),
    # routing
    *_rows("routing", "Route", "context", CONTEXT_CASES),
    *_rows("routing", "Route", "step", STEP_CASES),
    *_rows("routing", "RouteBatch", "context", CONTEXT_CASES),
    *_rows("routing", "RouteBatch", "steps[0]", STEP_CASES),
    *_rows("routing", "RegisterWorker", "", REQUEST_ID_CASES),
    *_rows("routing", "RegisterWorker", "worker", WORKER_INFO_CASES),
    *_rows("routing", "DeregisterWorker", "", REQUEST_ID_CASES),
    # approval
    *_rows("approval", "RequestApproval", "", REQUEST_ID_CASES),
    *_rows("approval", "RequestApproval", "context", CONTEXT_CASES),
    *_rows("approval", "RequestApproval", "step", STEP_CASES),
    *_rows("approval", "RequestApprovalBatch", "", REQUEST_ID_CASES),
    *_rows("approval", "RequestApprovalBatch", "context", CONTEXT_CASES),
    *_rows("approval", "RequestApprovalBatch", "steps[0]", STEP_CASES),
    *_rows("approval", "SubmitDecision", "", REQUEST_ID_CASES),
    *_rows("approval", "WithdrawApprovals", "", REQUEST_ID_CASES),
    # worker
    *_rows("worker", "ExecuteStep", "context", CONTEXT_CASES),
    *_rows("worker", "ExecuteStep", "step", STEP_CASES),
    # audit: records carry the same identifiers
    *_rows(
        "audit",
        "Record",
        "record",
        [
            ("run_id", "129 chars", _set("run_id", "r" * 129)),
            ("profile", "129 chars", _set("profile", "p" * 129)),
            ("trace_id", "upper-case hex", _set("trace_id", "A" * 32)),
        ],
    ),
]


def _echo(step_id: str = "say") -> S.PlanStep:
    return S.PlanStep(step_id=step_id, tool="echo", input=to_struct({"text": "hi"}))


def _transfer() -> S.PlanStep:
    return S.PlanStep(
        step_id="pay",
        tool="transfer_funds",
        input=to_struct(
            {
                "from_account": "DE00TEST0001",
                "to_account": "FR00TEST0002",
                "amount": 5,
                "currency": "EUR",
            }
        ),
    )


TRACE = "0123456789abcdef0123456789abcdef"


@dataclasses.dataclass
class World:
    """A running cluster and what the table's requests refer to."""

    cluster: Cluster
    data_dir: Path
    failed_run: str
    partial: S.PartialResult
    plan_id: str
    approval_id: str
    calls: int = 0

    def base(self, row: Row) -> Message:
        """A valid request of ``row.rpc``; the refusal is then the mutation's alone."""
        ctx = S.ExecutionContext(run_id="run-limits", profile="default", user_id="someone")
        self.calls += 1
        match (row.service, row.rpc):
            case ("coordinator", "Orchestrate"):
                return coordinator_pb2.OrchestrateRequest(
                    goal="say hi", steps=[_echo()], context=S.ExecutionContext()
                )
            case ("coordinator", "Resume"):
                if row.path.startswith("partial"):
                    return coordinator_pb2.ResumeRequest(partial=self.partial)
                return coordinator_pb2.ResumeRequest(run_id=self.failed_run)
            case ("coordinator", "Watch"):
                return coordinator_pb2.WatchRequest(run_id=self.failed_run)
            case ("coordinator", "GetRun"):
                return coordinator_pb2.GetRunRequest(run_id=self.failed_run)
            case ("coordinator", "CancelRun"):
                return coordinator_pb2.CancelRunRequest(run_id=self.failed_run)
            case ("planning", "CreatePlan"):
                return planning_pb2.CreatePlanRequest(
                    goal="say hi", mode=S.PLANNING_MODE_EXPLICIT, steps=[_echo()], context=ctx
                )
            case ("planning", "TransitionPlan"):
                return planning_pb2.TransitionPlanRequest(
                    plan_id=self.plan_id, to_state=S.PLAN_STATE_CANCELLED
                )
            case ("routing", "Route"):
                return routing_pb2.RouteRequest(step=_echo(), context=ctx)
            case ("routing", "RouteBatch"):
                return routing_pb2.RouteBatchRequest(steps=[_echo()], context=ctx)
            case ("routing", "RegisterWorker"):
                return routing_pb2.RegisterWorkerRequest(
                    worker=routing_pb2.WorkerInfo(
                        worker_id="worker-limits",
                        address="127.0.0.1:9",
                        tools=["echo"],
                        capabilities=["general"],
                    )
                )
            case ("routing", "DeregisterWorker"):
                return routing_pb2.DeregisterWorkerRequest(worker_id="worker-1")
            case ("approval", "RequestApproval"):
                return approval_pb2.RequestApprovalRequest(
                    step=_transfer(), context=ctx, sensitive=True
                )
            case ("approval", "RequestApprovalBatch"):
                return approval_pb2.RequestApprovalBatchRequest(
                    steps=[_transfer()], context=ctx, sensitive_tools=["transfer_funds"]
                )
            case ("approval", "WithdrawApprovals"):
                return approval_pb2.WithdrawApprovalsRequest(run_id="run-limits", reason="limits")
            case ("approval", "SubmitDecision"):
                return approval_pb2.SubmitDecisionRequest(
                    approval_id=self.approval_id, verdict=approval_pb2.VERDICT_APPROVE
                )
            case ("worker", "ExecuteStep"):
                return worker_pb2.ExecuteStepRequest(
                    step=_echo(),
                    context=S.ExecutionContext(
                        run_id="run-limits", profile="default", trace_id=TRACE
                    ),
                    idempotency_key=f"run-limits/say/{self.calls}",
                    attempt=1,
                )
            case ("audit", "Record"):
                return audit_pb2.RecordRequest(
                    record=audit_pb2.AuditRecord(
                        record_id=f"shared-limits-{self.calls}",
                        trace_id=TRACE,
                        run_id="run-limits",
                        kind="run_started",
                    )
                )
        raise AssertionError(f"no base request for {row.id}")

    def metadata(self, row: Row) -> tuple[tuple[str, str], ...]:
        """Credentials of the caller the authorisation matrix lets make ``row``'s call."""
        if row.service == "coordinator":
            return as_identity("client")
        if row.service == "worker":
            return signed_as("coordinator", "worker:worker-1")
        if row.rpc in ("RegisterWorker", "DeregisterWorker"):
            return as_identity("worker")
        if row.rpc == "SubmitDecision":
            return as_identity("reviewer")
        return as_identity("coordinator")

    def rows_stored(self) -> dict[str, int]:
        """Rows of every table of every store, by ``file:table``."""
        counts: dict[str, int] = {}
        for db in sorted(self.data_dir.glob("*.db")):
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                tables = [
                    r[0]
                    for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                ]
                for table in tables:
                    if db.name == "audit.db" and table != "audit_records":
                        continue
                    if table == "audit_outbox":
                        # Drained by the coordinator's forwarder as audit stores earlier
                        # runs' records; its rows are written only with events (counted).
                        continue
                    query = f'SELECT COUNT(*) FROM "{table}"'  # table names come from the schema
                    if db.name == "audit.db":
                        # Other writers' records arrive when they arrive; ours are these.
                        query += " WHERE record_id LIKE '%shared-limits-%'"
                    counts[f"{db.name}:{table}"] = conn.execute(query).fetchone()[0]
        return counts


def _at(message: Any, path: str) -> Any:
    """The sub-message at ``path`` ("partial.recovery_plan[0]"), "" for ``message``."""
    for part in filter(None, path.split(".")):
        name, _, index = part.partition("[")
        message = getattr(message, name)
        if index:
            message = message[int(index.rstrip("]"))]
    return message


async def _call(
    channel: grpc.aio.Channel, service: str, rpc: str, request: Message, metadata: Any
) -> CugaError | None:
    """Make the call; the error it answered, or None when it was accepted."""
    path = f"/{GRPC_SERVICE_NAMES[service]}/{rpc}"
    return await raw_call(channel, path, request.SerializeToString(), metadata)


async def _events(
    cluster: Cluster, request: coordinator_pb2.OrchestrateRequest
) -> list[S.OrchestrationEvent]:
    async with CoordinatorClient(
        cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        return [r.event async for r in client.orchestrate(request)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("shared-limits") / "data"
    async with running_cluster(make_settings(data_dir)) as cluster:
        failing = coordinator_pb2.OrchestrateRequest(
            goal="divide by zero",
            steps=[
                S.PlanStep(
                    step_id="divide", tool="calculator", input=to_struct({"expression": "1/0"})
                )
            ],
            error_strategy=S.ERROR_PROPAGATION_FAIL_FAST,
        )
        events = await _events(cluster, failing)
        assert events[-1].stage == S.LIFECYCLE_STAGE_FAILED, events[-1]
        partial = events[-1].partial
        assert partial.recovery_plan, "the failed run has a step left to resume"
        async with PlanningClient(
            cluster.address("planning"), metadata=as_identity("coordinator")
        ) as planning:
            plan = (
                await planning.create_plan(
                    planning_pb2.CreatePlanRequest(
                        goal="say hi", mode=S.PLANNING_MODE_EXPLICIT, steps=[_echo()]
                    )
                )
            ).plan
        async with ApprovalClient(
            cluster.address("approval"), metadata=as_identity("coordinator")
        ) as approval:
            pending = (
                await approval.request_approval(
                    approval_pb2.RequestApprovalRequest(
                        step=_transfer(),
                        context=S.ExecutionContext(run_id="run-pending", user_id="someone"),
                        sensitive=True,
                    )
                )
            ).request
        assert pending.status == S.APPROVAL_STATUS_PENDING
        yield World(cluster, data_dir, partial.run_id, partial, plan.plan_id, pending.approval_id)


@MODULE_LOOP
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
async def test_an_over_limit_shared_field_is_refused_naming_it_and_writes_nothing(
    world: World, row: Row
) -> None:
    request = world.base(row)
    row.mutate(_at(request, row.path))
    if row.service == "worker":
        grant(request)
    before = world.rows_stored()
    async with grpc.aio.insecure_channel(
        world.cluster.address(row.service),
        options=[("grpc.max_send_message_length", 8 * 1024 * 1024)],
    ) as channel:
        error = await _call(channel, row.service, row.rpc, request, world.metadata(row))
    assert error is not None, f"{row.id} was accepted"
    assert isinstance(error, InvalidArgumentError), f"{row.id}: {error!r}"
    assert error.field == row.field, f"{row.id}: named {error.field!r} ({error.message})"
    after = world.rows_stored()
    assert after == before, f"{row.id} wrote: " + ", ".join(
        f"{k} {before.get(k, 0)} -> {n}" for k, n in after.items() if before.get(k, 0) != n
    )


@MODULE_LOOP
async def test_resume_with_a_100000_character_request_id_starts_nothing(world: World) -> None:
    """The review's example: the failed run stays as it was."""

    async with CoordinatorClient(
        world.cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        before = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=world.failed_run))).run
        with pytest.raises(InvalidArgumentError) as refused:
            async for _ in client.resume(
                coordinator_pb2.ResumeRequest(request_id="r" * 100_000, run_id=world.failed_run)
            ):
                pass
        after = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=world.failed_run))).run
    assert refused.value.field == "request_id"
    assert after.state == coordinator_pb2.RUN_STATE_FAILED
    assert after.last_seq == before.last_seq


def test_the_table_covers_every_rpc_that_takes_a_shared_message() -> None:
    """Every request message holding an ExecutionContext, PlanStep, ToolBudget, RetryPolicy,
    PartialResult or a request_id has rows here."""
    shared = {
        "cuga.common.v1.ExecutionContext",
        "cuga.common.v1.PlanStep",
        "cuga.common.v1.ToolBudget",
        "cuga.common.v1.RetryPolicy",
        "cuga.common.v1.PartialResult",
    }
    covered = {(r.service, r.rpc) for r in ROWS}
    missing = []
    for service, full_name in GRPC_SERVICE_NAMES.items():
        desc = descriptor_pool.Default().FindServiceByName(full_name)
        for method in desc.methods:
            fields = method.input_type.fields
            takes = any(
                f.name == "request_id"
                or (f.message_type is not None and f.message_type.full_name in shared)
                for f in fields
            )
            if takes and (service, method.name) not in covered:
                missing.append(f"{service}.{method.name}")
    assert not missing, missing


@MODULE_LOOP
async def test_a_run_with_the_longest_run_id_the_contract_allows_completes(world: World) -> None:
    """The ids the coordinator derives from a run id (planning's and approval's request ids,
    audit record ids) fit their own limits even when the run id takes all 128 characters."""
    run_id = "r" * 128
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay", steps=[_transfer()], context=S.ExecutionContext(run_id=run_id)
    )
    async with CoordinatorClient(
        world.cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        stages = []
        async for response in client.orchestrate(request):
            event = response.event
            stages.append(event.stage)
            if event.HasField("approval") and event.approval.status == S.APPROVAL_STATUS_PENDING:
                async with ApprovalClient(
                    world.cluster.address("approval"), metadata=as_identity("reviewer")
                ) as reviewer:
                    await reviewer.submit_decision(
                        approval_pb2.SubmitDecisionRequest(
                            approval_id=event.approval.approval_id,
                            verdict=approval_pb2.VERDICT_APPROVE,
                            reason="ok",
                        )
                    )
    assert stages[-1] == S.LIFECYCLE_STAGE_COMPLETE, stages
    assert S.LIFECYCLE_STAGE_APPROVAL in stages
    async with AuditClient(
        world.cluster.address("audit"), metadata=as_identity("auditor")
    ) as audit:
        for _ in range(100):
            page = await audit.query(
                audit_pb2.QueryRequest(filter=audit_pb2.RecordFilter(run_id=run_id))
            )
            kinds = {r.kind for r in page.records}
            if {"run_started", "approval_requested", "run_outcome"} <= kinds:
                break
            await asyncio.sleep(0.1)
    assert {"run_started", "approval_requested", "run_outcome"} <= kinds, kinds
    assert all(len(r.record_id) <= len("coordinator/") + 128 for r in page.records)


@MODULE_LOOP
async def test_the_partial_result_a_failed_run_returned_resumes_it(world: World) -> None:
    """The checks hold the coordinator's own output to nothing stricter than it writes.

    Last in the module: it resumes the run the table's rows refer to.
    """
    async with CoordinatorClient(
        world.cluster.address("coordinator"), metadata=as_identity("client")
    ) as client:
        events = [
            r.event
            async for r in client.resume(
                coordinator_pb2.ResumeRequest(
                    request_id="resume-1",
                    partial=world.partial,
                    retry_policy=S.RetryPolicy(max_attempts=1),
                )
            )
        ]
    assert events[0].stage == S.LIFECYCLE_STAGE_INITIALIZE
    assert events[-1].stage == S.LIFECYCLE_STAGE_FAILED  # 1/0 fails again
    assert events[-1].partial.run_id == world.failed_run
