"""What the six services really export over OTLP during runs, received in process.

Every service is started through the production bootstrap with its own telemetry, whose
``OTEL_EXPORTER_OTLP_ENDPOINT`` (passed as ``env``, not through ``os.environ``) points at an
in-process OTLP receiver. The asserts are what a person opening Jaeger relies on: one run
is one trace, whole (no orphan spans), with every service in it, every step and attempt
labelled with ``cuga.*`` attributes, and the same trace after a coordinator restart.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from cuga.approval.v1 import approval_pb2
from cuga.client import ApprovalClient, CoordinatorClient
from cuga.common.v1 import common_pb2 as S
from cuga.coordinator.v1 import coordinator_pb2
from cuga.orchestrator import CoordinatorAgent
from cuga.services.coordinator.app import build as build_coordinator
from cuga.services.worker.app import build_worker
from cuga.shared.bootstrap import RunningServer, start_server
from cuga.shared.config import Settings
from cuga.shared.messages import to_struct
from cuga.shared.telemetry import (
    ContextFilter,
    configure_logging,
    current_run_id,
    otlp_configured,
    otlp_logs_configured,
    setup_telemetry,
)
from tests.support.otlp import OtlpReceiver, ReceivedPoint, ReceivedSpan, otlp_receiver
from tests.support.servers import (
    CLUSTER_ORDER,
    as_identity,
    as_service,
    builders,
    make_settings,
    running_service,
    with_address,
)
from tests.support.tools import ENTERED, GATES, TEST_TOOLS

SERVICES = {f"cuga-{name}" for name in CLUSTER_ORDER}
SERVER, CLIENT = 2, 3  # OTLP Span.SpanKind values
TRANSFER = {
    "from_account": "DE00TEST0001",
    "to_account": "FR00TEST0002",
    "amount": 1200,
    "currency": "EUR",
}


def _step(sid: str, tool: str, deps: tuple[str, ...] = (), **inputs: object) -> S.PlanStep:
    return S.PlanStep(step_id=sid, tool=tool, depends_on=deps, input=to_struct(inputs))


def _agent(server: RunningServer) -> CoordinatorAgent:
    agent: CoordinatorAgent = server.definition.registrations[0][1]._agent
    return agent


async def _flush(servers: Mapping[str, RunningServer]) -> None:
    """Runs' tasks finished, audit records sent, then every service's telemetry exported."""
    agent = _agent(servers["coordinator"])
    for live in list(agent._live.values()):  # the run task ends just after its last event
        await asyncio.wait_for(live.finished.wait(), 10)
    assert await agent.flush_audit(timeout=10)
    for server in servers.values():
        # Blocking (waits for the exporter threads): off the loop the servers run on.
        assert await asyncio.to_thread(server.definition.telemetry.force_flush)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _captured_logs() -> Iterator[_Collect]:
    """Log records with their trace/run/service fields, RPC access lines included."""
    handler = _Collect()
    levels = {"cuga.rpc": logging.DEBUG, "cuga.coordinator": logging.INFO}
    before = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger().addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


def _trace(receiver: OtlpReceiver, trace_id: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.trace_id == trace_id]


def _assert_whole(spans: list[ReceivedSpan]) -> None:
    """One root (``cuga.run``), no orphans, every server span under a client span."""
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == ["cuga.run"], roots
    orphans = [s for s in spans if s.parent_span_id and s.parent_span_id not in by_id]
    assert not orphans, [(o.service, o.name) for o in orphans]
    for s in spans:
        if s.kind == SERVER:
            parent = by_id[s.parent_span_id]
            assert parent.kind == CLIENT, (s.name, parent.name)
            assert parent.name == s.name  # the caller's span of this very RPC
        assert s.end_ns >= s.start_ns > 0  # ended (only ended spans are exported)


@asynccontextmanager
async def _services(
    settings: Settings, env: Mapping[str, str], names: tuple[str, ...] = CLUSTER_ORDER
) -> AsyncIterator[tuple[dict[str, RunningServer], Settings]]:
    """The named services (worker with the test tools) exporting to ``env``'s endpoint."""
    build = builders()
    build["worker"] = functools.partial(build_worker, tools=TEST_TOOLS)
    servers: dict[str, RunningServer] = {}
    async with AsyncExitStack() as stack:
        for name in names:
            servers[name] = await stack.enter_async_context(
                running_service(name, build[name], settings, telemetry_env=env)
            )
            settings = with_address(settings, name, servers[name].address)
        yield servers, settings


