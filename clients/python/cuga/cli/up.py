"""``cuga serve``, ``cuga up`` and ``cuga demo``: run the services as processes."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.markup import escape
from rich.table import Table

from cuga.cli._output import ConfigProblem, ExitCode, err, json_line, out
from cuga.cli.tokens import LocalTokens, ensure_local_tokens
from cuga.shared.auth import bearer_metadata
from cuga.shared.bootstrap import Builder, serve
from cuga.shared.config import SERVICE_NAMES, Settings
from cuga.shared.files import private_dir

if TYPE_CHECKING:
    from cuga.cli.tls import LocalTls

#: Start order: the registry first, so workers can register as soon as they are up.
START_ORDER = ("routing", "audit", "approval", "worker", "planning", "coordinator")
#: Lines of a service's output kept to show when it fails to start.
LOG_TAIL = 20


class StartError(ConfigProblem):
    """The services could not start: a port in use, or a service exited while starting
    (its last lines of output are in the message). Exit code 5."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port`` (what a service would bind)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            # As the server binds (SO_REUSEADDR): a port in TIME_WAIT is free to it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def _moved_addresses(settings: Settings, offset: int = 10) -> str:
    """The variables that start every service ``offset`` ports higher."""
    moved = []
    for name in START_ORDER:
        host, _, port = settings.common.addresses.of(name).rpartition(":")
        moved.append(f"CUGA_ADDRESSES__{name.upper()}={host}:{int(port) + offset}")
    return " ".join(moved)


def _builder(name: str) -> Builder:
    # Static imports per name: no module path ever comes from input.
    if name == "coordinator":
        from cuga.services.coordinator.app import build
    elif name == "planning":
        from cuga.services.planning.app import build
    elif name == "routing":
        from cuga.services.routing.app import build
    elif name == "audit":
        from cuga.services.audit.app import build
    elif name == "approval":
        from cuga.services.approval.app import build
    elif name == "worker":
        from cuga.services.worker.app import build
    else:
        raise ValueError(f"unknown service {name!r} (valid: {', '.join(SERVICE_NAMES)})")
    return build


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.json:
        settings = settings.with_overrides(log_format="json")
    # gRPC reports a taken port only as a RuntimeError after the service was built.
    host = settings.common.host
    port = settings.common.addresses.port_of(args.service) if args.port is None else args.port
    if port and port_in_use(host, port):
        raise ConfigProblem(
            f"port {port} ({args.service}) is already in use on {host}",
            hint=f"stop what holds it, or serve on another port (--port, or"
            f" CUGA_ADDRESSES__{args.service.upper()})",
        )
    try:
        await serve(args.service, _builder(args.service), settings, port=args.port)
    except OSError as exc:  # the port is taken, the data directory not writable, ...
        raise ConfigProblem(f"{args.service}: {exc}") from None
    return 0


def _channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    options: Sequence[tuple[str, str]] = (),
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials, options=list(options))


