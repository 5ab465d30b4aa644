"""Typed configuration: file, environment overrides, errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cuga.shared.config import ConfigError, load_settings


def test_defaults_need_no_file() -> None:
    settings = load_settings(env={})
    assert settings.common.addresses.coordinator.endswith(":50051")
    assert settings.common.addresses.worker.endswith(":50056")


def test_file_and_env_override(tmp_path: Path) -> None:
    path = tmp_path / "cuga.yaml"
    path.write_text("data_dir: /srv/cuga\nrouting:\n  default_policy: capability\n")
    settings = load_settings(
        path,
        env={
            "CUGA_ROUTING__DEFAULT_POLICY": "load_balanced",
            "CUGA_CALLS__WORKER__TIMEOUT_S": "2.5",
        },
    )
    assert settings.common.data_dir == Path("/srv/cuga")
    assert settings.sections["routing"]["default_policy"] == "load_balanced"
    assert settings.common.calls.worker.timeout_s == 2.5


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CUGA_CALLS__WORKER__TIMEOUT_S": "-1"}, "calls.worker.timeout_s"),
        ({"CUGA_ADDRESSES__WORKER": "nowhere"}, "addresses.worker"),
        ({"CUGA_LIMITS__MAX_STEPS": "many"}, "limits.max_steps"),
        ({"CUGA_CALLS__WORKER__BOGUS": "1"}, "calls.worker.bogus"),
        ({"CUGA_LOG_FORMAT": "xml"}, "log_format"),
        ({"CUGA_CALLS__ROUTING__RETRY__MAX_ATTEMPTS": "9"}, "calls.routing.retry.max_attempts"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.key == key
    assert key in str(info.value)


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    path = tmp_path / "cuga.yaml"
    path.write_text("colour: blue\n")
    with pytest.raises(ConfigError, match="colour"):
        load_settings(path, env={})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.yaml", env={})


def test_service_config_json_has_retry_policy() -> None:
    settings = load_settings(env={})
    config = json.loads(
        settings.common.calls.routing.service_config("cuga.routing.v1.RoutingService")
    )
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
    assert policy["maxAttempts"] >= 2


def test_channels_cap_their_reconnect_backoff() -> None:
    settings = load_settings(env={"CUGA_CALLS__ROUTING__RECONNECT_BACKOFF_MAX_S": "0.5"})
    options = dict(settings.common.calls.routing.channel_options("cuga.routing.v1.RoutingService"))
    # Below gRPC's 1 s first backoff, the first wait is the cap too.
    assert options["grpc.max_reconnect_backoff_ms"] == 500
    assert options["grpc.initial_reconnect_backoff_ms"] == 500
    default = dict(settings.common.calls.worker.channel_options("cuga.worker.v1.WorkerService"))
    assert default["grpc.max_reconnect_backoff_ms"] == 2000
    assert default["grpc.initial_reconnect_backoff_ms"] == 1000
    assert json.loads(default["grpc.service_config"])["loadBalancingConfig"]


@pytest.mark.parametrize("value", ["0", "0.05", "301"])
def test_a_reconnect_backoff_out_of_range_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="reconnect_backoff_max_s"):
        load_settings(env={"CUGA_CALLS__PLANNING__RECONNECT_BACKOFF_MAX_S": value})