def _settings(tmp_path: Path, **extra: str) -> Settings:
    return make_settings(
        tmp_path / "data",
        env={"CUGA_WORKER__TOOL_ALLOWLIST": "[cuga_example_tools, tests.support]", **extra},
    )


@dataclass
class ObservedRun:
    """A run with a retried step and a human approval, as the receiver saw it."""

    receiver: OtlpReceiver
    events: list[S.OrchestrationEvent]
    logs: list[logging.LogRecord]

    @property
    def trace_id(self) -> str:
        return self.events[0].trace_id

    @property
    def run_id(self) -> str:
        return self.events[0].run_id


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[ObservedRun]:
    settings = _settings(tmp_path)
    retry = S.RetryPolicy(multiplier=1.0, max_attempts=3)
    retry.base_delay.FromMilliseconds(1)
    retry.max_delay.FromMilliseconds(1)
    request = coordinator_pb2.OrchestrateRequest(
        goal="pay and report",
        steps=[
            _step("flaky", "flaky", name=f"f{uuid.uuid4().hex[:8]}", fail_times=1, error="runtime"),
            _step("pay", "transfer_funds", (), **TRANSFER),
            _step("report", "echo", ("flaky", "pay"), text="done"),
        ],
        error_strategy=S.ERROR_PROPAGATION_RETRY,
        retry_policy=retry,
        context=S.ExecutionContext(user_id="client"),  # the requester is the caller
    )
    events: list[S.OrchestrationEvent] = []
    with otlp_receiver() as receiver, _captured_logs() as logs:
        async with _services(settings, receiver.env()) as (servers, settings):
            async with (
                CoordinatorClient(
                    settings.common.addresses.coordinator, metadata=as_identity("client")
                ) as client,
                ApprovalClient(
                    settings.common.addresses.approval,
                    metadata=as_identity("reviewer"),
                ) as reviewer,
            ):
                async for response in client.orchestrate(request):
                    event = response.event
                    events.append(event)
                    if event.approval.status == S.APPROVAL_STATUS_PENDING:
                        await reviewer.submit_decision(
                            approval_pb2.SubmitDecisionRequest(
                                approval_id=event.approval.approval_id,
                                verdict=approval_pb2.VERDICT_APPROVE,
                                reason="checked",
                            )
                        )
            await _flush(servers)
        yield ObservedRun(receiver, events, list(logs.records))


async def test_a_run_is_one_whole_trace_across_all_six_services(observed: ObservedRun) -> None:
    assert observed.events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
    assert {e.trace_id for e in observed.events} == {observed.trace_id}
    spans = _trace(observed.receiver, observed.trace_id)
    assert {s.service for s in spans} == SERVICES
    _assert_whole(spans)
    # Every cuga.* span of this run is in this trace, none elsewhere.
    mine = [
        s for s in observed.receiver.spans() if s.attributes.get("cuga.run_id") == observed.run_id
    ]
    assert mine and {s.trace_id for s in mine} == {observed.trace_id}
    by_id = {s.span_id: s for s in spans}
    # Stages: plan, routing windows, approval requests and the wait sit under the run.
    names = {s.name for s in spans}
    assert {"cuga.plan", "cuga.route", "cuga.approval.request", "cuga.approval.wait"} <= names
    # Each step's call to the worker (a message of the ExecuteSteps stream) has its
    # client span under the step's attempt span and the worker's server span under that.
    executed = [s for s in spans if s.kind == SERVER and s.name.endswith("/ExecuteSteps")]
    assert len(executed) == len([s for s in spans if s.name == "cuga.step.attempt"])
    for s in executed:
        assert s.service == "cuga-worker"
        client = by_id[s.parent_span_id]
        assert client.kind == CLIENT and client.service == "cuga-coordinator"
        assert by_id[client.parent_span_id].name == "cuga.step.attempt"
    # Audit writes join the run: the audit service's server spans are in this trace.
    assert any(s.service == "cuga-audit" and s.name.endswith("/RecordBatch") for s in spans)


