"""The web console: server-rendered pages over the coordinator, approval and audit APIs.

Every page and action calls the API with the signed-in user's token (:mod:`.backend`);
the API decides, the console shows its answer. What the console enforces itself is what
a web application owes its users: a session cookie that is HttpOnly, SameSite=Strict and
Secure under TLS; a CSRF token on every form and a same-origin check on every POST; HTML
autoescaping everywhere (and a Content-Security-Policy with no inline script, so an
escaping slip still runs nothing).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from google.protobuf import json_format
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cuga.audit.v1 import audit_pb2
from cuga.console import views
from cuga.console.backend import Backend
from cuga.console.config import ConsoleConfig
from cuga.console.dag import layout, render_svg
from cuga.console.sessions import AREAS, Session, SessionStore
from cuga.coordinator.v1 import coordinator_pb2
from cuga.shared.errors import CugaError
from cuga.shared.transparency import ProofError

HERE = Path(__file__).parent
#: Longest reason a reviewer may type (the approval service limits it too).
MAX_REASON = 2000
#: Security headers of every response.
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
#: How an API refusal shows as an HTTP status.
HTTP_STATUS = {
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 409,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400}


class Refused(Exception):
    """The console's own refusal of a request (no session, a bad CSRF token)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Headers:
    """Security headers on every response (plain ASGI, so streams pass through as they are)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in HEADERS.items():
                    headers.setdefault(key, value)
                if not static:
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)


class Console:
    """The application's state: configuration, sessions, the backend and the templates."""

    def __init__(self, config: ConsoleConfig, backend: Backend, sessions: SessionStore) -> None:
        self.config = config
        self.backend = backend
        self.sessions = sessions
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            enable_async=False,
        )
        self.templates.filters["pretty"] = _pretty

    # Sessions, CSRF, rendering ----------------------------------------------------

    def session(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(self.config.cookie_name))

    def require(self, request: Request) -> Session:
        session = self.session(request)
        if session is None:
            raise Refused(401, "sign in first")
        return session

    async def action(self, request: Request) -> tuple[Session, dict[str, str]]:
        """The session and form of a POST, after the CSRF and same-origin checks."""
        _same_origin(request)
        session = self.require(request)
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        if not session.csrf_ok(form.get("csrf", "")):
            raise Refused(403, "the form's CSRF token is missing or wrong: reload the page")
        return session, form

    def page(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = context.pop("session", None) or self.session(request)
        html = self.templates.get_template(name).render(
            session=session,
            areas=AREAS,
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def refused(
        self, request: Request, exc: CugaError | Refused, service: str = ""
    ) -> HTMLResponse:
        if isinstance(exc, Refused):
            return self.page(
                request, "error.html", exc.status, who="the console", error=exc.message
            )
        code = exc.code.name
        return self.page(
            request,
            "error.html",
            HTTP_STATUS.get(code, 502),
            who=f"the {service} service" if service else "the service",
            error=f"{code} {exc.reason}: {exc.message}",
            code=code,
        )

    def signed_in(self, session: Session) -> Response:
        response = RedirectResponse(
            "/runs" if "coordinator" in session.tokens else _first(session), 303
        )
        response.set_cookie(
            self.config.cookie_name,
            session.sid,
            httponly=True,
            secure=self.config.cookie_secure,
            samesite="strict",
            path="/",
        )
        return response

    # Pages ------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        return RedirectResponse(_first(session), 303)

    async def signin_form(self, request: Request) -> Response:
        return self.page(request, "signin.html")

    async def signin(self, request: Request) -> Response:
        try:
            _same_origin(request)
        except Refused as exc:
            return self.refused(request, exc)
        form = await request.form()
        tokens = {
            service: str(form.get(f"{area}_token", "")).strip()
            for service, area in AREAS.items()
            if str(form.get(f"{area}_token", "")).strip()
        }
        if not tokens:
            return self.page(request, "signin.html", 400, problem="give at least one token")
        access: dict[str, str] = {}
        for service, token in tokens.items():
            try:
                await self._probe(service, token)
                access[service] = ""
            except CugaError as exc:
                if exc.code.name in ("UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
                    problem = f"the {service} service: {exc.code.name} {exc.reason}: {exc.message}"
                    return self.page(
                        request, "signin.html", HTTP_STATUS[exc.code.name], problem=problem
                    )
                access[service] = f"{exc.code.name} {exc.reason}: {exc.message}"
        old = self.session(request)
        if old is not None:
            self.sessions.end(old.sid)
        return self.signed_in(self.sessions.create(tokens, access))

    async def _probe(self, service: str, token: str) -> None:
        if service == "coordinator":
            await self.backend.list_runs(token, size=1)
        elif service == "approval":
            await self.backend.list_pending(token)
        else:
            await self.backend.audit.get_checkpoint(
                audit_pb2.GetCheckpointRequest(), metadata=(("authorization", f"Bearer {token}"),)
            )

    async def signout(self, request: Request) -> Response:
        try:
            session, _ = await self.action(request)
        except Refused as exc:
            return self.refused(request, exc)
        self.sessions.end(session.sid)
        response = RedirectResponse("/signin", 303)
        response.delete_cookie(
            self.config.cookie_name,
            path="/",
            secure=self.config.cookie_secure,
            httponly=True,
            samesite="strict",
        )
        return response

    async def runs(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        q = request.query_params
        state = q.get("state", "")
        profile = q.get("profile", "")
        since = q.get("since", "")
        text = q.get("q", "")
        state_value = (
            coordinator_pb2.RunState.Value(f"RUN_STATE_{state}") if state in views.RUN_STATES else 0
        )
        try:
            page = await self.backend.list_runs(
                session.tokens.get("coordinator", ""),
                state=state_value,
                profile=profile,
                page_token=q.get("page", ""),
            )
        except CugaError as exc:
            return self.refused(request, exc, "coordinator")
        cutoff = 0.0
        if since in SINCE:
            cutoff = datetime.datetime.now(tz=datetime.UTC).timestamp() - SINCE[since]
        rows = [
            {
                "run_id": r.run_id,
                "goal": r.goal,
                "state": views.run_state(r.state),
                "stage": views.stage_name(r.stage),
                "profile": r.context.profile,
                "user": r.context.user_id,
                "steps": f"{r.completed_steps}/{r.total_steps}",
                "created": views.when(r.created_at),
            }
            for r in page.runs
            if r.created_at.seconds >= cutoff and text.lower() in r.goal.lower()
        ]
        return self.page(
            request,
            "runs.html",
            runs=rows,
            states=views.RUN_STATES,
            filters={"state": state, "profile": profile, "since": since, "q": text},
            next_page=page.next_page_token,
        )

    async def run(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        run_id = request.path_params["run_id"]
        token = session.tokens.get("coordinator", "")
        try:
            run = await self.backend.get_run(token, run_id)
            events = await self.backend.events_until(token, run_id, run.last_seq)
        except CugaError as exc:
            return self.refused(request, exc, "coordinator")
        state = views.run_state(run.state)
        view = views.fold(events, state)
        svg = render_svg(layout(views.plan_steps(view.plan)), view.states)
        partial = None
        if view.partial is not None:
            partial = json.dumps(
                json_format.MessageToDict(view.partial),
                indent=2,
                ensure_ascii=False,
                sort_keys=True,
            )
        return self.page(
            request,
            "run.html",
            run=run,
            state=state,
            stage=views.stage_name(run.stage),
            view=view,
            svg=svg,
            partial=partial,
            live=state == "RUNNING" and not view.terminal,
            can_resume=state in ("FAILED", "INTERRUPTED"),
            can_cancel=state == "RUNNING",
            created=views.when(run.created_at),
        )

    async def run_events(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return PlainTextResponse("sign in first", 401)
        run_id = request.path_params["run_id"]
        after = _int(request.headers.get("last-event-id")) or _int(
            request.query_params.get("after")
        )
        token = session.tokens.get("coordinator", "")
        return StreamingResponse(
            self._sse(token, run_id, after),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _sse(self, token: str, run_id: str, after: int) -> AsyncIterator[str]:
        try:
            async for event in self.backend.watch(token, run_id, after):
                row = views.event_row(event)
                yield f"id: {event.seq}\nevent: orchestration\ndata: {json.dumps(row.as_dict())}\n\n"
                if row.stage in views.TERMINAL_STAGES:
                    yield "event: end\ndata: {}\n\n"
                    return
            yield "event: end\ndata: {}\n\n"
        except CugaError as exc:
            data = json.dumps({"error": f"{exc.code.name} {exc.reason}: {exc.message}"})
            yield f"event: failure\ndata: {data}\n\n"

    async def cancel(self, request: Request) -> Response:
        try:
            session, form = await self.action(request)
        except Refused as exc:
            return self.refused(request, exc)
        run_id = request.path_params["run_id"]
        reason = form.get("reason", "")[:MAX_REASON] or "cancelled from the console"
        try:
            await self.backend.cancel_run(session.tokens.get("coordinator", ""), run_id, reason)
        except CugaError as exc:
            return self.refused(request, exc, "coordinator")
        return RedirectResponse(f"/runs/{_quote(run_id)}", 303)

    async def resume(self, request: Request) -> Response:
        try:
            session, _ = await self.action(request)
        except Refused as exc:
            return self.refused(request, exc)
        run_id = request.path_params["run_id"]
        try:
            await self.backend.resume_run(session.tokens.get("coordinator", ""), run_id)
        except CugaError as exc:
            return self.refused(request, exc, "coordinator")
        return RedirectResponse(f"/runs/{_quote(run_id)}", 303)

    async def approvals(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        profile = request.query_params.get("profile", "")
        try:
            page = await self.backend.list_pending(
                session.tokens.get("approval", ""),
                profile=profile,
                page_token=request.query_params.get("page", ""),
            )
        except CugaError as exc:
            return self.refused(request, exc, "approval")
        rows = [
            {
                "approval_id": r.approval_id,
                "run_id": r.run_id,
                "step_id": r.step_id,
                "tool": r.tool,
                "inputs": views.to_json(r.input),
                "profile": r.profile,
                "requester": r.requester,
                "rule": r.rule,
                "group": r.reviewer_group,
                "approvals": f"{sum(d.verdict == 1 for d in r.decisions)}/{r.required_approvals}",
                "created": views.when(r.created_at),
                "expires": views.when(r.expires_at),
            }
            for r in page.requests
        ]
        return self.page(
            request,
            "approvals.html",
            requests=rows,
            profile=profile,
            next_page=page.next_page_token,
            decided=request.query_params.get("decided", ""),
        )

    async def decide(self, request: Request) -> Response:
        try:
            session, form = await self.action(request)
        except Refused as exc:
            return self.refused(request, exc)
        approval_id = request.path_params["approval_id"]
        verdict = form.get("verdict", "")
        if verdict not in ("approve", "deny"):
            return self.refused(request, Refused(400, "verdict must be approve or deny"))
        try:
            decided = await self.backend.decide(
                session.tokens.get("approval", ""),
                approval_id,
                verdict == "approve",
                form.get("reason", "")[:MAX_REASON],
            )
        except CugaError as exc:
            return self.refused(request, exc, "approval")
        status = views.approval_status(decided.status)
        return RedirectResponse(f"/approvals?decided={_quote(approval_id)}+{status}", 303)

    async def audit(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        trace_id = request.query_params.get("trace_id", "").strip()
        if not trace_id:
            return self.page(request, "audit.html", trace_id="", records=None)
        token = session.tokens.get("audit", "")
        try:
            records = await self.backend.records(token, trace_id)
            verdict = await self.backend.verify(token, trace_id)
        except CugaError as exc:
            return self.refused(request, exc, "audit")
        rows = [
            {
                "record_id": r.record_id,
                "kind": r.kind,
                "actor": r.actor,
                "at": views.when(r.timestamp),
                "index": r.chain_index,
                "leaf": r.leaf_index,
                "payload": views.to_json(r.payload),
            }
            for r in records
        ]
        return self.page(
            request,
            "audit.html",
            trace_id=trace_id,
            records=rows,
            verdict=verdict,
            checkpoint_size=verdict.checkpoint.tree_size,
        )

    async def proof(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/signin", 303)
        record_id = request.query_params.get("record_id", "")
        try:
            resp, checkpoint = await self.backend.prove(session.tokens.get("audit", ""), record_id)
        except CugaError as exc:
            return self.refused(request, exc, "audit")
        except ProofError as exc:
            return self.page(request, "proof.html", 200, record_id=record_id, failure=str(exc))
        return self.page(
            request,
            "proof.html",
            record_id=record_id,
            record=resp.record,
            leaf_index=resp.leaf_index,
            tree_size=checkpoint.tree_size,
            root=checkpoint.root_hash.hex(),
            origin=checkpoint.origin,
            hashes=[h.hex() for h in resp.hashes],
            payload=views.to_json(resp.record.payload),
            at=views.when(resp.record.timestamp),
        )

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")


def _first(session: Session) -> str:
    for service, area in AREAS.items():
        if service in session.tokens:
            return f"/{area}"
    return "/signin"


def _same_origin(request: Request) -> None:
    """Refuse a POST whose Origin (or, lacking it, Referer) is another site."""
    source = request.headers.get("origin") or request.headers.get("referer") or ""
    if not source:
        return  # not a browser, or one that says nothing: the CSRF token still decides
    parts = urlsplit(source)
    # Host against host only: behind a proxy that terminates TLS the browser's origin is
    # https:// while this server sees http://.
    if parts.netloc != request.headers.get("host", ""):
        raise Refused(403, f"a form from another site ({parts.scheme}://{parts.netloc}) is refused")


def _int(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False, sort_keys=True)
    except ValueError:
        return text


def build_app(
    config: ConsoleConfig, backend: Backend, sessions: SessionStore | None = None
) -> Starlette:
    """The console's ASGI application."""
    console = Console(config, backend, sessions or SessionStore(idle_s=config.session_idle_s))

    def get(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
        return Route(path, handler, methods=["GET"])

    def post(path: str, handler: Callable[[Request], Awaitable[Response]]) -> Route:
        return Route(path, handler, methods=["POST"])

    routes = [
        get("/", console.home),
        get("/healthz", console.healthz),
        get("/signin", console.signin_form),
        post("/signin", console.signin),
        post("/signout", console.signout),
        get("/runs", console.runs),
        get("/runs/{run_id}", console.run),
        get("/runs/{run_id}/events", console.run_events),
        post("/runs/{run_id}/cancel", console.cancel),
        post("/runs/{run_id}/resume", console.resume),
        get("/approvals", console.approvals),
        post("/approvals/{approval_id}/decide", console.decide),
        get("/audit", console.audit),
        get("/audit/proof", console.proof),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_Headers)])
    app.state.console = console
    return app


__all__ = ["Console", "build_app"]
