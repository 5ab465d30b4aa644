"""``cuga run``, ``watch``, ``runs``, ``cancel`` and ``resume``: start and follow runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.markup import escape

from cuga.cli._output import CommandError, ExitCode, UsageError, err, json_line, out, plain
from cuga.cli.tokens import cli_token
from cuga.client import CoordinatorClient
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings, yaml_problem

_STRATEGIES = {
    "fail_fast": common_pb2.ERROR_PROPAGATION_FAIL_FAST,
    "retry": common_pb2.ERROR_PROPAGATION_RETRY,
    "continue": common_pb2.ERROR_PROPAGATION_CONTINUE,
}
_COLORS = {
    "COMPLETE": "bold green",
    "FAILED": "bold red",
    "CANCELLED": "bold yellow",
    "RETRY": "yellow",
    "APPROVAL": "magenta",
    "EXECUTE": "cyan",
}
#: Example plan used by ``cuga demo``: a search, arithmetic, a payment a human must
#: approve (its amount comes from the arithmetic), and a report.
DEMO_PLAN: dict[str, Any] = {
    "steps": [
        {"id": "search", "tool": "web_search", "input": {"query": "grpc deadlines"}},
        {"id": "total", "tool": "calculator", "input": {"expression": "(17 + 25) * 2"}},
        {
            "id": "pay",
            "tool": "transfer_funds",
            "depends_on": ["total"],
            "input": {
                "from_account": "DE00DEMO0001",
                "to_account": "FR00DEMO0002",
                "amount": "{{steps.total.output.result}}",
                "currency": "EUR",
                "memo": "demo payment",
            },
        },
        {
            "id": "report",
            "tool": "echo",
            "depends_on": ["search", "pay"],
            "input": {"paid": "{{steps.pay.output}}", "note": "demo finished"},
        },
    ]
}
DEMO_GOAL = "research gRPC deadlines, total the numbers and pay the total"

OnEvent = Callable[[common_pb2.OrchestrationEvent], Awaitable[None]]
_PENDING = common_pb2.APPROVAL_STATUS_PENDING


def load_plan(path: str) -> tuple[list[common_pb2.PlanStep], common_pb2.ToolBudget | None]:
    """Steps (and budget) from a YAML or JSON plan file: ``{steps: [...], budget: {...}}``.

    Raises:
        UsageError: the file cannot be read or is not a plan (naming the file and line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--plan: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"--plan: not valid YAML: {yaml_problem(path, exc)}") from None
    try:
        return parse_plan(data, path)
    except ValueError as exc:
        raise UsageError(f"--plan: {exc}") from None


def parse_plan(
    data: Any, where: str
) -> tuple[list[common_pb2.PlanStep], common_pb2.ToolBudget | None]:
    """Steps and budget from plan data (a mapping with ``steps`` or a list of steps)."""
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise ValueError(f"{where}: a plan needs a 'steps' list")
    steps = []
    for i, raw in enumerate(data["steps"]):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: steps[{i}] must be a mapping")
        raw = dict(raw)
        if "id" in raw:
            raw["step_id"] = raw.pop("id")
        steps.append(_parsed(raw, common_pb2.PlanStep(), f"{where}: steps[{i}]"))
    budget = None
    if data.get("budget") is not None:
        if not isinstance(data["budget"], dict):
            raise ValueError(f"{where}: budget must be a mapping ({{ceiling: N, policy: ...}})")
        budget = _parsed(data["budget"], common_pb2.ToolBudget(), f"{where}: budget")
    return steps, budget


M = TypeVar("M", bound=Message)


def _parsed(raw: dict[str, Any], message: M, where: str) -> M:
    """``raw`` parsed into ``message``; a bad key or value is one line naming it."""
    fields = message.DESCRIPTOR.fields
    names = {f.name for f in fields} | {f.json_name for f in fields}
    unknown = [str(key) for key in raw if key not in names]
    if unknown:
        known = ", ".join("id" if f.name == "step_id" else f.name for f in fields)
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
    try:
        json_format.ParseDict(raw, message)
    except json_format.ParseError as exc:
        raise ValueError(f"{where}: {' '.join(str(exc).split())}") from None
    return message