async def test_step_and_attempt_spans_carry_cuga_attributes(observed: ObservedRun) -> None:
    spans = _trace(observed.receiver, observed.trace_id)
    steps = {s.attributes["cuga.step_id"]: s for s in spans if s.name == "cuga.step"}
    assert set(steps) == {"flaky", "pay", "report"}
    for sid, span in steps.items():
        attrs = span.attributes
        assert attrs["cuga.run_id"] == observed.run_id
        assert attrs["cuga.worker"] == "worker-1"
        assert attrs["cuga.policy"] == "round_robin"
        assert attrs["cuga.tool"] == {"flaky": "flaky", "pay": "transfer_funds"}.get(sid, "echo")
    assert steps["pay"].attributes["cuga.approval_outcome"] == "APPROVAL_STATUS_APPROVED"
    wait = next(s for s in spans if s.name == "cuga.approval.wait")
    assert wait.attributes["cuga.approval_outcome"] == "APPROVAL_STATUS_APPROVED"
    assert wait.parent_span_id == steps["pay"].span_id
    # The retried step: one attempt span per attempt, under its step span.
    attempts = sorted(
        (
            s
            for s in spans
            if s.name == "cuga.step.attempt" and s.attributes["cuga.step_id"] == "flaky"
        ),
        key=lambda s: s.attributes["cuga.attempt"],
    )
    assert [a.attributes["cuga.attempt"] for a in attempts] == [1, 2]
    assert {a.parent_span_id for a in attempts} == {steps["flaky"].span_id}
    assert attempts[0].attributes["cuga.failure_mode"] == "AGENT"
    assert "cuga.failure_mode" not in attempts[1].attributes
    for a in attempts:
        assert a.attributes["cuga.run_id"] == observed.run_id
        assert a.attributes["cuga.tool"] == "flaky"
        assert a.attributes["cuga.worker"] == "worker-1"
        assert a.attributes["cuga.policy"] == "round_robin"
    retried = [e for e in observed.events if e.stage == S.LIFECYCLE_STAGE_RETRY]
    assert [e.step_id for e in retried] == ["flaky"]


def _value(receiver: OtlpReceiver, metric: str, service: str, **attrs: object) -> float:
    points = [
        p
        for p in receiver.latest(metric, f"cuga-{service}")
        if all(p.attributes.get(k) == v for k, v in attrs.items())
    ]
    assert points, (metric, service, attrs)
    return sum(p.value for p in points)


async def test_metrics_count_what_the_run_did(observed: ObservedRun) -> None:
    r = observed.receiver
    assert _value(r, "cuga.runs.started", "coordinator") == 1
    # One run-outcome counter, by outcome.
    assert _value(r, "cuga.runs.ended", "coordinator", **{"cuga.outcome": "COMPLETE"}) == 1
    assert not [
        p for p in r.points() if p.metric.startswith(("cuga.runs.completed", "cuga.runs.failed"))
    ]
    assert _value(r, "cuga.runs.active", "coordinator") == 0
    assert _value(r, "cuga.step.retries", "coordinator", **{"cuga.failure_mode": "AGENT"}) == 1
    flaky = {"cuga.tool": "flaky"}
    assert _value(r, "cuga.step.duration", "coordinator", **flaky, **{"cuga.outcome": "error"}) == 1
    assert _value(r, "cuga.step.duration", "coordinator", **flaky, **{"cuga.outcome": "ok"}) == 1
    assert _value(r, "cuga.routing.decisions", "routing", **{"cuga.policy": "round_robin"}) >= 3
    assert _value(r, "cuga.approval.requested", "approval") == 1
    assert _value(r, "cuga.approval.decided", "approval", **{"cuga.outcome": "APPROVED"}) == 1
    assert _value(r, "cuga.approval.pending", "approval") == 0
    assert _value(r, "cuga.audit.buffer.depth", "coordinator") == 0
    orchestrate = {
        "rpc.system": "grpc",
        "rpc.service": "cuga.coordinator.v1.CoordinatorService",
        "rpc.method": "Orchestrate",
    }
    assert _value(r, "cuga.rpc.server.active_streams", "coordinator", **orchestrate) == 0
    ok = {"rpc.grpc.status_code": 0}
    assert _value(r, "rpc.server.duration", "coordinator", **orchestrate, **ok) == 1
    # Both sides of the coordinator's call to planning (RPC semantic conventions).
    plan = {"rpc.service": "cuga.planning.v1.PlanningService", "rpc.method": "CreatePlan"}
    assert _value(r, "rpc.client.duration", "coordinator", **plan, **ok) == 1
    assert _value(r, "rpc.server.duration", "planning", **plan, **ok) == 1


