"""Start real services through the production bootstrap on 127.0.0.1:0."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from opentelemetry.sdk.trace import SpanProcessor

from cuga.shared.auth import (
    ROLE_AUDITOR,
    ROLE_CLIENT,
    ROLE_COORDINATOR,
    ROLE_PLANNER,
    ROLE_REVIEWER,
    ROLE_SERVICE,
    ROLE_WORKER,
    ROLES,
    AuthConfig,
    TokenEntry,
    bearer_metadata,
    hash_token,
)
from cuga.shared.bootstrap import Builder, RunningServer, start_server
from cuga.shared.config import Settings, load_settings
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
}


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
            hash_token(token_of(name)): TokenEntry(name, roles, profiles)
            for name, (roles, profiles) in TEST_IDENTITIES.items()
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
        }
        for name, (roles, profiles) in TEST_IDENTITIES.items()
    }
    path.write_text(yaml.safe_dump({"tokens": tokens}), encoding="utf-8")
    return path


def make_settings(data_dir: Path, env: dict[str, str] | None = None) -> Settings:
    """Defaults (plus ``env`` overrides) with data under ``data_dir``; no file, no $CUGA_*.

    Auth is on with the test identities (unless ``env`` turns it off); each service
    started by :func:`running_service` sends the token of its own name.
    """
    settings = load_settings(env=env or {})
    auth = settings.common.auth
    if auth.enabled and not auth.tokens and auth.tokens_file is None:
        auth = dataclasses.replace(auth_config(), token=auth.token, token_file=auth.token_file)
    return settings.with_overrides(data_dir=data_dir, grace_period_s=5.0, auth=auth)


def as_service(settings: Settings, name: str) -> Settings:
    """``settings`` for service ``name``: it sends its own test token, unless one is set."""
    auth = settings.common.auth
    known = auth.tokens.get(hash_token(token_of(name))) if name in TEST_IDENTITIES else None
    if auth.token or auth.token_file is not None or known is None:
        return settings  # not the test identities' setup, or a token chosen by the test
    return settings.with_overrides(auth=dataclasses.replace(auth, token=token_of(name)))


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
) -> AsyncIterator[RunningServer]:
    """A service built and started exactly as ``cuga serve`` does, on a free port.

    ``telemetry_env`` replaces ``os.environ`` as the source of the ``OTEL_*`` variables
    (tests point the exporters at an in-process receiver without touching the process).
    """
    telemetry = setup_telemetry(f"cuga-{name}", span_processors=span_processors, env=telemetry_env)
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
) -> AsyncIterator[Cluster]:
    """All six services in this process, each through the production bootstrap on :0.

    ``workers`` gives one ``worker:`` section override per worker to start (e.g.
    ``{"worker_id": "w-math", "tools": ["calculator"]}``); the first is ``servers["worker"]``,
    the others ``servers["worker-2"]``, ``servers["worker-3"]`` ...
    """
    from contextlib import AsyncExitStack

    build = builders()
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
