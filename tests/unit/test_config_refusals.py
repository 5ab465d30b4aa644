"""Configuration a service cannot run with is refused at start, naming the key (issue 24).

Each case goes through the production path: :func:`load_settings` (file or ``CUGA_*``
variables) then ``Settings.section`` with the service's own dataclass, as every service's
``app.build`` does. A bad value names its full key (``coordinator.window``) and what is
wrong; the nearest good value on the other side of each bound is accepted, so a bound that
moved would fail here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cuga.services.approval.config import ApprovalConfig
from cuga.services.audit.config import AuditConfig
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.services.planning.config import PlanningConfig
from cuga.services.worker.config import WorkerConfig
from cuga.shared.config import (
    CommonConfig,
    ConfigError,
    Settings,
    build_dataclass,
    load_settings,
    target_endpoints,
)

SECTIONS: dict[str, type[Any]] = {
    "coordinator": CoordinatorConfig,
    "approval": ApprovalConfig,
    "audit": AuditConfig,
    "worker": WorkerConfig,
    "planning": PlanningConfig,
}


def section(env: dict[str, str]) -> Any:
    """The one section the variables in ``env`` configure, built as its service builds it."""
    (name,) = {var.split("__")[0].removeprefix("CUGA_").lower() for var in env}
    return load_settings(env=env).section(SECTIONS[name], name)


# (variable, refused value, the key named, the problem, an accepted value just inside)
REFUSED = [
    # coordinator
    ("CUGA_COORDINATOR__RUN_TIMEOUT_S", "0", "run_timeout_s", "must be > 0", "0.5"),
    ("CUGA_COORDINATOR__ADOPT_INTERVAL_S", "0.09", "adopt_interval_s", "0 or between", "0"),
    ("CUGA_COORDINATOR__ADOPT_INTERVAL_S", "3601", "adopt_interval_s", "0 or between", "3600"),
    ("CUGA_COORDINATOR__PARALLELISM", "0", "parallelism", "between 1 and 64", "1"),
    ("CUGA_COORDINATOR__PARALLELISM", "65", "parallelism", "between 1 and 64", "64"),
    ("CUGA_COORDINATOR__AUDIT_BATCH", "1001", "audit_batch", "between 1 and 1000", "1000"),
    ("CUGA_COORDINATOR__AUDIT_LINGER_S", "5.5", "audit_linger_s", "between 0 and 5", "5"),
    ("CUGA_COORDINATOR__CANCEL_WAIT_S", "-1", "cancel_wait_s", "between 0 and 60", "0"),
    (
        "CUGA_COORDINATOR__AUDIT_CLOSE_TIMEOUT_S",
        "61",
        "audit_close_timeout_s",
        "between 0 and 60",
        "60",
    ),
    ("CUGA_COORDINATOR__WINDOW", "257", "window", "between 1 and 256", "256"),
    ("CUGA_COORDINATOR__ROUTE_TTL_S", "0", "route_ttl_s", "must be > 0", "0.01"),
    ("CUGA_COORDINATOR__RETRY_BASE_DELAY_S", "0", "retry_base_delay_s", "> 0", "0.01"),
    ("CUGA_COORDINATOR__RETRY_MULTIPLIER", "0.9", "retry_multiplier", ">= 1", "1"),
    (
        "CUGA_COORDINATOR__RETRY_MAX_DELAY_S",
        "0.5",
        "retry_max_delay_s",
        ">= retry_base_delay_s",
        "1",
    ),
    ("CUGA_COORDINATOR__RETRY_MAX_ATTEMPTS", "21", "retry_max_attempts", "1 and 20", "20"),
    (
        "CUGA_COORDINATOR__MAX_STREAMS_PER_IDENTITY",
        "0",
        "max_streams_per_identity",
        "between 1 and 100000",
        "100000",
    ),
    (
        "CUGA_COORDINATOR__MAX_FINISHING_RUNS",
        "100001",
        "max_finishing_runs",
        "between 1 and 100000",
        "1",
    ),
    ("CUGA_COORDINATOR__RUN_STORE", "mysql", "run_store", "one of sqlite, postgres", "sqlite"),
    # approval
    ("CUGA_APPROVAL__RECHECK_S", "0.04", "recheck_s", "between 0.05 and 300", "0.05"),
    ("CUGA_APPROVAL__RECHECK_S", ".nan", "recheck_s", "between 0.05 and 300", "300"),
    ("CUGA_APPROVAL__DEFAULT_TIMEOUT_S", "0", "default_timeout_s", "seconds > 0", "0.1"),
    ("CUGA_APPROVAL__DEFAULT_TIMEOUT_S", ".inf", "default_timeout_s", "seconds > 0", "1000000.0"),
    ("CUGA_APPROVAL__MAX_PENDING_PER_PROFILE", "0", "max_pending_per_profile", ">= 1", "1"),
    # audit
    ("CUGA_AUDIT__JSONL_ROTATE_BYTES", "1023", "jsonl_rotate_bytes", "at least 1024", "1024"),
    ("CUGA_AUDIT__RETENTION_DAYS", "-1", "retention_days", "must be >= 0", "0"),
    ("CUGA_AUDIT__PRUNE_INTERVAL_S", "0", "prune_interval_s", "must be > 0", "0.5"),
    ("CUGA_AUDIT__MAX_BATCH", "0", "max_batch", "between 1 and 1000", "1"),
    ("CUGA_AUDIT__MAX_BATCH", "1001", "max_batch", "between 1 and 1000", "1000"),
    ("CUGA_AUDIT__CHECKPOINT_INTERVAL_S", "-1", "checkpoint_interval_s", "must be > 0", "1"),
    ("CUGA_AUDIT__CHECKPOINT_ORIGIN", "my log", "checkpoint_origin", "spaces or '+'", "my-log"),
    ("CUGA_AUDIT__CHECKPOINT_ORIGIN", "a+b", "checkpoint_origin", "spaces or '+'", "a/b"),
    ("CUGA_AUDIT__FSYNC", "sometimes", "fsync", "must be one of", "batch"),
    # worker
    ("CUGA_WORKER__WORKER_ID", "a b", "worker_id", "'a b' is not a valid id", "a.b:c-1"),
    ("CUGA_WORKER__TOOL_ALLOWLIST", "[ok, 1bad]", "tool_allowlist", "'1bad' is not a", "[a.b]"),
    ("CUGA_WORKER__ADVERTISE_ADDRESS", "host", "advertise_address", "host:port", "h:1"),
    ("CUGA_WORKER__ADVERTISE_ADDRESS", ":50056", "advertise_address", "host:port", "h:50056"),
    (
        "CUGA_WORKER__ROUTING_ADDRESSES",
        "[a:1, b:x]",
        "routing_addresses",
        "'b:x': expected host:port",
        "[a:1, b:2]",
    ),
    ("CUGA_WORKER__HEARTBEAT_INTERVAL_S", "301", "heartbeat_interval_s", "0.05 and 300", "300"),
    (
        "CUGA_WORKER__REGISTRATION_BACKOFF_INITIAL_S",
        "0",
        "registration_backoff_initial_s",
        "must be > 0",
        "0.1",
    ),
    (
        "CUGA_WORKER__REGISTRATION_BACKOFF_MAX_S",
        "0.1",
        "registration_backoff_max_s",
        ">= the initial delay",
        "0.5",
    ),
    ("CUGA_WORKER__MAX_IN_FLIGHT", "0", "max_in_flight", "between 1 and 100000", "1"),
    ("CUGA_WORKER__TOOL_PROCESSES", "1025", "tool_processes", "between 0 and 1024", "0"),
    ("CUGA_WORKER__OVERRUN_GRACE_S", "60.5", "overrun_grace_s", "between 0 and 60", "60"),
    ("CUGA_WORKER__MAX_THREADS", "0", "max_threads", "between 1 and 1024", "1024"),
    ("CUGA_WORKER__PROFILE_TOOLS", "{p: {allow: 3}}", "profile_tools.p.allow", "a list", "{}"),
    # planning's llm planner
    (
        "CUGA_PLANNING__LLM__BASE_URL",
        "ftp://x/v1",
        "llm.base_url",
        "not an http(s) URL",
        "http://h/v1",
    ),
    ("CUGA_PLANNING__LLM__TIMEOUT_S", "0.04", "llm.timeout_s", "between 0.05 and 600", "0.05"),
    ("CUGA_PLANNING__LLM__MAX_TOKENS", "15", "llm.max_tokens", "between 16 and 65536", "16"),
    ("CUGA_PLANNING__LLM__TEMPERATURE", "2.1", "llm.temperature", "between 0 and 2", "2"),
    (
        "CUGA_PLANNING__LLM__PROMPT_TOKEN_PRICE",
        "-0.1",
        "llm.prompt_token_price",
        "a finite number >= 0",
        "0",
    ),
    (
        "CUGA_PLANNING__LLM__COMPLETION_TOKEN_PRICE",
        ".inf",
        "llm.completion_token_price",
        "a finite number >= 0",
        "0.5",
    ),
    ("CUGA_PLANNING__LLM__REPAIR_ROUNDS", "2", "llm.repair_rounds", "must be 0 or 1", "0"),
    ("CUGA_PLANNING__PLANNER", "llm", "llm.model", "required when planner is llm", "keyword"),
]


@pytest.mark.parametrize(
    ("var", "bad", "key", "problem", "good"),
    REFUSED,
    ids=[f"{case[0].lower()}={case[1]}" for case in REFUSED],
)
def test_a_service_refuses_a_bad_value_naming_its_key(
    var: str, bad: str, key: str, problem: str, good: str
) -> None:
    name = var.split("__")[0].removeprefix("CUGA_").lower()
    with pytest.raises(ConfigError) as info:
        section({var: bad})
    assert info.value.key == f"{name}.{key}"
    assert problem in info.value.problem
    assert f"configuration key '{name}.{key}'" in str(info.value)
    section({var: good})  # the other side of the bound is a working configuration


@pytest.mark.parametrize(
    ("name", "store_key"),
    [("coordinator", "run_store"), ("approval", "store"), ("audit", "backend")],
)
def test_postgres_storage_needs_a_dsn(name: str, store_key: str) -> None:
    for dsn in ("", "  "):
        settings = Settings(CommonConfig(), {name: {store_key: "postgres", "dsn": dsn}})
        with pytest.raises(ConfigError) as info:
            settings.section(SECTIONS[name], name)
        assert info.value.key == f"{name}.dsn"
        assert info.value.problem == f"is required when {store_key} is postgres"
    prefix = f"CUGA_{name.upper()}__"
    config = section({prefix + store_key.upper(): "postgres", prefix + "DSN": "host=db"})
    assert config.dsn == "host=db"


# -- the common keys and the loader ---------------------------------------------------------


def test_a_file_that_is_not_yaml_is_refused_with_its_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "cuga.yaml"
    path.write_text("data_dir: /srv\nrouting: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.key == "config"
    # PyYAML's own text would name "<unicode string>", not the file
    assert f"not valid YAML: {path} line 3 column 1: " in info.value.problem
    assert "unicode string" not in str(info.value)
    # an error with no context of its own, and one YAML reports with no line
    path.write_text("a: b: c\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problem == (
        f"not valid YAML: {path} line 1 column 5: mapping values are not allowed here"
    )
    path.write_text("host: x\x00\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problem.startswith(f"not valid YAML: {path}: unacceptable character")


def test_a_file_must_hold_a_mapping_and_so_must_each_section(tmp_path: Path) -> None:
    path = tmp_path / "cuga.yaml"
    path.write_text("- data_dir\n- host\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_settings(path, env={})
    path.write_text("routing: round_robin\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert (info.value.key, info.value.problem) == ("routing", "must be a mapping")
    path.write_text("calls: 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert (info.value.key, info.value.problem) == ("calls", "must be a mapping")
    path.write_text("")  # an empty file is the defaults
    assert load_settings(path, env={}).common == CommonConfig()


def test_the_config_file_comes_from_cuga_config(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.yaml"
    path.write_text("host: 0.0.0.0\n")
    settings = load_settings(env={"CUGA_CONFIG": str(path)})
    assert (settings.common.host, settings.source) == ("0.0.0.0", str(path))


def test_environment_overrides_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CUGA_WORKER__TOOLS": "[a, b"})
    assert info.value.key == "worker.tools"
    assert "not a valid value: $CUGA_WORKER__TOOLS line 1 column" in info.value.problem
    # a nested override under a key that already holds a scalar
    with pytest.raises(ConfigError) as info:
        load_settings(env={"CUGA_HOST__NAME": "x", "CUGA_HOST": "h"})
    assert info.value.key == "host.name"
    assert "$CUGA_HOST__NAME overrides a non-mapping" in info.value.problem
    # CUGA_* variables that are no configuration key (tokens, switches) are left alone
    settings = load_settings(env={"CUGA_TOKEN": "secret", "CUGA_DATA_DIR": ""})
    assert settings.common.data_dir == Path("")


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        ({"CUGA_AUTH__ENABLED": "maybe"}, "auth.enabled", "must be true or false, got 'maybe'"),
        ({"CUGA_CALLS__WORKER__TIMEOUT_S": "true"}, "calls.worker.timeout_s", "a number"),
        ({"CUGA_LIMITS__MAX_STEPS": "true"}, "limits.max_steps", "must be an integer"),
        ({"CUGA_HOST": "[a]"}, "host", "must be a string, got ['a']"),
        ({"CUGA_DATA_DIR": "{a: 1}"}, "data_dir", "must be a path"),
        (
            {"CUGA_CALLS__WORKER__RETRY__RETRYABLE_STATUS_CODES": "7"},
            "calls.worker.retry.retryable_status_codes",
            "must be a list, got 7",
        ),
        ({"CUGA_HEALTH_PORT": "65536"}, "health_port", "a port number, 0 to 65535"),
        ({"CUGA_MAX_CONNECTION_AGE_S": "0.5"}, "max_connection_age_s", "0 (never) or >= 1"),
        (
            {"CUGA_CALLS__AUDIT__RETRY__MAX_BACKOFF_S": "0.01"},
            "calls.audit.retry.max_backoff_s",
            "need 0 < initial_backoff_s <= max_backoff_s",
        ),
        (
            {"CUGA_CALLS__AUDIT__RETRY__BACKOFF_MULTIPLIER": "0"},
            "calls.audit.retry.backoff_multiplier",
            "must be > 0",
        ),
        ({"CUGA_ADDRESSES__AUDIT": "dns:///a/b:1"}, "addresses.audit", "expected host:port"),
        (
            {"CUGA_ADDRESSES__AUDIT": "ipv4:1.2.3.4:1,5.6.7.8:70000"},
            "addresses.audit",
            "expected host:port",
        ),
    ],
)
def test_a_bad_common_value_names_its_key(env: dict[str, str], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key
    assert problem in info.value.problem


def test_balancing_targets_name_every_server() -> None:
    assert target_endpoints("dns:///coordinator.cuga:50051") == [("coordinator.cuga", "50051")]
    assert target_endpoints("ipv4:10.0.0.1:1,10.0.0.2:2") == [("10.0.0.1", "1"), ("10.0.0.2", "2")]
    settings = load_settings(env={"CUGA_ADDRESSES__PLANNING": "dns:///planning:7000"})
    assert settings.common.addresses.of("planning") == "dns:///planning:7000"
    assert settings.common.addresses.port_of("planning") == 7000


def test_auth_without_a_signing_key_or_tls_cannot_make_calls(tmp_path: Path) -> None:
    common = load_settings(env={}).common
    with pytest.raises(ConfigError) as info:
        common.client_security("coordinator")
    assert info.value.key == "auth.signing_key_file"
    assert "coordinator calls other services" in info.value.problem
    # auth switched off: calls go out without a token
    off = load_settings(env={"CUGA_AUTH__ENABLED": "false"}).common.client_security("worker")
    assert off["signer"] is None


def test_build_dataclass_refuses_what_is_not_a_mapping_at_the_root() -> None:
    with pytest.raises(ConfigError) as info:
        build_dataclass(CommonConfig, ["host"], "")  # type: ignore[arg-type]
    assert (info.value.key, info.value.problem) == ("<root>", "must be a mapping")
    settings = Settings(
        common=CommonConfig(),
        sections={"worker": {"worker_id": 5, "capabilities": "gpu, fast,", "profile_tools": {}}},
    )
    # a number is a valid string value (YAML reads worker_id: 5 as an integer)
    worker = settings.section(WorkerConfig, "worker")
    assert worker.worker_id == "5"
    # a list may be given as one comma-separated string (what an environment variable holds)
    assert worker.capabilities == ("gpu", "fast")
    settings = Settings(CommonConfig(), {"worker": {"profile_tools": ["p"]}})
    with pytest.raises(ConfigError) as info:
        settings.section(WorkerConfig, "worker")
    assert info.value.key == "worker.profile_tools"
    assert info.value.problem == "must be a mapping, got ['p']"


def test_an_optional_key_set_to_null_is_unset() -> None:
    assert load_settings(env={"CUGA_HEALTH_PORT": "null"}).common.health_port is None
    assert load_settings(env={"CUGA_HEALTH_PORT": "0"}).common.health_port == 0


@dataclass(frozen=True)
class _Odd:
    names: set[str] = field(default_factory=set)


def test_a_config_field_of_a_type_the_loader_cannot_read_fails_naming_it() -> None:
    # a bug in a section's dataclass shows at the first start, not as a wrong value
    with pytest.raises(ConfigError, match=r"'odd\.names': unsupported type set\[str\]"):
        build_dataclass(_Odd, {"names": ["a"]}, "odd")
