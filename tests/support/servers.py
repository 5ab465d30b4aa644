"""Start real services through the production bootstrap on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor

from cuga.client import WorkerClient
from cuga.client._base import BidiStream
from cuga.shared.auth import (
    ROLE_AUDITOR,
    ROLE_CLIENT,
    ROLE_COORDINATOR,
    ROLE_DELEGATE,
    ROLE_OPERATOR,
    ROLE_PLANNER,
    ROLE_REVIEWER,
    ROLE_SERVICE,
    ROLE_WORKER,
    ROLES,
    AuthConfig,
    SignerEntry,
    TokenEntry,
    bearer_metadata,
    hash_token,
)
from cuga.shared.bootstrap import Builder, RunningServer, start_server
from cuga.shared.config import Settings, load_settings
from cuga.shared.signing import (
    ServiceSigner,
    private_key_pem,
    public_key_text,
    step_digest,
    worker_audience,
)
from cuga.shared.telemetry import setup_telemetry

#: Identities every test cluster knows (auth is ON in tests, as in production):
#: name -> (roles, profiles). Each service runs as the identity of its name; tests call
#: as ``client`` (coordinator), ``reviewer``, ``auditor``, or as a service.
TEST_IDENTITIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coordinator": ((ROLE_COORDINATOR, ROLE_SERVICE), ()),
    "planning": ((ROLE_PLANNER, ROLE_SERVICE), ()),
    "routing": ((ROLE_SERVICE,), ()),
    "audit": ((ROLE_SERVICE,), ()),
    "approval": ((ROLE_SERVICE,), ()),
    "worker": ((ROLE_WORKER, ROLE_SERVICE), ()),
    "client": ((ROLE_CLIENT,), ()),
    "reviewer": ((ROLE_REVIEWER,), ()),
    "auditor": ((ROLE_AUDITOR,), ()),
    "operator": ((ROLE_OPERATOR,), ()),
    "nobody": ((), ()),
    # Every role at once: existing tests that act as several parties through one client.
    "tester": (ROLES, ()),
    # Profile-scoped identities (isolation tests).
    "client-a": ((ROLE_CLIENT,), ("tenant-a",)),
    "client-b": ((ROLE_CLIENT,), ("tenant-b",)),
    "auditor-a": ((ROLE_AUDITOR,), ("tenant-a",)),
    "auditor-b": ((ROLE_AUDITOR,), ("tenant-b",)),
    "coordinator-a": ((ROLE_COORDINATOR,), ("tenant-a",)),
    "coordinator-b": ((ROLE_COORDINATOR,), ("tenant-b",)),
    "reviewer-a": ((ROLE_REVIEWER,), ("tenant-a",)),
    # A person who both starts runs and reviews (separation of duties), and a gateway that
    # starts runs for the end users it names (the delegate role).
    "alice": ((ROLE_CLIENT, ROLE_REVIEWER), ()),
    "gateway": ((ROLE_CLIENT, ROLE_DELEGATE), ()),
}


#: Service identities that sign their calls (as in production): name -> (roles, worker
#: ids). The six services run as the identity of their name; ``worker-a``/``worker-b``
#: are workers that own only their own id (the attack tests' workers).
TEST_SIGNERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coordinator": ((ROLE_COORDINATOR, ROLE_SERVICE), ()),
    "planning": ((ROLE_PLANNER, ROLE_SERVICE), ()),
    "routing": ((ROLE_SERVICE,), ()),
    "audit": ((ROLE_SERVICE,), ()),
    "approval": ((ROLE_SERVICE,), ()),
    # Test clusters start workers with many ids under this one identity.
    "worker": ((ROLE_WORKER, ROLE_SERVICE), ("*",)),
    "worker-a": ((ROLE_WORKER, ROLE_SERVICE), ("worker-a",)),
    "worker-b": ((ROLE_WORKER, ROLE_SERVICE), ("worker-b",)),
}


def signing_key_of(identity: str) -> Ed25519PrivateKey:
    """The (fixed, test-only) signing key of one of :data:`TEST_SIGNERS`."""
    if identity not in TEST_SIGNERS:
        raise KeyError(identity)
    seed = hashlib.sha256(f"cuga-test-signer-{identity}".encode()).digest()
    return Ed25519PrivateKey.from_private_bytes(seed)


def signer_of(identity: str) -> ServiceSigner:
    """A signer minting ``identity``'s tokens, as its service would."""
    return ServiceSigner(identity, signing_key_of(identity))