def describe(event: common_pb2.OrchestrationEvent) -> str:
    """One line a person can read for an event."""
    kind = event.WhichOneof("payload")
    if kind == "plan":
        return f"plan {event.plan.plan_id}: {len(event.plan.steps)} step(s)"
    if kind == "decision":
        return event.decision.reasoning or f"-> {event.decision.target.worker_id}"
    if kind == "step_result":
        out_ = json.dumps(
            plain(json_format.MessageToDict(event.step_result.output)), ensure_ascii=False
        )
        replay = " (replayed)" if event.step_result.replayed else ""
        return f"ok on {event.step_result.worker_id}{replay}: {out_[:100]}"
    if kind == "approval":
        a = event.approval
        who = f" by {a.decided_by}" if a.decided_by else ""
        again = f", superseding {a.supersedes}" if a.supersedes else ""
        return f"{common_pb2.ApprovalStatus.Name(a.status)[16:]}{who} ({a.approval_id}{again})"
    if kind == "retry":
        r = event.retry
        return (
            f"attempt {r.attempt}/{r.max_attempts} failed ({r.error.message}); "
            f"retrying in {r.delay.ToNanoseconds() / 1e9:.2f}s"
        )
    if kind == "error":
        return (
            f"{common_pb2.FailureMode.Name(event.error.failure_mode)[13:]}: {event.error.message}"
        )
    if kind == "skipped":
        return f"skipped ({event.skipped.reason}): {event.skipped.message}"
    if kind == "warning":
        return f"warning {event.warning.code}: {event.warning.message}"
    if kind == "partial":
        p = event.partial
        if event.stage == common_pb2.LIFECYCLE_STAGE_CANCELLED:  # never resumed
            running = f", {len(p.unfinished_steps)} left running" if p.unfinished_steps else ""
            return f"{len(p.completed_steps)} step(s) done{running}; {p.error}"
        return f"{len(p.completed_steps)} step(s) done, {len(p.recovery_plan)} to resume; {p.error}"
    if kind == "summary":
        s = event.summary
        return f"{s.completed_steps} completed, {s.failed_steps} failed, {s.skipped_steps} skipped"
    if kind == "context":
        return f"run {event.run_id} trace {event.trace_id}"
    return ""


#: Stages ``cuga watch --until`` can stop at (the terminal ones end a watch anyway).
UNTIL_STAGES = ("PLAN", "ROUTE", "APPROVAL", "EXECUTE", "RETRY", "AGGREGATE")
#: Exit code of each terminal stage.
TERMINAL_CODES = {
    "COMPLETE": ExitCode.OK,
    "FAILED": ExitCode.FAILED,
    "CANCELLED": ExitCode.CANCELLED,
}


async def render(
    events: AsyncIterator[common_pb2.OrchestrationEvent],
    *,
    as_json: bool,
    on_event: OnEvent | None = None,
    until: str = "",
) -> int:
    """Print events as they arrive; the exit code follows the terminal stage.

    With ``until`` (a stage name), stop with 0 at the first event of that stage (the run
    goes on); a run that ends first gives its terminal stage's code.

    Raises:
        CommandError: the stream ended before the run did (exit code 4), naming the
            command that re-attaches.
    """
    console = out()
    last: common_pb2.OrchestrationEvent | None = None
    async for event in events:
        last = event
        stage = common_pb2.LifecycleStage.Name(event.stage)[16:]
        if as_json:
            json_line(event)
        else:
            style = _COLORS.get(stage, "white")
            step = f" {event.step_id}" if event.step_id else ""
            console.print(
                f"[dim]#{event.seq:<3}[/dim] [{style}]{stage:<10}[/{style}]"
                f"[bold]{escape(step)}[/bold] {escape(describe(event))}",
                highlight=False,
            )
        if on_event is not None:
            await on_event(event)
        if stage in TERMINAL_CODES:
            return int(TERMINAL_CODES[stage])
        if stage == until:
            return int(ExitCode.OK)
    if last is None:
        raise CommandError("the stream ended before the first event", ExitCode.CALL_ERROR)
    raise CommandError(
        f"the stream ended at event #{last.seq}, before the run finished",
        ExitCode.CALL_ERROR,
        hint=f"re-attach with: cuga watch {last.run_id} --after {last.seq}",
    )


async def _events(stream: AsyncIterator[Any]) -> AsyncIterator[common_pb2.OrchestrationEvent]:
    async for response in stream:
        yield response.event


def _client(settings: Settings) -> CoordinatorClient:
    # The client token: $CUGA_TOKEN, else the one `cuga up`/`cuga demo` made locally.
    return CoordinatorClient(
        settings.common.addresses.coordinator,
        call=settings.common.calls.coordinator,
        metadata=bearer_metadata(cli_token(settings.common.data_dir, "client")),
        credentials=settings.common.tls.channel_credentials(),
        channel_options=settings.common.tls.channel_options(),
    )


