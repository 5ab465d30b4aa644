"""Step retry backoff and input templates."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2
from cuga.orchestrator import ExponentialBackoffPolicy
from cuga.orchestrator._policy import resolve_input, template_references
from cuga.shared.clock import FakeClock
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_delay": 0}, "base_delay must be > 0"),
        ({"multiplier": 0.9}, "multiplier must be >= 1"),
        ({"base_delay": 2, "max_delay": 1}, "max_delay must be >= base_delay"),
        ({"max_attempts": 0}, "max_attempts must be between 1 and 20"),
        ({"max_attempts": 21}, "max_attempts must be between 1 and 20"),
    ],
)
def test_a_policy_out_of_bounds_is_refused_naming_the_field(
    kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        ExponentialBackoffPolicy(**kwargs)  # type: ignore[arg-type]


async def test_execute_retries_only_what_retry_if_accepts() -> None:
    clock = FakeClock()
    clock.auto_advance = True
    calls: list[int] = []

    def down_twice() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise ConnectionError("down")
        return "up"

    policy = ExponentialBackoffPolicy(base_delay=1, multiplier=2, max_attempts=3)
    only_connection = lambda exc: isinstance(exc, ConnectionError)  # noqa: E731
    assert await policy.execute(down_twice, retry_if=only_connection, clock=clock) == "up"
    assert len(calls) == 3 and len(clock.slept) == 2
    assert clock.slept[0] <= 1 and clock.slept[1] <= 2

    async def refused() -> None:
        calls.append(1)
        raise PermissionError("no")

    calls.clear()
    with pytest.raises(PermissionError):
        await policy.execute(refused, retry_if=only_connection, clock=clock)
    assert len(calls) == 1  # not retried


def test_template_references_are_found_in_lists_and_nested_objects() -> None:
    step = _step(
        {
            "items": ["{{steps.a.output}}", {"deep": ["x", "{{ steps.b.output.v }}"]}, 3],
            "plain": "no reference",
        }
    )
    assert template_references(step) == {"a", "b"}
