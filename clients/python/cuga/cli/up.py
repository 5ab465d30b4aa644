"""``cuga serve``, ``cuga up`` and ``cuga demo``: run the services as processes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from cuga.cli.tls import CLIENT, LocalTls, ensure_local_tls, shell_exports
from cuga.cli.tokens import LocalTokens, ensure_local_tokens
from cuga.shared.auth import bearer_metadata
from cuga.shared.bootstrap import Builder, serve
from cuga.shared.config import SERVICE_NAMES, Settings
from cuga.shared.files import private_dir

console = Console()
err = Console(stderr=True)

#: Start order: the registry first, so workers can register as soon as they are up.
START_ORDER = ("routing", "audit", "approval", "worker", "planning", "coordinator")


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
    await serve(args.service, _builder(args.service), settings, port=args.port)
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
        # Owner-only before anything is written in it (tokens, keys, databases).
        self.data_dir = private_dir(Path(self.env.get("CUGA_DATA_DIR") or settings.common.data_dir))
        self.tokens: LocalTokens | None = None
        if not self.env.get("CUGA_AUTH__TOKENS_FILE"):
            self.tokens = ensure_local_tokens(self.data_dir)
            self.env["CUGA_AUTH__TOKENS_FILE"] = str(self.tokens.file)
        self.tls: LocalTls | None = None
        if tls:
            self.tls = ensure_local_tls(self.data_dir / "tls")
            settings = settings.with_overrides(tls=self.tls.config(CLIENT))
        self.settings = settings

    def client_env(self) -> dict[str, str]:
        """``CUGA_TLS__*`` variables that make a CLI process present the local ``client``
        certificate (empty without local TLS)."""
        return self.tls.env(CLIENT) if self.tls is not None else {}

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

    async def start(self, services: tuple[str, ...] = START_ORDER, timeout_s: float = 60.0) -> None:
        """Start each service and wait until it reports SERVING."""
        for name in services:
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"cuga.services.{name}",
                env=self._env_of(name),
                stdin=asyncio.subprocess.DEVNULL,
            )
        tls = self.settings.common.tls
        for name in services:
            address = self.settings.common.addresses.of(name)
            serving = await wait_serving(
                address,
                timeout_s,
                credentials=tls.channel_credentials(),
                options=tls.channel_options(),
            )
            if not serving:
                raise RuntimeError(f"{name} did not become SERVING on {address}")

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


async def _up(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        c = Cluster(settings, tls=args.tls)
    except (OSError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    try:
        await c.start()
        console.print(_table(settings, c.procs))
        if c.tokens is not None:
            console.print(f"tokens (owner-only) in {c.tokens.folder}/; the CLI uses them")
        if c.tls is not None:
            console.print(
                f"mutual TLS: CA and certificates in {c.tls.folder}/; for the CLI in another "
                f"shell:\n  {shell_exports(c.client_env())}",
                highlight=False,
                soft_wrap=True,
            )
        console.print("all services SERVING; Ctrl-C stops them")
        while not stop.is_set():
            waiters = [asyncio.ensure_future(p.wait()) for p in c.procs.values()]
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait([*waiters, stopper], return_when=asyncio.FIRST_COMPLETED)
            for w in [*waiters, stopper]:
                w.cancel()
            dead = c.died()
            if dead:
                err.print(
                    f"[red]{dead} exited ({c.procs[dead].returncode}); stopping the others[/red]"
                )
                return 1
        return 0
    except RuntimeError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 1
    finally:
        await c.stop()


async def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from cuga.cli.runs import demo_run

    data_dir = Path(settings.common.data_dir)
    env = dict(os.environ)
    env.setdefault("CUGA_DATA_DIR", str(data_dir))
    env.setdefault("CUGA_LOG_LEVEL", "WARNING")  # the demo's own output tells the story
    console.print(f"[bold]cuga demo[/bold]: starting six services (data in {data_dir}/)")
    with contextlib.suppress(KeyboardInterrupt):
        async with cluster(settings, env, tls=args.tls) as c:  # makes the local credentials
            console.print(_table(c.settings, c.procs))
            if c.tls is not None:
                console.print(f"mutual TLS: certificates in {c.tls.folder}/", highlight=False)
            return await demo_run(
                c.settings, reviewer_token=c.token("reviewer"), env=c.client_env()
            )
    return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve``, ``up`` and ``demo``."""
    p = sub.add_parser("serve", help="serve one service until SIGTERM (what a container runs)")
    p.add_argument("service", choices=SERVICE_NAMES)
    p.add_argument("--port", type=int, default=None, help="port to bind (default: configured)")
    p.set_defaults(handler=_serve)
    tls_help = "mutual TLS between everything, with a local CA made once under <data_dir>/tls"
    p = sub.add_parser("up", help="run all six services, one process each, until Ctrl-C")
    p.add_argument("--tls", action="store_true", help=tls_help)
    p.set_defaults(handler=_up)
    p = sub.add_parser("demo", help="start everything, run a sample orchestration, stop")
    p.add_argument("--tls", action="store_true", help=tls_help)
    p.set_defaults(handler=_demo)