def _request(
    goal: str,
    steps: list[common_pb2.PlanStep],
    budget: common_pb2.ToolBudget | None,
    strategy: str,
    context: common_pb2.ExecutionContext | None = None,
) -> coordinator_pb2.OrchestrateRequest:
    request = coordinator_pb2.OrchestrateRequest(
        # One id per invocation: a transport retry of this call re-attaches, never a 2nd run.
        request_id=f"cli-{uuid.uuid4().hex}",
        goal=goal,
        steps=steps,
        error_strategy=_STRATEGIES[strategy],
        context=context,
    )
    if budget is not None:
        request.budget.CopyFrom(budget)
    return request


async def start_run(
    settings: Settings,
    goal: str,
    steps: list[common_pb2.PlanStep],
    budget: common_pb2.ToolBudget | None,
    *,
    strategy: str = "fail_fast",
    as_json: bool = False,
    context: common_pb2.ExecutionContext | None = None,
    on_event: OnEvent | None = None,
) -> int:
    """Orchestrate a goal and render its events; the exit code follows its end.

    Raises:
        CugaError: the coordinator refused the run or the stream failed.
    """
    request = _request(goal, steps, budget, strategy, context)
    async with _client(settings) as client:
        return await render(
            _events(client.orchestrate(request)), as_json=as_json, on_event=on_event
        )


async def detach_run(
    settings: Settings,
    goal: str,
    steps: list[common_pb2.PlanStep],
    budget: common_pb2.ToolBudget | None,
    *,
    strategy: str = "fail_fast",
    as_json: bool = False,
) -> int:
    """Start a run, print its id once the coordinator has it, and leave it running.

    Dropping the stream cancels nothing (the coordinator drives the run); ``cuga watch``
    follows it later.
    """
    request = _request(goal, steps, budget, strategy)
    async with _client(settings) as client:
        stream = client.orchestrate(request)
        async for response in stream:
            event = response.event
            if as_json:
                json_line({"run_id": event.run_id, "trace_id": event.trace_id})
            else:
                sys.stdout.write(event.run_id + "\n")
                sys.stdout.flush()
                err().print(
                    f"run {event.run_id} started (trace {event.trace_id}); follow it with:"
                    f" cuga watch {event.run_id}",
                    highlight=False,
                )
            return 0
    raise CommandError(
        "the coordinator ended the stream before the run started", ExitCode.CALL_ERROR
    )


async def demo_run(
    settings: Settings,
    *,
    reviewer_token: str,
    env: Mapping[str, str] | None = None,
    as_json: bool = False,
) -> int:
    """The sample orchestration ``cuga demo`` runs: it pauses for approval, and a reviewer
    approves it from the CLI (a process whose environment adds ``env``: the
    ``CUGA_TLS__*`` variables of ``cuga demo --tls``)."""
    steps, budget = parse_plan(DEMO_PLAN, "demo plan")
    console = err() if as_json else out()
    console.print(f"[bold]goal:[/bold] {escape(DEMO_GOAL)}")

    async def approve(event: common_pb2.OrchestrationEvent) -> None:
        if not (event.HasField("approval") and event.approval.status == _PENDING):
            return
        command = [
            "cuga",
            "approvals",
            "approve",
            event.approval.approval_id,
            "--reason",
            "demo reviewer checked the amount",
        ]
        # Printed the way a person can paste it into a shell.
        console.print(
            f"[magenta]$ CUGA_TOKEN=$(cat {shlex.quote(str(_reviewer_file(settings)))})"
            f" {escape(shlex.join(command))}[/magenta]",
            highlight=False,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cuga.cli.main",
            *command[1:],
            env={**os.environ, **(env or {}), "CUGA_TOKEN": reviewer_token},
            stdin=asyncio.subprocess.DEVNULL,
            # Its answer is part of the story, not of the run's JSON events.
            stdout=asyncio.subprocess.DEVNULL if as_json else None,
        )
        if await proc.wait() != 0:
            err().print("[red]the demo reviewer could not approve[/red]")

    # The requester is the caller: the coordinator sets user_id from the client's token.
    return await start_run(settings, DEMO_GOAL, steps, budget, on_event=approve, as_json=as_json)


def _reviewer_file(settings: Settings) -> Path:
    return settings.common.data_dir / "tokens" / "demo-reviewer.token"


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    steps, budget = load_plan(args.plan) if args.plan else ([], None)
    if args.detach:
        return await detach_run(
            settings, args.goal, steps, budget, strategy=args.strategy, as_json=args.json
        )
    return await start_run(
        settings, args.goal, steps, budget, strategy=args.strategy, as_json=args.json
    )