async def test_signal_matrix(observed: ObservedRun) -> None:
    """Which service emits which signal, each tied to the run where it is about the run."""
    run_spans = _trace(observed.receiver, observed.trace_id)
    matrix = {
        service: {
            "spans": any(s.service == service for s in run_spans),
            "metrics": any(p.service == service for p in observed.receiver.points()),
            "logs": any(
                getattr(rec, "service", "") == service
                and getattr(rec, "trace_id", "") == observed.trace_id
                and getattr(rec, "run_id", "") == observed.run_id
                and len(getattr(rec, "span_id", "")) == 16
                for rec in observed.logs
            ),
            # The same lines, exported over OTLP by the service's own LoggerProvider.
            "otlp logs": any(
                log.service == service
                and log.trace_id == observed.trace_id
                and log.attributes.get("run_id") == observed.run_id
                and len(log.span_id) == 16
                for log in observed.receiver.logs()
            ),
        }
        for service in sorted(SERVICES)
    }
    expected = {
        service: {"spans": True, "metrics": True, "logs": True, "otlp logs": True}
        for service in SERVICES
    }
    assert matrix == expected


async def test_a_resumed_run_keeps_its_trace_after_a_coordinator_restart(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    gate = f"g{uuid.uuid4().hex[:8]}"
    entered = ENTERED.setdefault(gate, asyncio.Event())
    request = coordinator_pb2.OrchestrateRequest(
        goal="survive a restart",
        steps=[
            _step("first", "echo", text="1"),
            _step("held", "gate", ("first",), name=gate),
            _step("last", "echo", ("held",), text="3"),
        ],
    )
    authorities = tuple(n for n in CLUSTER_ORDER if n != "coordinator")
    with otlp_receiver() as receiver:
        async with _services(settings, receiver.env(), authorities) as (servers, settings):

            async def coordinator() -> RunningServer:
                telemetry = setup_telemetry("cuga-coordinator", env=receiver.env())
                own = as_service(settings, "coordinator")  # its own token
                definition = await build_coordinator(own, telemetry)
                return await start_server(definition, own.common, port=0, host="127.0.0.1")

            first = await coordinator()
            events: list[S.OrchestrationEvent] = []
            started = asyncio.Event()

            async def follow() -> None:
                async with CoordinatorClient(
                    first.address, metadata=as_identity("client")
                ) as client:
                    async for response in client.orchestrate(request):
                        events.append(response.event)
                        started.set()

            follower = asyncio.create_task(follow())
            await asyncio.wait_for(entered.wait(), 20)
            await asyncio.wait_for(started.wait(), 20)  # the run's id reached the client
            follower.cancel()  # the client goes away; the run goes on until the stop
            await asyncio.gather(follower, return_exceptions=True)
            await first.stop(grace=0.5)  # the run is left INTERRUPTED; spans exported
            GATES.setdefault(gate, asyncio.Event()).set()

            second = await coordinator()
            try:
                async with CoordinatorClient(
                    second.address, metadata=as_identity("client")
                ) as client:
                    resumed = [
                        r.event
                        async for r in client.resume(
                            coordinator_pb2.ResumeRequest(run_id=events[0].run_id)
                        )
                    ]
                assert resumed[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
                await _flush({**servers, "coordinator": second})
            finally:
                await second.stop(grace=0.5)
    trace_id = events[0].trace_id
    assert {e.trace_id for e in resumed} == {trace_id}
    spans = _trace(receiver, trace_id)
    _assert_whole(spans)
    root = next(s for s in spans if s.name == "cuga.run")
    resume = [s for s in spans if s.name == "cuga.run.resume"]
    assert len(resume) == 1 and resume[0].parent_span_id == root.span_id
    # The resumed segment's steps sit under the resume span, in the same trace.
    resumed_steps = {
        s.attributes["cuga.step_id"]
        for s in spans
        if s.name == "cuga.step" and s.parent_span_id == resume[0].span_id
    }
    assert resumed_steps == {"held", "last"}


def test_export_is_off_without_otel_variables() -> None:
    assert otlp_configured({}) == (False, False)
    assert not otlp_logs_configured({})
    assert otlp_logs_configured({"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://x:4317"})
    assert not otlp_logs_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"}
    )
    assert otlp_configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4317"}) == (True, False)
    assert otlp_configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_SDK_DISABLED": "true"}
    ) == (False, False)