def signed_as(identity: str, audience: str) -> tuple[tuple[str, str], ...]:
    """Call metadata with a token ``identity`` signed for ``audience`` (``planning``,
    ``worker:worker-1`` ...)."""
    return signer_of(identity).metadata(audience)


def token_of(identity: str) -> str:
    """The (fixed, test-only) bearer token of one of :data:`TEST_IDENTITIES`."""
    if identity not in TEST_IDENTITIES:
        raise KeyError(identity)
    return f"test-token-{identity}"


def as_identity(identity: str) -> tuple[tuple[str, str], ...]:
    """Call metadata of ``identity``: ``Client(address, metadata=as_identity("client"))``."""
    return bearer_metadata(token_of(identity))


def auth_config() -> AuthConfig:
    """Auth ON with every :data:`TEST_IDENTITIES` token."""
    return AuthConfig(
        enabled=True,
        tokens={
            hash_token(token_of(name)): TokenEntry(
                name, roles, profiles, ("*",) if ROLE_WORKER in roles else ()
            )
            for name, (roles, profiles) in TEST_IDENTITIES.items()
        },
        signers={
            name: SignerEntry(public_key_text(signing_key_of(name)), roles, (), worker_ids)
            for name, (roles, worker_ids) in TEST_SIGNERS.items()
        },
    )


def write_tokens_file(path: Path) -> Path:
    """Write the test identities as an ``auth.tokens_file`` (for services run as processes)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {
        hash_token(token_of(name)): {
            "identity": name,
            "roles": list(roles),
            "profiles": list(profiles),
            "worker_ids": ["*"] if ROLE_WORKER in roles else [],
        }
        for name, (roles, profiles) in TEST_IDENTITIES.items()
    }
    signers = {
        name: {
            "public_key": public_key_text(signing_key_of(name)),
            "roles": list(roles),
            "worker_ids": list(worker_ids),
        }
        for name, (roles, worker_ids) in TEST_SIGNERS.items()
    }
    path.write_text(yaml.safe_dump({"tokens": tokens, "signers": signers}), encoding="utf-8")
    return path


def service_env(identity: str) -> dict[str, str]:
    """``CUGA_AUTH__*`` variables that make a service process sign as ``identity``."""
    return {
        "CUGA_AUTH__IDENTITY": identity,
        "CUGA_AUTH__SIGNING_KEY": private_key_pem(signing_key_of(identity)),
    }


@dataclasses.dataclass(frozen=True)
class Storage:
    """Where the stores that can be shared live: the ``storage`` fixture's parameter.

    ``sqlite``: every store in its file under the data directory (the defaults).
    ``postgres``: the coordinator's run store, planning's plans and memory, approval's
    requests and audit's records in one fresh database of the session's cluster
    (``dsn``), as replicas share them in production.
    """

    backend: str = "sqlite"
    dsn: str = ""

    #: section -> the key that chooses its store (each section's ``dsn`` goes with it).
    KEYS: ClassVar[dict[str, str]] = {
        "coordinator": "run_store",
        "planning": "store",
        "approval": "store",
        "audit": "backend",
    }

    def apply(self, settings: Settings) -> Settings:
        """``settings`` with every store on this backend."""
        if self.backend == "sqlite":
            return settings
        for section, key in self.KEYS.items():
            settings = with_section(settings, section, **{key: self.backend, "dsn": self.dsn})
        return settings

    def env(self) -> dict[str, str]:
        """The same as ``CUGA_*`` variables, for a service run as a process."""
        if self.backend == "sqlite":
            return {}
        env: dict[str, str] = {}
        for section, key in self.KEYS.items():
            env[f"CUGA_{section.upper()}__{key.upper()}"] = self.backend
            env[f"CUGA_{section.upper()}__DSN"] = self.dsn
        return env


def make_settings(
    data_dir: Path, env: dict[str, str] | None = None, storage: Storage | None = None
) -> Settings:
    """Defaults (plus ``env`` overrides) with data under ``data_dir``; no file, no $CUGA_*.

    Auth is on with the test identities (unless ``env`` turns it off); each service
    started by :func:`running_service` sends the token of its own name. ``storage`` (the
    ``storage`` fixture) puts the shareable stores on its backend.
    """
    settings = load_settings(env=env or {})
    auth = settings.common.auth
    if auth.enabled and not auth.tokens and not auth.signers and auth.tokens_file is None:
        auth = dataclasses.replace(
            auth_config(),
            identity=auth.identity,
            signing_key=auth.signing_key,
            signing_key_file=auth.signing_key_file,
        )
    settings = settings.with_overrides(data_dir=data_dir, grace_period_s=5.0, auth=auth)
    return storage.apply(settings) if storage is not None else settings


def as_service(settings: Settings, name: str, identity: str | None = None) -> Settings:
    """``settings`` for service ``name``: it signs as ``identity`` (default: its own name)
    with its test key, unless the test set a key itself."""
    auth = settings.common.auth
    identity = identity or auth.identity or name
    if auth.signing_key or auth.signing_key_file is not None or identity not in TEST_SIGNERS:
        return settings  # a key chosen by the test, or not a test service identity
    trusted = identity in auth.signers or auth.tokens_file is not None
    if settings.common.tls.enabled and not trusted:
        return settings  # certificates alone identify the services of this test
    return settings.with_overrides(
        auth=dataclasses.replace(
            auth, identity=identity, signing_key=private_key_pem(signing_key_of(identity))
        )
    )


def with_address(settings: Settings, service: str, address: str) -> Settings:
    """Settings in which ``service`` is reached at ``address``."""
    addresses = dataclasses.replace(settings.common.addresses, **{service: address})
    return settings.with_overrides(addresses=addresses)


@asynccontextmanager
async def running_service(
    name: str,
    builder: Builder,
    settings: Settings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    telemetry_env: Mapping[str, str] | None = None,
    metric_readers: Sequence[MetricReader] = (),
) -> AsyncIterator[RunningServer]:
    """A service built and started exactly as ``cuga serve`` does, on a free port.

    ``telemetry_env`` replaces ``os.environ`` as the source of the ``OTEL_*`` variables
    (tests point the exporters at an in-process receiver without touching the process);
    ``metric_readers`` are added to its meter provider (an in-memory reader).
    """
    telemetry = setup_telemetry(
        f"cuga-{name}",
        span_processors=span_processors,
        metric_readers=metric_readers,
        env=telemetry_env,
    )
    settings = as_service(settings, name)
    definition = await builder(settings, telemetry)
    server = await start_server(definition, settings.common, port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


#: Start order and the services each one must know the address of (audit first: every
#: service sends its access_denied records there).
CLUSTER_ORDER = ("audit", "routing", "approval", "worker", "planning", "coordinator")


def builders() -> dict[str, Builder]:
    """Every service's production builder, by name."""
    from cuga.services.approval.app import build as approval
    from cuga.services.audit.app import build as audit
    from cuga.services.coordinator.app import build as coordinator
    from cuga.services.planning.app import build as planning
    from cuga.services.routing.app import build as routing
    from cuga.services.worker.app import build as worker

    return {
        "routing": routing,
        "audit": audit,
        "approval": approval,
        "worker": worker,
        "planning": planning,
        "coordinator": coordinator,
    }