async def _watch(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        stream = client.watch(
            coordinator_pb2.WatchRequest(run_id=args.run_id, after_seq=args.after)
        )
        return await render(_events(stream), as_json=args.json, until=args.until or "")


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        stream = client.resume(
            coordinator_pb2.ResumeRequest(run_id=args.run_id, request_id=f"cli-{uuid.uuid4().hex}")
        )
        return await render(_events(stream), as_json=args.json)


def _state(run: coordinator_pb2.Run) -> str:
    return coordinator_pb2.RunState.Name(run.state).removeprefix("RUN_STATE_")


async def _runs(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        page = await client.list_runs(coordinator_pb2.ListRunsRequest(page_size=args.limit))
    console = out()
    for run in page.runs:
        if args.json:
            json_line(run)
        else:
            console.print(
                f"{run.run_id}  {_state(run):<11} {run.completed_steps}/{run.total_steps}"
                f"  {escape(run.goal[:60])}",
                highlight=False,
            )
    return 0


#: Fields ``cuga status --field`` prints alone (for scripts: ``$(cuga status R --field trace_id)``).
STATUS_FIELDS = ("run_id", "trace_id", "state", "plan_id", "goal", "error")


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        run = (await client.get_run(coordinator_pb2.GetRunRequest(run_id=args.run_id))).run
    if args.field:
        value = _state(run) if args.field == "state" else str(getattr(run, args.field))
        if args.json:
            json_line({args.field: value})
        else:
            sys.stdout.write(value + "\n")
        return 0
    if args.json:
        json_line(run)
        return 0
    console = out()
    console.print(f"[bold]{run.run_id}[/bold]  {_state(run)}", highlight=False)
    console.print(f"  goal   {escape(run.goal)}", highlight=False)
    console.print(f"  trace  {run.trace_id}   (cuga audit verify {run.trace_id})", highlight=False)
    console.print(
        f"  steps  {run.completed_steps}/{run.total_steps} completed, last event #{run.last_seq}",
        highlight=False,
    )
    if run.error:
        console.print(f"  error  {escape(run.error)}", highlight=False)
    return 0


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        resp = await client.cancel_run(
            coordinator_pb2.CancelRunRequest(
                run_id=args.run_id, reason=args.reason, request_id=f"cli-{uuid.uuid4().hex}"
            )
        )
    if args.json:
        json_line(resp.run)
    else:
        out().print(f"{resp.run.run_id}: {_state(resp.run)}", highlight=False)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``watch``, ``resume``, ``runs``, ``status`` and ``cancel``."""
    p = sub.add_parser("run", help="orchestrate a goal and show its events live")
    p.add_argument("goal")
    p.add_argument("--plan", help="YAML or JSON file with the steps (explicit plan)")
    p.add_argument("--strategy", choices=sorted(_STRATEGIES), default="fail_fast")
    p.add_argument(
        "--detach",
        action="store_true",
        help="print the run id once it starts and leave it running (follow with cuga watch)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event per line")
    p.set_defaults(handler=_run)
    p = sub.add_parser("watch", help="re-attach to a run's events, follow it to its end")
    p.add_argument("run_id")
    p.add_argument("--after", type=int, default=0, help="replay events after this seq")
    p.add_argument(
        "--until",
        choices=UNTIL_STAGES,
        help="stop at the first event of this stage (exit 0), leaving the run going",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event per line")
    p.set_defaults(handler=_watch)
    p = sub.add_parser("resume", help="continue a failed or interrupted run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true", help="one JSON object per event per line")
    p.set_defaults(handler=_resume)
    p = sub.add_parser("runs", help="list recent runs, newest first")
    p.add_argument("--limit", type=int, default=20, help="most runs listed (1 to 1000)")
    p.add_argument("--json", action="store_true", help="one run per line")
    p.set_defaults(handler=_runs)
    p = sub.add_parser("status", help="one run: state, trace id, progress")
    p.add_argument("run_id")
    p.add_argument("--field", choices=STATUS_FIELDS, help="print only this field's value")
    p.add_argument("--json", action="store_true", help="the run as one JSON object")
    p.set_defaults(handler=_status)
    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    p.add_argument("--reason", default="", help="why (recorded in the audit trail)")
    p.add_argument("--json", action="store_true", help="the run after cancelling, as JSON")
    p.set_defaults(handler=_cancel)
