"""``cuga run``, ``watch``, ``runs``, ``cancel`` and ``resume``: start and follow runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from rich.console import Console

from cuga.cli._output import json_line
from cuga.cli.tokens import cli_token
from cuga.client import CoordinatorClient, CugaError
from cuga.common.v1 import common_pb2
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.auth import bearer_metadata
from cuga.shared.config import Settings

console = Console()
err = Console(stderr=True)

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
    """Steps (and budget) from a YAML or JSON plan file: ``{steps: [...], budget: {...}}``."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    return parse_plan(data, path)


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
        step = common_pb2.PlanStep()
        try:
            json_format.ParseDict(raw, step)
        except json_format.ParseError as exc:
            raise ValueError(f"{where}: steps[{i}]: {exc}") from None
        steps.append(step)
    budget = None
    if data.get("budget") is not None:
        budget = common_pb2.ToolBudget()
        json_format.ParseDict(data["budget"], budget)
    return steps, budget


def describe(event: common_pb2.OrchestrationEvent) -> str:
    """One line a person can read for an event."""
    kind = event.WhichOneof("payload")
    if kind == "plan":
        return f"plan {event.plan.plan_id}: {len(event.plan.steps)} step(s)"
    if kind == "decision":
        return event.decision.reasoning or f"-> {event.decision.target.worker_id}"
    if kind == "step_result":
        out = json.dumps(json_format.MessageToDict(event.step_result.output))
        replay = " (replayed)" if event.step_result.replayed else ""
        return f"ok on {event.step_result.worker_id}{replay}: {out[:100]}"
    if kind == "approval":
        a = event.approval
        who = f" by {a.decided_by}" if a.decided_by else ""
        return f"{common_pb2.ApprovalStatus.Name(a.status)[16:]}{who} ({a.approval_id})"
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
    if kind == "warning":
        return f"warning {event.warning.code}: {event.warning.message}"
    if kind == "partial":
        p = event.partial
        return f"{len(p.completed_steps)} step(s) done, {len(p.recovery_plan)} to resume; {p.error}"
    if kind == "summary":
        s = event.summary
        return f"{s.completed_steps} completed, {s.failed_steps} failed, {s.skipped_steps} skipped"
    if kind == "context":
        return f"run {event.run_id} trace {event.trace_id}"
    return ""


async def render(
    events: AsyncIterator[common_pb2.OrchestrationEvent],
    *,
    as_json: bool,
    on_event: OnEvent | None = None,
) -> int:
    """Print events as they arrive; the exit code follows the terminal stage."""
    code = 1
    async for event in events:
        stage = common_pb2.LifecycleStage.Name(event.stage)[16:]
        if as_json:
            json_line(event)
        else:
            style = _COLORS.get(stage, "white")
            step = f" {event.step_id}" if event.step_id else ""
            console.print(
                f"[dim]#{event.seq:<3}[/dim] [{style}]{stage:<10}[/{style}]"
                f"[bold]{step}[/bold] {describe(event)}",
                highlight=False,
            )
        if on_event is not None:
            await on_event(event)
        if stage == "COMPLETE":
            code = 0
        elif stage in ("FAILED", "CANCELLED"):
            code = 1 if stage == "FAILED" else 2
    return code


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
    """Orchestrate a goal and render its events."""
    request = coordinator_pb2.OrchestrateRequest(
        goal=goal, steps=steps, error_strategy=_STRATEGIES[strategy], context=context
    )
    if budget is not None:
        request.budget.CopyFrom(budget)
    async with _client(settings) as client:
        try:
            return await render(
                _events(client.orchestrate(request)), as_json=as_json, on_event=on_event
            )
        except CugaError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}")
            return 1


async def demo_run(
    settings: Settings, *, reviewer_token: str, env: Mapping[str, str] | None = None
) -> int:
    """The sample orchestration ``cuga demo`` runs: it pauses for approval, and a reviewer
    approves it from the CLI (a process whose environment adds ``env``: the
    ``CUGA_TLS__*`` variables of ``cuga demo --tls``)."""
    steps, budget = parse_plan(DEMO_PLAN, "demo plan")
    console.print(f"[bold]goal:[/bold] {DEMO_GOAL}")

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
        console.print(f"[magenta]$ CUGA_TOKEN=<demo-reviewer token> {' '.join(command)}[/magenta]")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cuga.cli.main",
            *command[1:],
            env={**os.environ, **(env or {}), "CUGA_TOKEN": reviewer_token},
            stdin=asyncio.subprocess.DEVNULL,
        )
        if await proc.wait() != 0:
            err.print("[red]the demo reviewer could not approve[/red]")

    # The requester is the caller: the coordinator sets user_id from the client's token.
    return await start_run(settings, DEMO_GOAL, steps, budget, on_event=approve)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        steps, budget = load_plan(args.plan) if args.plan else ([], None)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    return await start_run(
        settings, args.goal, steps, budget, strategy=args.strategy, as_json=args.json
    )


async def _watch(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        try:
            stream = client.watch(
                coordinator_pb2.WatchRequest(run_id=args.run_id, after_seq=args.after)
            )
            return await render(_events(stream), as_json=args.json)
        except CugaError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}")
            return 1


async def _resume(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        try:
            stream = client.resume(coordinator_pb2.ResumeRequest(run_id=args.run_id))
            return await render(_events(stream), as_json=args.json)
        except CugaError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}")
            return 1


async def _runs(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        try:
            page = await client.list_runs(coordinator_pb2.ListRunsRequest(page_size=args.limit))
        except CugaError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}")
            return 1
    for run in page.runs:
        if args.json:
            json_line(run)
        else:
            state = coordinator_pb2.RunState.Name(run.state)[10:]
            console.print(
                f"{run.run_id}  {state:<11} {run.completed_steps}/{run.total_steps}"
                f"  {run.goal[:60]}",
                highlight=False,
            )
    return 0


async def _cancel(args: argparse.Namespace, settings: Settings) -> int:
    async with _client(settings) as client:
        try:
            resp = await client.cancel_run(
                coordinator_pb2.CancelRunRequest(run_id=args.run_id, reason=args.reason)
            )
        except CugaError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}")
            return 1
    console.print(f"{resp.run.run_id}: {coordinator_pb2.RunState.Name(resp.run.state)[10:]}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``, ``watch``, ``resume``, ``runs`` and ``cancel``."""
    p = sub.add_parser("run", help="orchestrate a goal and show its events live")
    p.add_argument("goal")
    p.add_argument("--plan", help="YAML or JSON file with the steps (explicit plan)")
    p.add_argument("--strategy", choices=sorted(_STRATEGIES), default="fail_fast")
    p.add_argument("--json", action="store_true", help="one JSON object per event per line")
    p.set_defaults(handler=_run)
    p = sub.add_parser("watch", help="re-attach to a run's events")
    p.add_argument("run_id")
    p.add_argument("--after", type=int, default=0, help="replay events after this seq")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_watch)
    p = sub.add_parser("resume", help="continue a failed or interrupted run")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_resume)
    p = sub.add_parser("runs", help="list recent runs")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_runs)
    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    p.add_argument("--reason", default="")
    p.set_defaults(handler=_cancel)
