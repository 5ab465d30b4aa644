"""``cuga console``: the web console, its own process, until Ctrl-C (docs/console.md).

It talks to the coordinator, approval and audit services of the configured cluster
(``addresses``, and ``tls`` when the cluster runs mutual TLS) with each signed-in user's
own token; it holds no credential of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cuga.cli._output import ConfigProblem, json_line, out
from cuga.shared.config import ConfigError, Settings

if TYPE_CHECKING:
    from cuga.console import ConsoleConfig

# The console's web stack (Starlette, uvicorn, Jinja) is imported by the command that runs
# it: every process imports this module with the CLI (each service does), and would pay
# ~0.1 s for a server it never starts.

#: Where the console listens unless told otherwise (beside the services' 50051-50056).
DEFAULT_PORT = 8080
#: Environment variable that changes the default port (as ``--port`` does).
PORT_ENV = "CUGA_CONSOLE_PORT"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def console_url(config: ConsoleConfig, port: int | None = None) -> str:
    """The address a browser opens."""
    host = config.host if config.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    scheme = "https" if config.https else "http"
    return f"{scheme}://{host}:{port if port is not None else config.port}/"


def config_of(args: argparse.Namespace) -> ConsoleConfig:
    from cuga.console import ConsoleConfig

    try:
        return ConsoleConfig(
            host=args.host,
            port=args.port,
            tls_cert_file=Path(args.tls_cert) if args.tls_cert else None,
            tls_key_file=Path(args.tls_key) if args.tls_key else None,
            secure_cookies=True if args.secure_cookies else None,
            audit_public_key=args.audit_key or None,
        )
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from None


def _server(config: Any) -> Any:
    """uvicorn's server, ending like the services: SIGTERM or Ctrl-C drains it and the
    command exits 0 (uvicorn re-raises the signal after draining by default)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server(config)


async def serve(config: ConsoleConfig, settings: Settings, sock: socket.socket) -> None:
    """Serve the console on a bound socket until the server is told to exit."""
    import uvicorn

    from cuga.console import Backend, build_app

    backend = Backend(settings, config.audit_public_key)
    app = build_app(config, backend)
    server = _server(
        uvicorn.Config(
            app,
            log_level="warning",
            ssl_certfile=str(config.tls_cert_file) if config.tls_cert_file else None,
            ssl_keyfile=str(config.tls_key_file) if config.tls_key_file else None,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
        )
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        await backend.close()


def bind(config: ConsoleConfig) -> socket.socket:
    """The listening socket (so a port in use is a configuration error, and :0 works)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
    except OSError as exc:
        sock.close()
        raise ConfigProblem(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror}; "
            "choose another with --port"
        ) from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tokens_folder(settings: Settings) -> str:
    """Where ``cuga up`` keeps the local people's tokens."""
    return str(Path(settings.common.data_dir).absolute() / "tokens")


async def _console(args: argparse.Namespace, settings: Settings) -> int:
    config = config_of(args)
    sock = bind(config)
    url = console_url(config, sock.getsockname()[1])
    if args.json:
        json_line({"console": url})
    else:
        tokens = tokens_folder(settings)
        out().print(
            f"cuga console on {url} — sign in with your tokens (local ones: {tokens}/); "
            "Ctrl-C stops it",
            highlight=False,
            soft_wrap=True,
        )
    try:
        await serve(config, settings, sock)
    except asyncio.CancelledError:
        pass
    finally:
        sock.close()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``console``."""
    p = sub.add_parser(
        "console", help="the web console: runs, approvals, audit in a browser (docs/console.md)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get(PORT_ENV) or DEFAULT_PORT),
        help=f"port (default ${PORT_ENV}, else {DEFAULT_PORT}; 0: any free one)",
    )
    p.add_argument("--tls-cert", default="", help="PEM certificate: serve HTTPS (Secure cookie)")
    p.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    p.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark the session cookie Secure without --tls-cert (behind a TLS proxy)",
    )
    p.add_argument(
        "--audit-key",
        default="",
        help="pinned audit checkpoint key (ed25519:...) for inclusion proofs",
    )
    p.add_argument("--json", action="store_true", help="print the address as a JSON line")
    p.set_defaults(handler=_console)