@asynccontextmanager
async def authorities_in_process(
    settings: Settings, tools: Sequence[Any]
) -> AsyncIterator[Settings]:
    """Routing, audit, approval, a worker with ``tools`` and planning in this process (a
    coordinator runs as a process of its own: :func:`coordinator_process`); the settings
    that point at them."""
    from cuga.services.worker.app import build_worker

    build = builders()
    build["worker"] = functools.partial(build_worker, tools=tools)
    async with AsyncExitStack() as stack:
        for name in ("routing", "audit", "approval", "worker", "planning"):
            server = await stack.enter_async_context(running_service(name, build[name], settings))
            settings = with_address(settings, name, server.address)
        yield settings


_SERVING = re.compile(r"coordinator serving on (\S+)")
_DRAINS: set[asyncio.Future[bytes]] = set()  # readers of the children's logs


async def coordinator_process(
    settings: Settings, data_dir: Path, env: Mapping[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str]:
    """``cuga serve coordinator`` as a child process on a free port, signing as the
    coordinator, its data under ``data_dir``, calling the services ``settings`` point at;
    ``env`` adds ``CUGA_*`` variables. Returns the process and its address once it serves
    (its log is drained from then on, so it never blocks on a full pipe)."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(("CUGA_", "OTEL_"))}
    child["CUGA_DATA_DIR"] = str(data_dir)
    child["CUGA_AUTH__TOKENS_FILE"] = str(write_tokens_file(data_dir / "tokens.yaml"))
    child.update(service_env("coordinator"))
    for name in ("planning", "routing", "audit", "approval", "worker"):
        child[f"CUGA_ADDRESSES__{name.upper()}"] = settings.common.addresses.of(name)
    child.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cuga.cli.main",
        "serve",
        "coordinator",
        "--port",
        "0",
        env=child,
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
        assert line, "the coordinator exited before serving"
        if match := _SERVING.search(line):
            drain = asyncio.ensure_future(proc.stderr.read())
            _DRAINS.add(drain)
            drain.add_done_callback(_DRAINS.discard)
            return proc, match.group(1)


@dataclasses.dataclass
class Cluster:
    """Six running services and the settings that point at them."""

    servers: dict[str, RunningServer]
    settings: Settings

    def address(self, name: str) -> str:
        """Where ``name`` listens."""
        return self.servers[name].address

    def metadata(self, identity: str = "client") -> tuple[tuple[str, str], ...]:
        """Call metadata of a test identity (as :meth:`cuga.cli.up.Cluster.metadata`)."""
        return as_identity(identity)


def with_section(settings: Settings, name: str, **values: object) -> Settings:
    """Settings whose section ``name`` has ``values`` on top of what it had."""
    sections = {**settings.sections, name: {**settings.sections.get(name, {}), **values}}
    return dataclasses.replace(settings, sections=sections)


@asynccontextmanager
async def running_cluster(
    settings: Settings,
    *,
    span_processors: Sequence[SpanProcessor] = (),
    workers: Sequence[dict[str, object]] = ({},),
    telemetry_env: Mapping[str, str] | None = None,
    build: Mapping[str, Builder] | None = None,
) -> AsyncIterator[Cluster]:
    """All six services in this process, each through the production bootstrap on :0.

    ``workers`` gives one ``worker:`` section override per worker to start (e.g.
    ``{"worker_id": "w-math", "tools": ["calculator"]}``); the first is ``servers["worker"]``,
    the others ``servers["worker-2"]``, ``servers["worker-3"]`` ...; ``build`` replaces the
    production builders (a test wrapping them).
    """
    from contextlib import AsyncExitStack

    build = build or builders()
    servers: dict[str, RunningServer] = {}
    async with AsyncExitStack() as stack:
        for name in CLUSTER_ORDER:
            if name == "worker":
                for i, section in enumerate(workers):
                    key = "worker" if i == 0 else f"worker-{i + 1}"
                    servers[key] = await stack.enter_async_context(
                        running_service(
                            "worker",
                            build["worker"],
                            with_section(settings, "worker", **section),
                            span_processors=span_processors,
                            telemetry_env=telemetry_env,
                        )
                    )
                settings = with_address(settings, "worker", servers["worker"].address)
                continue
            server = await stack.enter_async_context(
                running_service(
                    name,
                    build[name],
                    settings,
                    span_processors=span_processors,
                    telemetry_env=telemetry_env,
                )
            )
            servers[name] = server
            settings = with_address(settings, name, server.address)
        yield Cluster(servers, settings)


def grant(request: Any, worker_id: str = "worker-1", identity: str = "coordinator") -> Any:
    """Sign ``request``'s step grant for ``worker_id`` as ``identity``, as the coordinator's
    worker pool does; returns the request."""
    request.grant = ""
    request.grant = signer_of(identity).step_grant(
        worker_audience(worker_id), request.idempotency_key, step_digest(request), time.time() + 60
    )
    return request


class _GrantingStream:
    """A step stream whose requests are granted as they are written."""

    def __init__(self, stream: BidiStream, worker_id: str) -> None:
        self._stream = stream
        self._worker_id = worker_id

    async def write(self, message: Any) -> None:
        if message.HasField("request") and not message.request.grant:
            grant(message.request, self._worker_id)
        await self._stream.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class CoordinatorWorkerClient(WorkerClient):
    """A worker client that calls as the coordinator: a token signed for the worker's
    audience on every call and a grant on every step that has none."""

    def __init__(self, address: str, worker_id: str = "worker-1", **kwargs: Any) -> None:
        kwargs.setdefault("signer", signer_of("coordinator"))
        super().__init__(address, audience=worker_audience(worker_id), **kwargs)
        self.worker_id = worker_id

    async def execute_step(self, request: Any, **kwargs: Any) -> Any:
        if not request.grant:
            grant(request, self.worker_id)
        return await super().execute_step(request, **kwargs)

    def execute_steps(self, **kwargs: Any) -> Any:
        return _GrantingStream(super().execute_steps(**kwargs), self.worker_id)
