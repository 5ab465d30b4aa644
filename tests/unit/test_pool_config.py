"""The ``<service>.pool`` keys of a PostgreSQL connection pool: bounds refused naming the key."""

from __future__ import annotations

import pytest

from cuga.services.approval.config import ApprovalConfig
from cuga.services.audit.config import AuditConfig
from cuga.services.coordinator.config import CoordinatorConfig
from cuga.services.planning.config import PlanningConfig
from cuga.shared.config import ConfigError, load_settings
from cuga.shared.sqldb import PoolConfig


def approval(**pool: object) -> ApprovalConfig:
    env = {f"CUGA_APPROVAL__POOL__{k.upper()}": str(v) for k, v in pool.items()}
    return load_settings(env=env).section(ApprovalConfig, "approval")


def test_defaults_and_overrides() -> None:
    assert approval().pool == PoolConfig(min_size=1, max_size=10, timeout_s=10.0)
    pool = approval(min_size=0, max_size=3, timeout_s=0.5, connect_timeout_s=2).pool
    assert pool == PoolConfig(min_size=0, max_size=3, timeout_s=0.5, connect_timeout_s=2)


@pytest.mark.parametrize(
    ("values", "key", "problem"),
    [
        ({"max_size": 0}, "approval.pool.max_size", "1 to 100"),
        ({"max_size": 101}, "approval.pool.max_size", "1 to 100"),
        ({"min_size": 4, "max_size": 3}, "approval.pool.min_size", "0 to max_size (3)"),
        ({"min_size": -1}, "approval.pool.min_size", "0 to max_size"),
        ({"timeout_s": 0}, "approval.pool.timeout_s", "> 0 and <= 300"),
        ({"timeout_s": 301}, "approval.pool.timeout_s", "> 0 and <= 300"),
        ({"connect_timeout_s": 0}, "approval.pool.connect_timeout_s", "1 to 300"),
    ],
)
def test_bounds_are_refused_naming_the_key(
    values: dict[str, object], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        approval(**values)
    assert refused.value.key == key
    assert problem in refused.value.problem


def test_the_audit_service_has_the_same_keys() -> None:
    env = {"CUGA_AUDIT__POOL__MAX_SIZE": "4", "CUGA_AUDIT__POOL__TIMEOUT_S": "2.5"}
    pool = load_settings(env=env).section(AuditConfig, "audit").pool
    assert (pool.max_size, pool.timeout_s) == (4, 2.5)
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"CUGA_AUDIT__POOL__MAX_SIZE": "0"}).section(AuditConfig, "audit")
    assert refused.value.key == "audit.pool.max_size"


def test_the_planning_service_has_the_same_keys() -> None:
    pool = load_settings(env={"CUGA_PLANNING__POOL__MIN_SIZE": "0"}).section(
        PlanningConfig, "planning"
    )
    assert pool.pool.min_size == 0
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"CUGA_PLANNING__POOL__TIMEOUT_S": "0"}).section(
            PlanningConfig, "planning"
        )
    assert refused.value.key == "planning.pool.timeout_s"


def test_the_coordinator_has_the_same_keys() -> None:
    config = load_settings(env={"CUGA_COORDINATOR__POOL__MAX_SIZE": "3"}).section(
        CoordinatorConfig, "coordinator"
    )
    assert config.pool.max_size == 3
    with pytest.raises(ConfigError) as refused:
        load_settings(env={"CUGA_COORDINATOR__POOL__MIN_SIZE": "-1"}).section(
            CoordinatorConfig, "coordinator"
        )
    assert refused.value.key == "coordinator.pool.min_size"
