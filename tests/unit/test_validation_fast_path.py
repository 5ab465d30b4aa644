"""``check_plan_step`` and ``check_context`` pass a valid message without building field
names (issue 27: a step and its context are checked on every hop of every step); what
they pass and what they refuse, with which field and words, must be what the checks one
by one say. The reference here is those checks, in their order, as they were written
before the fast paths."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.common.v1 import common_pb2
from cuga.shared.errors import InvalidArgumentError
from cuga.shared.messages import to_struct
from cuga.shared.validation import (
    CAPABILITY_PATTERN,
    MAX_DELEGATE_ID_CHARS,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_VALUE_CHARS,
    MAX_STEP_REASON_CHARS,
    MAX_USER_ID_CHARS,
    STEP_ID_PATTERN,
    TOOL_NAME_PATTERN,
    TRACE_ID_PATTERN,
    check_context,
    check_count,
    check_id,
    check_length,
    check_map,
    check_plan_step,
    check_size,
    check_timestamp,
)


def _reference_step(
    field: str, step: common_pb2.PlanStep, max_input_bytes: int, max_depends_on: int
) -> None:
    check_id(f"{field}.step_id", step.step_id, pattern=STEP_ID_PATTERN)
    check_id(f"{field}.tool", step.tool, pattern=TOOL_NAME_PATTERN)
    check_size(f"{field}.input", step.input, max_input_bytes)
    check_count(f"{field}.depends_on", step.depends_on, max_depends_on)
    for i, dep in enumerate(step.depends_on):
        check_id(f"{field}.depends_on[{i}]", dep, pattern=STEP_ID_PATTERN)
    check_id(f"{field}.capability", step.capability, required=False, pattern=CAPABILITY_PATTERN)
    if not math.isfinite(step.estimated_cost) or step.estimated_cost < 0:
        raise InvalidArgumentError(
            f"{field}.estimated_cost", f"must be a finite number >= 0, got {step.estimated_cost}"
        )
    check_length(f"{field}.reason", step.reason, MAX_STEP_REASON_CHARS)


def _reference_context(field: str, ctx: common_pb2.ExecutionContext, run_id_required: bool) -> None:
    check_id(f"{field}.trace_id", ctx.trace_id, required=False, pattern=TRACE_ID_PATTERN)
    check_id(f"{field}.run_id", ctx.run_id, required=run_id_required)
    check_id(f"{field}.profile", ctx.profile, required=False)
    check_length(f"{field}.user_id", ctx.user_id, MAX_USER_ID_CHARS)
    check_map(
        f"{field}.metadata",
        ctx.metadata,
        max_entries=MAX_METADATA_ENTRIES,
        max_key_chars=MAX_METADATA_KEY_CHARS,
        max_value_chars=MAX_METADATA_VALUE_CHARS,
    )
    if ctx.HasField("deadline"):
        check_timestamp(f"{field}.deadline", ctx.deadline)
    check_length(f"{field}.delegate_id", ctx.delegate_id, MAX_DELEGATE_ID_CHARS)


def _outcome(check: Any, *args: Any, **kwargs: Any) -> tuple[str, str] | None:
    try:
        check(*args, **kwargs)
    except InvalidArgumentError as exc:
        return exc.field, exc.message
    return None


def _ids(alphabet: str, longest: int) -> st.SearchStrategy[str]:
    """Ids at and around the length limit, mostly valid, sometimes with a bad character."""
    good = st.text(alphabet=alphabet, min_size=0, max_size=longest + 1)
    edge = st.sampled_from(["", "a" * longest, "a" * (longest + 1), "a\n", "a b", "é", "a/b"])
    return st.one_of(good, good, edge)


_STEP_CHARS = "abcXYZ019_.-"
_ID_CHARS = "abcXYZ019_.:-"
_HEX = "0123456789abcdef"
_COSTS = st.one_of(
    st.floats(min_value=0, max_value=1e9),
    st.sampled_from([0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 1e308]),
)
_LENGTHS = st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1023, 1024, 1025])


@st.composite
def _steps(draw: st.DrawFn) -> tuple[common_pb2.PlanStep, int, int]:
    step = common_pb2.PlanStep(
        step_id=draw(_ids(_STEP_CHARS, 64)),
        tool=draw(_ids(_STEP_CHARS, 128)),
        depends_on=draw(st.lists(_ids(_STEP_CHARS, 64), max_size=5)),
        capability=draw(_ids(_ID_CHARS, 128)),
        estimated_cost=draw(_COSTS),
        reason="r" * draw(_LENGTHS),
    )
    if draw(st.booleans()):
        step.input.CopyFrom(to_struct({"text": "x" * draw(st.integers(0, 80))}))
    return step, draw(st.sampled_from([0, 10, 40, 64 * 1024])), draw(st.integers(0, 6))


@st.composite
def _contexts(draw: st.DrawFn) -> tuple[common_pb2.ExecutionContext, bool]:
    ctx = common_pb2.ExecutionContext(
        trace_id=draw(st.one_of(st.text(_HEX, min_size=32, max_size=32), _ids(_HEX + "A", 32))),
        run_id=draw(_ids(_ID_CHARS, 128)),
        profile=draw(_ids(_ID_CHARS, 128)),
        user_id="u" * draw(_LENGTHS),
        delegate_id="d" * draw(_LENGTHS),
    )
    entries = draw(st.sampled_from([0, 0, 1, 3, 64, 65]))
    for i in range(entries):
        key = draw(st.sampled_from([f"k{i}", f"k{i}", "", "k" * 128 + str(i), "k" * 129]))
        ctx.metadata[key] = "v" * draw(_LENGTHS)
    if draw(st.booleans()):
        ctx.deadline.seconds = draw(
            st.sampled_from([0, 1_700_000_000, 253_402_300_799, 253_402_300_800, -1])
        )
        ctx.deadline.nanos = draw(st.sampled_from([0, 999_999_999, 1_000_000_000, -1]))
    return ctx, draw(st.booleans())


@settings(max_examples=1500, deadline=None)
@given(_steps())
def test_a_step_is_passed_and_refused_as_the_checks_one_by_one_say(
    drawn: tuple[common_pb2.PlanStep, int, int],
) -> None:
    step, max_bytes, max_deps = drawn
    assert _outcome(
        check_plan_step, "step", step, max_input_bytes=max_bytes, max_depends_on=max_deps
    ) == _outcome(_reference_step, "step", step, max_bytes, max_deps)


@settings(max_examples=1500, deadline=None)
@given(_contexts())
def test_a_context_is_passed_and_refused_as_the_checks_one_by_one_say(
    drawn: tuple[common_pb2.ExecutionContext, bool],
) -> None:
    ctx, run_id_required = drawn
    assert _outcome(check_context, "context", ctx, run_id_required=run_id_required) == _outcome(
        _reference_context, "context", ctx, run_id_required
    )


def test_the_common_case_passes() -> None:
    step = common_pb2.PlanStep(step_id="s1", tool="noop", depends_on=["s0"], reason="why")
    ctx = common_pb2.ExecutionContext(run_id="run-1", trace_id="0" * 32, profile="default")
    check_plan_step("step", step)
    check_context("context", ctx, run_id_required=True)