async def wait_serving(
    address: str,
    deadline_s: float,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, str]] = (),
) -> bool:
    """Wait until a server's health says SERVING (watching, not polling).

    Args:
        address: ``host:port`` of the server.
        deadline_s: how long to wait, seconds.
        credentials: channel credentials for a TLS server (with mutual TLS, ones that
            present a client certificate); None dials in plaintext.
        options: channel options (``grpc.ssl_target_name_override``).
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with _channel(address, credentials, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < end:
            try:
                call = stub.Watch(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=max(0.1, end - loop.time()),
                    wait_for_ready=True,
                )
                async for status in call:
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        call.cancel()
                        return True
            except grpc.aio.AioRpcError:
                return False  # wait_for_ready already waited for the server to listen
    return False


class Cluster:
    """The six services as child processes, the way ``cuga up`` runs them.

    Secure by default: local tokens are made (once) under the data directory
    (``$CUGA_DATA_DIR`` of ``env``, else ``settings.common.data_dir``), every service reads
    their digests and sends its own token on its calls. Callers get a token with
    :meth:`token` (``cluster.token("client")`` for the coordinator) or ready call metadata
    with :meth:`metadata`. When ``env`` already sets ``CUGA_AUTH__TOKENS_FILE``, the caller
    manages tokens and nothing is generated.

    With ``tls=True`` (``cuga up --tls``) it also makes (once) a local CA and certificates
    under ``<data_dir>/tls/``: every service listens with mutual TLS on its own
    certificate and requires client certificates from that CA (each gets its own pair and
    ``ca.pem``, never the CA's key, which stays in ``tls/ca/``), and :attr:`settings`
    carries the ``client`` certificate, so callers built from it (the health wait, the
    CLI's clients) present it. :meth:`client_env` gives the same as ``CUGA_TLS__*``
    variables for other processes. Without ``tls`` but with TLS in ``settings`` (the
    caller's own certificates), the health wait uses those.
    """

    def __init__(
        self, settings: Settings, env: Mapping[str, str] | None = None, *, tls: bool = False
    ) -> None:
        self.env = dict(os.environ if env is None else env)
        if settings.source != "<defaults>" and not self.env.get("CUGA_CONFIG"):
            # `cuga --config FILE up`: the children read the same file as this process, so
            # they listen (and with `tls:` in it, speak TLS) as the health wait expects.
            self.env["CUGA_CONFIG"] = settings.source
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.tails: dict[str, collections.deque[str]] = {}
        self._pumps: dict[str, asyncio.Future[None]] = {}
        # Owner-only before anything is written in it (tokens, keys, databases).
        self.data_dir = private_dir(Path(self.env.get("CUGA_DATA_DIR") or settings.common.data_dir))
        self.env["CUGA_DATA_DIR"] = str(self.data_dir)  # the children use the same one
        self.tokens: LocalTokens | None = None
        if not self.env.get("CUGA_AUTH__TOKENS_FILE"):
            self.tokens = ensure_local_tokens(self.data_dir)
            self.env["CUGA_AUTH__TOKENS_FILE"] = str(self.tokens.file)
        self.tls: LocalTls | None = None
        if tls:
            # The local CA's module (x509, ~30 ms) only when asked for: not in `serve`.
            from cuga.cli.tls import CLIENT, ensure_local_tls

            self.tls = ensure_local_tls(self.data_dir / "tls")
            settings = settings.with_overrides(tls=self.tls.config(CLIENT))
        self.settings = settings

    def client_env(self) -> dict[str, str]:
        """``CUGA_TLS__*`` variables that make a CLI process present the local ``client``
        certificate (empty without local TLS)."""
        if self.tls is None:
            return {}
        from cuga.cli.tls import CLIENT

        return self.tls.env(CLIENT)

    def token(self, identity: str) -> str:
        """The local bearer token of a person: ``client`` (CoordinatorService),
        ``reviewer`` or ``auditor`` (services sign their own tokens with their keys).

        Raises:
            KeyError: unknown identity, or tokens are managed by the caller's env.
        """
        if self.tokens is None:
            raise KeyError(f"{identity}: tokens come from CUGA_AUTH__TOKENS_FILE, not the Cluster")
        return self.tokens.token(identity)

    def metadata(self, identity: str = "client") -> tuple[tuple[str, str], ...]:
        """Call metadata carrying ``identity``'s token (pass as a typed client's ``metadata``)."""
        return bearer_metadata(self.token(identity))

    def _env_of(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        own = ("CUGA_AUTH__SIGNING_KEY", "CUGA_AUTH__SIGNING_KEY_FILE")
        if self.tokens is not None and not any(env.get(k) for k in own):
            env.update(self.tokens.service_env(name))  # its own key (and the trust file)
        if self.tls is not None:
            env.update(self.tls.env(name))  # its own certificate, as server and as client
        return env

    def check_ports(self, services: Sequence[str] = START_ORDER) -> None:
        """Refuse to start when a service's port is taken (another ``cuga up``?).

        Raises:
            StartError: naming the service, the port and the way out.
        """
        host = self.settings.common.host
        for name in services:
            port = int(self.settings.common.addresses.of(name).rpartition(":")[2])
            if port and port_in_use(host, port):
                raise StartError(
                    f"port {port} ({name}) is already in use on {host}",
                    hint="another `cuga up`, `make up` or `make demo` is probably running:"
                    " stop it (Ctrl-C in its terminal), or start this one on other ports"
                    f" (and give the CLI the same variables): {_moved_addresses(self.settings)}",
                )

    async def _pump(self, name: str, stream: asyncio.StreamReader) -> None:
        # Each service's output goes on to ours, and its last lines are kept for the
        # message when it fails to start.
        tail = self.tails[name]
        while line := await stream.readline():
            tail.append(line.decode("utf-8", "replace").rstrip("\n"))
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(line.decode("utf-8", "replace"))
                sys.stderr.flush()

    def _failed(self, name: str, action: str) -> StartError:
        proc = self.procs[name]
        lines = "\n".join(f"  {name}| {line}" for line in self.tails[name]) or "  (no output)"
        return StartError(
            f"{name} {action} (exit code {proc.returncode}); its last lines:\n{lines}"
        )

    async def start(self, services: tuple[str, ...] = START_ORDER, timeout_s: float = 60.0) -> None:
        """Start each service and wait until it reports SERVING.

        Raises:
            StartError: a port is taken (nothing is started), or a service exited before
                it was SERVING (at once, with its last lines of output), or one did not
                become SERVING within ``timeout_s``.
        """
        self.check_ports(services)
        for name in services:
            # Through `cuga serve`, so a service that cannot start says why in one line
            # (a bad key, a refused tool) and exits with the CLI's exit codes.
            proc = self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "cuga.cli.main",
                "serve",
                name,
                env=self._env_of(name),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            self.tails[name] = collections.deque(maxlen=LOG_TAIL)
            assert proc.stdout is not None
            self._pumps[name] = asyncio.ensure_future(self._pump(name, proc.stdout))
        tls = self.settings.common.tls
        exits = {asyncio.ensure_future(self._exited(name)): name for name in services}
        try:
            for name in services:
                address = self.settings.common.addresses.of(name)
                serving = asyncio.ensure_future(
                    wait_serving(
                        address,
                        timeout_s,
                        credentials=tls.channel_credentials(),
                        options=tls.channel_options(),
                    )
                )
                done, _ = await asyncio.wait({serving, *exits}, return_when=asyncio.FIRST_COMPLETED)
                if serving not in done:
                    serving.cancel()
                    exited = next(exits[t] for t in exits if t in done)
                    raise self._failed(exited, "exited while starting")
                if not serving.result():
                    raise StartError(
                        f"{name} did not become SERVING on {address} in {timeout_s:g}s"
                    )
            # A health answer may come from another process holding the port since the
            # check: every child must still be alive.
            gone = self.died()
            if gone is not None:
                await self._exited(gone)
                raise self._failed(gone, "exited while starting")
        finally:
            for task in exits:
                task.cancel()

    async def _exited(self, name: str) -> None:
        await self.procs[name].wait()
        # Its last output may still be in the pipe: let the pump read it.
        await asyncio.wait([self._pumps[name]], timeout=1.0)

    def died(self) -> str | None:
        """Name of a child that exited, if any."""
        for name, proc in self.procs.items():
            if proc.returncode is not None:
                return name
        return None

    async def stop(self) -> None:
        """SIGTERM each child in reverse start order, so callers drain before what they
        call (the worker can still deregister); kill one that outlives its grace period."""
        grace = self.settings.common.grace_period_s + 5.0
        for name in reversed(START_ORDER):
            proc = self.procs.get(name)
            if proc is None or proc.returncode is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._pumps:  # the last lines the children wrote
            await asyncio.wait(list(self._pumps.values()), timeout=1.0)
            for pump in self._pumps.values():
                pump.cancel()


@asynccontextmanager
async def cluster(
    settings: Settings, env: Mapping[str, str] | None = None, *, tls: bool = False
) -> AsyncIterator[Cluster]:
    """All services running for the duration of the block (see :class:`Cluster`)."""
    c = Cluster(settings, env, tls=tls)
    try:
        await c.start()
        yield c
    finally:
        await c.stop()


def _table(settings: Settings, procs: Mapping[str, asyncio.subprocess.Process]) -> Table:
    table = Table(title="cuga services")
    table.add_column("service")
    table.add_column("address")
    table.add_column("pid")
    for name in START_ORDER:
        proc = procs.get(name)
        table.add_row(name, settings.common.addresses.of(name), str(proc.pid) if proc else "")
    return table


def _print_started(c: Cluster, as_json: bool) -> None:
    data_dir = c.data_dir.absolute()
    if as_json:
        for name in START_ORDER:
            proc = c.procs.get(name)
            json_line(
                {
                    "service": name,
                    "address": c.settings.common.addresses.of(name),
                    "pid": proc.pid if proc else None,
                }
            )
        return
    console = out()
    console.print(_table(c.settings, c.procs))
    console.print(
        f"data and tokens (owner-only) in {data_dir}/; the CLI finds them when run from"
        f" this directory, or with --data-dir {data_dir}",
        highlight=False,
    )
    if c.tls is not None:
        from cuga.cli.tls import shell_exports

        console.print(
            f"mutual TLS: CA and certificates in {c.tls.folder}/; for the CLI in another "
            f"shell:\n  {shell_exports(c.client_env())}",
            highlight=False,
            soft_wrap=True,
        )


async def _up(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        c = Cluster(settings, tls=args.tls)
    except OSError as exc:
        raise ConfigProblem(f"cannot prepare the data directory: {exc}") from None
    try:
        await c.start()
        _print_started(c, args.json)
        if args.json:
            json_line({"status": "SERVING"})
        else:
            out().print(console_hint(), highlight=False)
            out().print("all services SERVING; Ctrl-C stops them")
        while not stop.is_set():
            waiters = [asyncio.ensure_future(p.wait()) for p in c.procs.values()]
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
            for w in [*waiters, stopper]:
                w.cancel()
            dead = c.died()
            if dead:
                await asyncio.wait([c._pumps[dead]], timeout=1.0)
                error = c._failed(dead, "exited")
                err().print(
                    f"[red]error:[/red] {escape(error.message)}\nstopping the others",
                    highlight=False,
                )
                return int(ExitCode.FAILED)
        return 0
    finally:
        await c.stop()


def console_hint(*, demo: bool = False) -> str:
    """Where the web console will be. ``cuga up`` and ``cuga demo`` offer it and leave
    starting it to the user: it is a process of its own, signed into by people, not by
    the services (docs/console.md)."""
    from cuga.cli.console import DEFAULT_PORT, PORT_ENV

    url = f"http://127.0.0.1:{os.environ.get(PORT_ENV) or DEFAULT_PORT}/"
    if demo:
        return f"web console: `cuga console` beside `cuga up` serves {url} (docs/console.md)"
    return f"web console: run `cuga console` in another terminal, then open {url}"


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from cuga.cli.runs import demo_run

    data_dir = Path(settings.common.data_dir)
    env = dict(os.environ)
    env.setdefault("CUGA_DATA_DIR", str(data_dir))
    env.setdefault("CUGA_LOG_LEVEL", "WARNING")  # the demo's own output tells the story
    # With --json, stdout holds only the run's events; what the demo says goes to stderr.
    talk = err() if args.json else out()
    talk.print(
        f"[bold]cuga demo[/bold]: starting six services (data in {data_dir}/)", highlight=False
    )
    with contextlib.suppress(KeyboardInterrupt):
        async with cluster(settings, env, tls=args.tls) as c:  # makes the local credentials
            if not args.json:
                talk.print(_table(c.settings, c.procs))
                talk.print(console_hint(demo=True), highlight=False)
            if c.tls is not None:
                talk.print(f"mutual TLS: certificates in {c.tls.folder}/", highlight=False)
            return await demo_run(
                c.settings,
                reviewer_token=c.token("reviewer"),
                env=c.client_env(),
                as_json=args.json,
            )
    return int(ExitCode.INTERRUPTED)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, ``up`` and ``demo``."""
    p = sub.add_parser("serve", help="serve one service until SIGTERM (what a container runs)")
    p.add_argument("service", choices=SERVICE_NAMES)
    p.add_argument("--port", type=int, default=None, help="port to bind (default: configured)")
    p.add_argument(
        "--json", action="store_true", help="log JSON lines (log_format: json) instead of text"
    )
    p.set_defaults(handler=_serve)
    tls_help = "mutual TLS between everything, with a local CA made once under <data_dir>/tls"
    p = sub.add_parser("up", help="run all six services, one process each, until Ctrl-C")
    p.add_argument("--tls", action="store_true", help=tls_help)
    p.add_argument(
        "--json", action="store_true", help="each service as a JSON line, then {status: SERVING}"
    )
    p.set_defaults(handler=_up)
    p = sub.add_parser("demo", help="start everything, run a sample orchestration, stop")
    p.add_argument("--tls", action="store_true", help=tls_help)
    p.add_argument("--json", action="store_true", help="the run's events as JSON lines")
    p.set_defaults(handler=_demo)