async def test_nothing_is_exported_when_the_variables_are_unset(tmp_path: Path) -> None:
    """A run with telemetry built from an empty environment: it works and sends nothing."""
    with otlp_receiver() as receiver:
        async with _services(_settings(tmp_path), {}) as (servers, settings):
            async with CoordinatorClient(
                settings.common.addresses.coordinator, metadata=as_identity("client")
            ) as client:
                events = [
                    r.event
                    async for r in client.orchestrate(
                        coordinator_pb2.OrchestrateRequest(
                            goal="quiet", steps=[_step("a", "echo", text="x")]
                        )
                    )
                ]
            await _flush(servers)
            for server in servers.values():  # no exporter was even built
                telemetry = server.definition.telemetry
                assert not telemetry.tracer_provider._active_span_processor._span_processors
                assert not telemetry.meter_provider._metric_readers
                assert telemetry.logger_provider is None
        assert events[-1].stage == S.LIFECYCLE_STAGE_COMPLETE
        assert receiver.spans() == [] and receiver.points() == [] and receiver.logs() == []


def test_json_log_lines_carry_trace_span_run_and_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    telemetry = setup_telemetry("cuga-example", env={})
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        configure_logging("json", "INFO", service="cuga-process")
        token = current_run_id.set("run-1")
        try:
            with telemetry.tracer.start_as_current_span("op") as span:
                logging.getLogger("cuga.example").info("inside %s", "a span")
        finally:
            current_run_id.reset(token)
        logging.getLogger("cuga.example").warning("outside")
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    inside, outside = (line for line in lines if line["logger"] == "cuga.example")
    ctx = span.get_span_context()
    assert inside["message"] == "inside a span" and inside["level"] == "INFO"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert inside["run_id"] == "run-1" and inside["service"] == "cuga-example"
    assert outside["trace_id"] == outside["run_id"] == ""
    assert outside["service"] == "cuga-process"
    # RFC 3339 in UTC, what log pipelines parse without a layout (issue 25).
    for line in (inside, outside):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["time"]), line
        assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)


DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "cuga.json"
#: UCUM units the collector's Prometheus exporter spells out as a name suffix; units in
#: braces (``{run}``) are annotations and add nothing.
_UNIT_SUFFIXES = {"ms": "milliseconds", "s": "seconds", "By": "bytes"}
#: Labels every series gets besides its attributes: the resource attributes
#: (resource_to_telemetry_conversion), Prometheus' own, and histogram buckets.
_RESOURCE_LABELS = {"service_name", "service_version", "k8s_pod_name", "job", "instance", "le"}


def _prometheus_names(point: ReceivedPoint) -> set[str]:
    """The series names the collector's Prometheus exporter makes of an OTLP metric."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", point.metric)
    suffix = _UNIT_SUFFIXES.get(point.unit)
    if suffix and not name.endswith(suffix):
        name = f"{name}_{suffix}"
    if point.kind == "counter":
        return {f"{name}_total"}
    if point.kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses."""
    labels: set[str] = set()
    text = re.sub(r'"[^"]*"', '""', expr)
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        labels.update(label.strip() for label in grouping.split(",") if label.strip())
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", text)
    metrics = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text))
    return metrics, labels


async def test_the_grafana_dashboard_queries_metrics_the_services_emit(
    observed: ObservedRun,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    (variable,) = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    points = observed.receiver.points()
    series = set().union(*(_prometheus_names(p) for p in points))
    attributes = {re.sub(r"\W", "_", key) for p in points for key in p.attributes}
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            metrics, labels = _promql_names(target["expr"])
            assert metrics, target["expr"]
            missing = metrics - series
            assert not missing, f"{panel['title']}: {sorted(missing)} not emitted"
            unknown = labels - attributes - _RESOURCE_LABELS
            assert not unknown, f"{panel['title']}: no such label {sorted(unknown)}"
            used |= metrics
    # What the issue asks the dashboard to show: runs, steps, latency, approvals pending,
    # audit lag.
    assert {
        "cuga_runs_started_total",
        "cuga_runs_ended_total",
        "cuga_step_duration_seconds_bucket",
        "rpc_server_duration_milliseconds_bucket",
        "rpc_client_duration_milliseconds_bucket",
        "cuga_approval_pending",
        "cuga_audit_buffer_depth",
    } <= used
