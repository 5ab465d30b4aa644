"""The example tools: behaviour, schemas and realistic failures."""

from __future__ import annotations

import asyncio
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from cuga_example_tools import (
    APPEND_LINE,
    CALCULATOR,
    ECHO,
    NOOP,
    SUMMARIZE_TEXT,
    TOOLS,
    TRANSFER_FUNDS,
    WEB_SEARCH,
    evaluate,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.shared.errors import InvalidArgumentError
from cuga.tools import ToolContext, ToolSpec, validate_input


def _ctx(tmp_path: Path, **kw: Any) -> ToolContext:
    return ToolContext(run_id="run-1", step_id="s1", sandbox_dir=tmp_path, **kw)


def _call(spec: ToolSpec, inputs: dict[str, Any], ctx: ToolContext) -> Any:
    validate_input(spec.parameters, inputs)
    result = spec.handler(inputs, ctx)
    if asyncio.iscoroutine(result):
        return asyncio.run(result)
    return result


def test_every_example_tool_has_a_schema_and_keywords() -> None:
    assert len({t.name for t in TOOLS}) == len(TOOLS) >= 7
    for tool in TOOLS:
        assert tool.parameters["type"] == "object"
        assert tool.description and tool.keywords and tool.capabilities


def test_noop_and_echo(tmp_path: Path) -> None:
    assert _call(NOOP, {"anything": 1}, _ctx(tmp_path)) == {}
    assert _call(ECHO, {"a": [1, "x"]}, _ctx(tmp_path)) == {"a": [1, "x"]}


# -- calculator ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("-2 ** 2", -4),
        ("2 ** 3 ** 2", 512),
        ("2 ** -1", 0.5),
        ("7 / 2", 3.5),
        ("10 - 4 - 3", 3),
        ("--3", 3),
        ("1.5 * 2", 3.0),
        (".5 + 1", 1.5),
        ("  42  ", 42),
    ],
)
def test_calculator_evaluates(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "problem"),
    [
        ("1 / 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("1 +", "unexpected end"),
        ("(1 + 2", "expected ')'"),
        ("1 2", "unexpected '2'"),
        ("open('/etc/passwd')", "unexpected character 'o'"),
        ("2 ** 100000", "too large"),
        ("9 ** 9 ** 9", "too large"),
        ("(" * 100 + "1" + ")" * 100, "nested too deeply"),
        ("(-8) ** 0.5", "not a real number"),
    ],
)
def test_calculator_refuses_with_value_error(expression: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        evaluate(expression)


def test_calculator_schema_refuses_empty_and_extra(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"step\.input\.expression"):
        _call(CALCULATOR, {"expression": ""}, _ctx(tmp_path))
    with pytest.raises(InvalidArgumentError, match="Additional properties"):
        _call(CALCULATOR, {"expression": "1", "x": 1}, _ctx(tmp_path))
    assert _call(CALCULATOR, {"expression": "6*7"}, _ctx(tmp_path))["result"] == 42


_ints = st.integers(min_value=-50, max_value=50)


@st.composite
def _exprs(draw: st.DrawFn, depth: int = 0) -> tuple[str, Fraction]:
    """An expression and its exact value, built side by side (no evaluation of text)."""
    if depth > 3 or draw(st.booleans()):
        n = draw(_ints)
        return (f"({n})" if n < 0 else str(n)), Fraction(n)
    op = draw(st.sampled_from(["+", "-", "*"]))
    (ls, lv), (rs, rv) = draw(_exprs(depth + 1)), draw(_exprs(depth + 1))
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    return f"({ls} {op} {rs})", value


@settings(max_examples=100, deadline=None)
@given(_exprs())
def test_calculator_matches_exact_arithmetic(case: tuple[str, Fraction]) -> None:
    text, value = case
    assert evaluate(text) == value


# -- web_search --------------------------------------------------------------------------


def test_web_search_ranks_the_most_relevant_first(tmp_path: Path) -> None:
    out = _call(
        WEB_SEARCH, {"query": "idempotency key for payments", "max_results": 2}, _ctx(tmp_path)
    )
    assert out["results"][0]["title"] == "Idempotency keys"
    assert len(out["results"]) <= 2
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_web_search_no_match_is_empty_and_stopwords_only_is_refused(tmp_path: Path) -> None:
    assert _call(WEB_SEARCH, {"query": "xylophone"}, _ctx(tmp_path))["results"] == []
    with pytest.raises(ValueError, match="no searchable words"):
        _call(WEB_SEARCH, {"query": "the of and"}, _ctx(tmp_path))
    with pytest.raises(InvalidArgumentError, match=r"step\.input\.max_results"):
        _call(WEB_SEARCH, {"query": "x", "max_results": 11}, _ctx(tmp_path))


# -- files ---------------------------------------------------------------------------------


def test_summarize_text_reads_inside_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    text = (
        "Workers run tools. Workers store results by idempotency key. "
        "The weather is nice. Idempotency keys stop duplicate tool runs by workers. "
        "Bananas are yellow."
    )
    (tmp_path / "docs" / "a.txt").write_text(text, encoding="utf-8")
    out = _call(SUMMARIZE_TEXT, {"path": "docs/a.txt", "max_sentences": 2}, _ctx(tmp_path))
    assert out["sentences"] == 2
    assert "Workers" in out["summary"] and "Bananas" not in out["summary"]


@pytest.mark.parametrize("path", ["../secret.txt", "/etc/passwd", "docs/../../x"])
def test_summarize_text_refuses_paths_outside_the_sandbox(tmp_path: Path, path: str) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (tmp_path / "secret.txt").write_text("secret", encoding="utf-8")
    with pytest.raises(PermissionError):
        _call(SUMMARIZE_TEXT, {"path": path}, _ctx(sandbox))


def test_summarize_text_refuses_symlinks_out_of_the_sandbox(tmp_path: Path) -> None:
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (tmp_path / "secret.txt").write_text("secret", encoding="utf-8")
    (sandbox / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(PermissionError, match="escapes"):
        _call(SUMMARIZE_TEXT, {"path": "link.txt"}, _ctx(sandbox))


def test_summarize_text_missing_or_binary_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        _call(SUMMARIZE_TEXT, {"path": "nope.txt"}, _ctx(tmp_path))
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        _call(SUMMARIZE_TEXT, {"path": "bin"}, _ctx(tmp_path))


def test_append_line_counts_lines_and_stays_in_the_sandbox(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    assert _call(APPEND_LINE, {"path": "log/a.txt", "line": "one"}, ctx)["lines"] == 1
    assert _call(APPEND_LINE, {"path": "log/a.txt", "line": "two"}, ctx)["lines"] == 2
    assert (tmp_path / "log" / "a.txt").read_text(encoding="utf-8") == "one\ntwo\n"
    with pytest.raises(PermissionError):
        _call(APPEND_LINE, {"path": "../x", "line": "x"}, ctx)
    with pytest.raises(InvalidArgumentError, match=r"step\.input\.line"):
        _call(APPEND_LINE, {"path": "a", "line": "two\nlines"}, ctx)


# -- transfer_funds ------------------------------------------------------------------------

_TRANSFER = {
    "from_account": "CH9300762011623852957",
    "to_account": "DE89370400440532013000",
    "amount": 120.5,
    "currency": "EUR",
}


def test_transfer_funds_is_sensitive_and_confirms_deterministically(tmp_path: Path) -> None:
    assert TRANSFER_FUNDS.sensitive and "payments" in TRANSFER_FUNDS.capabilities
    first = _call(TRANSFER_FUNDS, dict(_TRANSFER), _ctx(tmp_path))
    again = _call(TRANSFER_FUNDS, dict(_TRANSFER), _ctx(tmp_path))
    assert first["confirmation_id"].startswith("TX-") and first == again
    other = _call(TRANSFER_FUNDS, dict(_TRANSFER), ToolContext(run_id="run-2", step_id="s1"))
    assert other["confirmation_id"] != first["confirmation_id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount": -5}, "step.input.amount"),
        ({"amount": 0}, "step.input.amount"),
        ({"currency": "XXX"}, "step.input.currency"),
        ({"to_account": "not an account"}, "step.input.to_account"),
    ],
)
def test_transfer_funds_schema(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        _call(TRANSFER_FUNDS, {**_TRANSFER, **change}, _ctx(tmp_path))
    assert info.value.field == field


def test_transfer_funds_handler_checks_again(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(ValueError, match="greater than 0"):
        TRANSFER_FUNDS.handler({**_TRANSFER, "amount": -1}, ctx)
    with pytest.raises(ValueError, match="currency"):
        TRANSFER_FUNDS.handler({**_TRANSFER, "currency": "XXX"}, ctx)
    with pytest.raises(ValueError, match="must differ"):
        TRANSFER_FUNDS.handler({**_TRANSFER, "to_account": _TRANSFER["from_account"]}, ctx)
    with pytest.raises(PermissionError, match="limit"):
        _call(TRANSFER_FUNDS, {**_TRANSFER, "amount": 2_000_000}, ctx)
