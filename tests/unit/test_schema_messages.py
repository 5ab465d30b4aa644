"""Input refusals keep the words of the ``jsonschema`` package (issue 24).

Validation moved to jsonschema-rs; clients and messages written before rely on the old
wording. Each violation here is checked against what ``jsonschema`` itself says of the
same schema and value, and the refusal names the JSON path of the field.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from cuga.shared.errors import InvalidArgumentError
from cuga.tools import InputSchema, SchemaProblem, check_input, json_path, validate_input


def jsonschema_says(schema: dict[str, Any], value: Any) -> str:
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(value)
    )
    assert error is not None
    return str(error.message)


CASES: list[tuple[str, dict[str, Any], Any]] = [
    ("required", {"type": "object", "required": ["amount"]}, {}),
    ("type", {"type": "integer"}, "7"),
    ("minimum", {"minimum": 0}, -5),
    ("maximum", {"maximum": 10}, 11),
    ("exclusiveMinimum", {"exclusiveMinimum": 0}, 0),
    ("exclusiveMaximum", {"exclusiveMaximum": 10}, 10),
    ("pattern", {"type": "string", "pattern": "^[A-Z]{2}$"}, "abc"),
    ("enum", {"enum": ["eur", "usd"]}, "gbp"),
    ("const", {"const": "yes"}, "no"),
    (
        "one additional",
        {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
        {"x": 1},
    ),
    (
        "two additional",
        {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
        {"z": 1, "y": 2, "a": 0},
    ),
    ("anyOf", {"anyOf": [{"type": "string"}, {"type": "integer"}]}, 1.5),
    ("oneOf", {"oneOf": [{"type": "string"}, {"type": "integer"}]}, 1.5),
]


@pytest.mark.parametrize(("rule", "schema", "value"), CASES, ids=[c[0] for c in CASES])
def test_a_violation_is_told_in_the_words_of_jsonschema(
    rule: str, schema: dict[str, Any], value: Any
) -> None:
    problem = InputSchema(schema).best_problem(value)
    assert problem is not None
    assert problem.message == jsonschema_says(schema, value)
    with pytest.raises(InvalidArgumentError) as info:
        validate_input(schema, value, field="step.input")
    assert info.value.message.endswith(problem.message)
    assert info.value.metadata["schema_rule"] == problem.rule


def test_other_violations_keep_the_validators_own_words() -> None:
    problem = InputSchema({"type": "string", "minLength": 3}).best_problem("ab")
    assert problem is not None and problem.rule == "minLength"
    assert problem.message == '"ab" is shorter than 3 characters'


def test_no_member_is_allowed_where_a_schema_allows_none() -> None:
    # jsonschema-rs says "False schema does not allow 1" at the object (before, the
    # refusal named neither the field nor the member): a tool that takes no input
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    for value in ({"x": 1}, {"y": [2], "x": 1}):
        with pytest.raises(InvalidArgumentError) as info:
            validate_input(schema, value)
        assert info.value.message.endswith(jsonschema_says(schema, value)), info.value.message
        assert info.value.metadata["schema_rule"] == "additionalProperties"
    nested = {"type": "object", "properties": {"n": schema}}
    problem = InputSchema(nested).best_problem({"n": {"x": 1}})
    assert problem is not None
    assert (problem.json_path, problem.message) == (
        "$.n",
        "Additional properties are not allowed ('x' was unexpected)",
    )
    assert InputSchema(nested).problems({"n": {"x": 1}}) == [problem]
    # other false schemas keep their words
    items = InputSchema({"items": False}).best_problem([1])
    assert items is not None and items.message == "False schema does not allow 1"


def test_a_long_value_is_quoted_up_to_the_limit() -> None:
    problem = InputSchema({"enum": ["a"]}).best_problem("x" * 1000)
    assert problem is not None
    assert len(problem.message) == 303 and problem.message.endswith("...")


def test_the_field_is_named_by_its_path() -> None:
    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "odd key": {"type": "integer"},
            "it's": {"type": "integer"},
        },
    }
    with pytest.raises(InvalidArgumentError) as info:
        check_input(InputSchema(schema), {"items": [{"name": "a"}, {}]}, field="step.input")
    assert info.value.metadata["field"] == "step.input.items[1]"
    problems = InputSchema(schema).problems({"items": [{}, {}], "odd key": "x", "it's": "y"})
    # in the order of their places, indexes before keys
    assert [p.json_path for p in problems] == [
        "$['it\\'s']",
        "$.items[0]",
        "$.items[1]",
        "$['odd key']",
    ]
    assert InputSchema(schema).problems({"items": []}) == []
    assert json_path("", ["a", 0, "b"]) == "a[0].b"
    assert SchemaProblem(("x",), "m", "type", 1).json_path == "$.x"


def test_the_problem_nearest_the_root_wins_and_anyof_only_when_alone() -> None:
    schema = {
        "type": "object",
        "required": ["amount"],
        "properties": {"currency": {"anyOf": [{"const": "eur"}, {"const": "usd"}]}},
    }
    problem = InputSchema(schema).best_problem({"currency": "gbp"})
    assert problem is not None and problem.rule == "required"
    assert InputSchema(schema).best_problem({"amount": 1, "currency": "eur"}) is None


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"type": "strin"}}}, "properties.a.type: "),
        ({"$ref": "#/$defs/missing"}, "missing"),
        # no $ref is fetched over the network
        ({"$ref": "https://example.com/s.json"}, "Retrieval is disabled"),
        (
            {"type": "string", "pattern": "^(?=a)"},
            "(patterns are ECMA-262 regular expressions matched in linear time:",
        ),
    ],
)
def test_a_schema_that_cannot_be_used_is_refused_when_the_tool_is_defined(
    schema: dict[str, Any], problem: str
) -> None:
    with pytest.raises(jsonschema.SchemaError) as info:
        InputSchema(schema)
    assert problem in str(info.value.message)
