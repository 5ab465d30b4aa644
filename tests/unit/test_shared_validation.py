"""The shared validators accept every value at a limit and refuse the next one.

tests/security/test_shared_limits.py sends the over-limit values over gRPC to every
service; here the boundaries themselves, without servers.
"""

from __future__ import annotations

import math

import pytest
from google.protobuf.duration_pb2 import Duration
from hypothesis import given
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2 as S
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import to_struct
from cuga.shared.validation import (
    MAX_TIMESTAMP_SECONDS,
    check_budget,
    check_context,
    check_duration,
    check_partial_result,
    check_plan_step,
    check_request_id,
    check_retry_policy,
    derived_id,
)

ID_CHARS = st.sampled_from("abcXYZ019._:-")
STEP_CHARS = st.sampled_from("abcXYZ019._-")


def _refused(call: object, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        call()  # type: ignore[operator]
    assert info.value.field == field


def test_context_at_every_limit_is_accepted() -> None:
    ctx = S.ExecutionContext(
        trace_id="0" * 32,
        run_id="r" * 128,
        profile="p" * 128,
        user_id="u" * 256,
        delegate_id="d" * 128,
        metadata={f"{i:0128d}": "v" * 1024 for i in range(64)},
    )
    ctx.deadline.seconds = MAX_TIMESTAMP_SECONDS
    ctx.deadline.nanos = 999_999_999
    check_context("context", ctx)


@given(
    run_id=st.text(ID_CHARS, max_size=128),
    profile=st.text(ID_CHARS, max_size=128),
    user_id=st.text(max_size=256),
    metadata=st.dictionaries(
        st.text(min_size=1, max_size=128), st.text(max_size=1024), max_size=64
    ),
)
def test_any_context_within_the_limits_is_accepted(
    run_id: str, profile: str, user_id: str, metadata: dict[str, str]
) -> None:
    ctx = S.ExecutionContext(run_id=run_id, profile=profile, user_id=user_id, metadata=metadata)
    check_context("context", ctx)


def test_context_one_past_each_limit_is_refused_naming_the_field() -> None:
    _refused(lambda: check_context("c", S.ExecutionContext(user_id="u" * 257)), "c.user_id")
    _refused(lambda: check_context("c", S.ExecutionContext(delegate_id="d" * 129)), "c.delegate_id")
    _refused(lambda: check_context("c", S.ExecutionContext(metadata={"": "v"})), "c.metadata")
    _refused(
        lambda: check_context("c", S.ExecutionContext(metadata={"k": "v" * 1025})),
        "c.metadata['k']",
    )
    _refused(lambda: check_context("c", S.ExecutionContext(), run_id_required=True), "c.run_id")


@given(
    step_id=st.text(STEP_CHARS, min_size=1, max_size=64),
    capability=st.text(ID_CHARS, max_size=128),
    cost=st.floats(min_value=0, allow_infinity=False, allow_nan=False),
    deps=st.lists(st.text(STEP_CHARS, min_size=1, max_size=64), max_size=256),
)
def test_any_step_within_the_limits_is_accepted(
    step_id: str, capability: str, cost: float, deps: list[str]
) -> None:
    step = S.PlanStep(
        step_id=step_id,
        tool="t" * 128,
        capability=capability,
        estimated_cost=cost,
        depends_on=deps,
        reason="r" * 1024,
        input=to_struct({"text": "x" * 1000}),
    )
    check_plan_step("steps[0]", step)


def test_request_id_is_an_id() -> None:
    check_request_id("")
    check_request_id("r" * 128)
    check_request_id("0b7c6f1e-7c1a-4f0e-9b1d-2f9a8c7d6e5f")
    _refused(lambda: check_request_id("r" * 129), "request_id")
    _refused(lambda: check_request_id("a b"), "request_id")


def test_budget_and_retry_policy_boundaries() -> None:
    check_budget("budget", S.ToolBudget(ceiling=0, warn_fraction=1.0))
    _refused(lambda: check_budget("b", S.ToolBudget(ceiling=math.inf)), "b.ceiling")
    _refused(lambda: check_budget("b", S.ToolBudget(warn_fraction=math.nan)), "b.warn_fraction")
    check_retry_policy(
        "r",
        S.RetryPolicy(
            base_delay=Duration(nanos=1), max_delay=Duration(seconds=30), max_attempts=20
        ),
    )
    check_retry_policy("r", S.RetryPolicy())  # every field at its default
    _refused(lambda: check_retry_policy("r", S.RetryPolicy(multiplier=math.inf)), "r.multiplier")
    _refused(lambda: check_retry_policy("r", S.RetryPolicy(base_delay=Duration())), "r.base_delay")
    _refused(
        lambda: check_retry_policy(
            "r", S.RetryPolicy(base_delay=Duration(seconds=2), max_delay=Duration(seconds=1))
        ),
        "r.max_delay",
    )
    _refused(lambda: check_duration("d", Duration(seconds=1, nanos=-1)), "d")
    assert check_duration("d", Duration(seconds=2, nanos=500_000_000)) == 2.5


def test_partial_result_as_the_coordinator_writes_it_is_accepted() -> None:
    partial = S.PartialResult(
        run_id="3f2a" * 8,
        completed_steps=[S.CompletedStep(step_id="a")],
        failed_step="b",
        error="tool 'calculator' failed: " + "x" * 5000,  # free text, not bounded here
        failure_mode=S.FAILURE_MODE_AGENT,
        recovery_plan=[S.PlanStep(step_id="b", tool="calculator", depends_on=["a"])],
        goal="g",
        context=S.ExecutionContext(
            trace_id="ab" * 16, run_id="3f2a" * 8, profile="default", delegate_id="gateway"
        ),
        plan_id="p1",
        budget=S.ToolBudget(ceiling=10, spent=3),
    )
    check_partial_result("partial", partial)
    partial.recovery_plan[0].depends_on.append("bad id")
    _refused(
        lambda: check_partial_result("partial", partial), "partial.recovery_plan[0].depends_on[1]"
    )


@given(parts=st.lists(st.text(ID_CHARS, min_size=1, max_size=128), min_size=1, max_size=4))
def test_derived_ids_fit_the_id_limit_and_are_stable(parts: list[str]) -> None:
    derived = derived_id(*parts)
    check_request_id(derived)
    assert derived == derived_id(*parts)
    joined = ":".join(parts)
    assert derived == joined if len(joined) <= 128 else len(derived) == 128
    if len(joined) > 128:
        assert derived != derived_id(*parts, "x")
