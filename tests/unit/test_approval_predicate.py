"""The approval predicate language: tokenizer, parser, evaluation (no eval anywhere)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.services.approval.predicate import (
    MAX_DEPTH,
    PredicateError,
    parse_predicate,
)

LISTS = {"allowlist": ("alice", "bob"), "small": (1, 2, 3)}


def holds(text: str, input: dict[str, Any] | None = None, **env: Any) -> bool:
    full = {"input": input or {}, "context": env.pop("context", {}), **env}
    return parse_predicate(text, LISTS).evaluate(full)


@pytest.mark.parametrize(
    ("text", "input", "expected"),
    [
        ("input.amount > 1000", {"amount": 1500.0}, True),
        ("input.amount > 1000", {"amount": 1000.0}, False),
        ("amount >= 10", {"amount": 10}, True),
        ("amount < 10", {"amount": 9.5}, True),
        ("amount <= -1", {"amount": -1}, True),
        ("amount != 3", {"amount": 4}, True),
        ('env == "prod"', {"env": "prod"}, True),
        ("env == 'prod'", {"env": "dev"}, False),
        ("recipient in allowlist", {"recipient": "alice"}, True),
        ("recipient not in allowlist", {"recipient": "mallory"}, True),
        ("recipient not in allowlist", {"recipient": "bob"}, False),
        ('recipient in ["x", "y"]', {"recipient": "y"}, True),
        ("n in small", {"n": 2.0}, True),
        ("n in []", {"n": 2}, False),
        ("urgent", {"urgent": True}, True),
        ("urgent == true", {"urgent": True}, True),
        ("urgent == false", {"urgent": True}, False),
        ("a > 1 and b > 1", {"a": 2, "b": 2}, True),
        ("a > 1 and b > 1", {"a": 2, "b": 0}, False),
        ("a > 1 or b > 1", {"a": 0, "b": 2}, True),
        ("not a > 1", {"a": 0}, True),
        ("not (a > 1 or b > 1) and c == 1", {"a": 0, "b": 0, "c": 1}, True),
        ("(a > 1 or b > 1) and c == 1", {"a": 5, "c": 2}, False),
        ("a or b and c", {"a": True}, True),  # and binds tighter than or
        ("nested.deep.x == 1", {"nested": {"deep": {"x": 1}}}, True),
        ('s == "a \\"quoted\\" word"', {"s": 'a "quoted" word'}, True),
        ("x == 1.5", {"x": 1.5}, True),
    ],
)
def test_evaluation(text: str, input: dict[str, Any], expected: bool) -> None:
    assert holds(text, input) is expected


@pytest.mark.parametrize(
    "text",
    [
        "amount > 1000",
        "amount == 5",
        "amount != 5",  # even != is false on a missing field
        "amount < 5",
        "recipient not in allowlist",
        "recipient in allowlist",
        "missing",
    ],
)
def test_missing_field_makes_comparison_false(text: str) -> None:
    assert holds(text, {}) is False


def test_not_of_a_missing_comparison_is_true() -> None:
    assert holds("not (amount > 10)", {}) is True


@pytest.mark.parametrize(
    ("text", "input"),
    [
        ('amount > "10"', {"amount": 20}),
        ("amount > 10", {"amount": "20"}),
        ("flag == 1", {"flag": True}),  # booleans are not numbers
        ("amount > 10", {"amount": None}),
        ("items > 1", {"items": [1, 2]}),
    ],
)
def test_mismatched_types_compare_false(text: str, input: dict[str, Any]) -> None:
    assert holds(text, input) is False


def test_context_tool_and_profile_paths() -> None:
    env = {
        "context": {"user_id": "carol", "metadata": {"env": "prod"}},
        "tool": "payments.send",
        "profile": "acme",
    }
    assert holds('context.metadata.env == "prod" and profile == "acme"', {}, **env)
    assert holds('tool == "payments.send" and context.user_id in ["carol"]', {}, **env)
    assert not holds('context.metadata.region == "eu"', {}, **env)


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty"),
        ("amount >", 9, "expected a value"),
        ("amount > > 1", 10, "expected a value"),
        ("(amount > 1", 12, "')'"),
        ("amount > 1)", 11, "unexpected"),
        ("amount = 1", 8, "did you mean"),
        ("amount > 1 and", 15, "expected a value"),
        ('name == "open', 9, "unterminated"),
        ("x in unknownlist", 6, "unknown list"),
        ("x in 5", 6, "expected a list"),
        ("x in [[1]]", 7, "nested"),
        ("amount $ 3", 8, "unexpected character"),
        ("12abc > 1", 1, "malformed number"),
        ("x == 'bad \\q escape'", 11, "unknown escape"),
    ],
)
def test_parse_errors_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(PredicateError) as info:
        parse_predicate(text, LISTS)
    assert info.value.column == column
    assert fragment in str(info.value)


def test_depth_and_length_are_bounded() -> None:
    with pytest.raises(PredicateError, match="nested deeper"):
        parse_predicate("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1))
    with pytest.raises(PredicateError, match="nested deeper"):
        parse_predicate("not " * (MAX_DEPTH + 1) + "a")
    with pytest.raises(PredicateError, match="longer than"):
        parse_predicate("a == 1 or " * 1000 + "a == 1")
    assert parse_predicate("(" * 10 + "a" + ")" * 10).evaluate({"input": {"a": 1}})


_ALPHABET = st.sampled_from(
    [
        *"abcxyz_0123456789 .,()[]<>=!\"'\\-\t\n$é",
        *("and ", "or ", "not ", "in ", "true", "false", "input.", "allowlist", "=="),
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=40).map("".join))
def test_parser_only_ever_raises_its_own_error(text: str) -> None:
    try:
        predicate = parse_predicate(text, LISTS)
    except PredicateError:
        return
    # Whatever parses must also evaluate without raising, on any input.
    predicate.evaluate({"input": {"a": 1, "x": "s", "b": [1]}, "context": {}})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parser_survives_arbitrary_text(text: str) -> None:
    with contextlib.suppress(PredicateError):
        parse_predicate(text, LISTS)
