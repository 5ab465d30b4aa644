"""Step retry backoff and input templates."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2
from cuga.orchestrator import ExponentialBackoffPolicy
from cuga.orchestrator._policy import resolve_input, template_references
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import struct_to_dict, to_struct


@given(
    base=st.floats(0.001, 10),
    mult=st.floats(1, 5),
    extra=st.floats(0, 100),
    attempt=st.integers(1, 30),
    seed=st.integers(0, 2**32),
)
def test_delay_within_full_jitter_bounds(
    base: float, mult: float, extra: float, attempt: int, seed: int
) -> None:
    policy = ExponentialBackoffPolicy(base_delay=base, multiplier=mult, max_delay=base + extra)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(base + extra, base * mult ** (attempt - 1)) + 1e-9


def test_cap_grows_then_saturates() -> None:
    policy = ExponentialBackoffPolicy(base_delay=1, multiplier=2, max_delay=5, max_attempts=5)
    assert [policy.cap(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_request_override_is_validated() -> None:
    bad = common_pb2.RetryPolicy(multiplier=0.5)
    with pytest.raises(InvalidArgumentError, match="retry_policy"):
        ExponentialBackoffPolicy().with_overrides(bad)
    good = common_pb2.RetryPolicy(max_attempts=7)
    assert ExponentialBackoffPolicy().with_overrides(good).max_attempts == 7


def _step(data: dict[str, object]) -> common_pb2.PlanStep:
    return common_pb2.PlanStep(step_id="s2", tool="echo", input=to_struct(data))


def test_whole_reference_keeps_type_and_inline_reference_formats() -> None:
    step = _step({"n": "{{steps.s1.output.total}}", "msg": "total is {{ steps.s1.output.total }}"})
    assert template_references(step) == {"s1"}
    resolved = struct_to_dict(resolve_input(step, {"s1": {"total": 42}}))
    assert resolved == {"n": 42, "msg": "total is 42"}


def test_reference_to_missing_key_names_the_step() -> None:
    with pytest.raises(InvalidArgumentError, match=r"steps\[s2\]"):
        resolve_input(_step({"n": "{{steps.s1.output.nope}}"}), {"s1": {"total": 1}})
    with pytest.raises(InvalidArgumentError, match="s9"):
        resolve_input(_step({"n": "{{steps.s9.output}}"}), {})
