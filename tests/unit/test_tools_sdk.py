"""The tool SDK: ToolSpec checks, the registry, entry-point loading, schema validation."""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

import pytest

from cuga.shared.errors import InvalidArgumentError, NotFoundError
from cuga.tools import (
    ToolContext,
    ToolDefinitionError,
    ToolLoadError,
    ToolRegistry,
    ToolSpec,
    in_namespaces,
    to_proto,
    validate_input,
)


def _handler(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return inputs


async def _async_handler(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    return inputs


def _spec(name: str = "t", **kw: Any) -> ToolSpec:
    kw.setdefault("parameters", {"type": "object"})
    kw.setdefault("handler", _handler)
    return ToolSpec(name=name, description="d", **kw)


#: A spec whose handler lives outside this test module's namespace (json).
FOREIGN = ToolSpec(
    name="foreign", description="d", parameters={"type": "object"}, handler=json.dumps
)
#: Not a ToolSpec.
NOT_A_SPEC = ["just a string"]
#: A list of good specs in this (allowlisted "tests") module.
GOOD = [_spec("good_a"), _spec("good_b", capabilities=("cap1",))]


#: How pytest imported this module (``test_tools_sdk`` or ``tests.unit.test_tools_sdk``).
HERE = __name__.split(".")[0]


def _ep(value: str, name: str = "x") -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group="cuga.tools")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "bad name"}, "malformed"),
        ({"name": ""}, "malformed"),
        ({"name": "x" * 129}, "malformed"),
        ({"handler": "not callable"}, "not callable"),
        ({"parameters": {"type": "string"}}, "object"),
        ({"parameters": {"type": "object", "properties": {"a": {"type": 5}}}}, "JSON schema"),
        ({"cost": -1.0}, "cost"),
        ({"cost": float("nan")}, "cost"),
        ({"timeout": 0.0}, "timeout"),
        ({"capabilities": ("has space",)}, "capabilities"),
    ],
)
def test_malformed_specs_are_refused(kwargs: dict[str, Any], needle: str) -> None:
    name = kwargs.pop("name", "t")
    with pytest.raises(ToolDefinitionError, match=needle):
        _spec(name, **kwargs)


def test_spec_defaults_and_async_detection() -> None:
    spec = _spec()
    assert spec.cost == 1.0 and spec.timeout == 30.0 and not spec.sensitive
    assert not spec.is_async
    assert _spec(handler=_async_handler).is_async
    assert spec.handler_module == __name__


def test_registry_register_get_specs_and_capabilities() -> None:
    registry = ToolRegistry(["tests", HERE])
    registry.register_all([_spec("b", capabilities=("x",)), _spec("a", capabilities=("y", "x"))])
    assert registry.names() == ["a", "b"]
    assert [s.name for s in registry.specs()] == ["a", "b"]
    assert registry.capabilities() == ["x", "y"]
    assert registry.get("a").name == "a" and "a" in registry and len(registry) == 2
    with pytest.raises(NotFoundError, match="'zzz' is not registered"):
        registry.get("zzz")
    with pytest.raises(ToolLoadError, match="already registered"):
        registry.register(_spec("a"))


def test_registry_refuses_handlers_outside_the_allowlist() -> None:
    registry = ToolRegistry(["cuga_example_tools"])
    with pytest.raises(ToolLoadError, match=r"outside the allowlisted namespaces"):
        registry.register(_spec("x"))
    with pytest.raises(ToolLoadError, match=r"expected a cuga\.tools\.ToolSpec"):
        registry.register("nope")  # type: ignore[arg-type]


def test_namespace_matching_is_by_dotted_prefix() -> None:
    assert in_namespaces("cuga_example_tools", ["cuga_example_tools"])
    assert in_namespaces("cuga_example_tools.calc", ["cuga_example_tools"])
    assert not in_namespaces("cuga_example_tools_evil", ["cuga_example_tools"])
    with pytest.raises(ToolLoadError, match="dotted module name"):
        ToolRegistry(["bad ns"])


def test_installed_entry_points_load_the_example_tools() -> None:
    registry = ToolRegistry(["cuga_example_tools"])
    names = registry.load_entry_points()
    assert {
        "noop",
        "echo",
        "web_search",
        "calculator",
        "summarize_text",
        "transfer_funds",
        "append_line",
    } <= set(names)
    assert registry.get("transfer_funds").sensitive


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("no_colon_here", "malformed"),
        ("bad module:X", "malformed"),
        ("tests.unit.test_tools_sdk:", "malformed"),
        # Refused before import: the module does not even exist.
        ("evil_pkg.tools:TOOLS", "outside the allowlisted namespaces"),
        ("tests.unit.test_tools_sdk:MISSING", "cannot load"),
        ("tests.unit.no_such_module:TOOLS", "cannot load"),
        ("tests.unit.test_tools_sdk:NOT_A_SPEC", "expected a ToolSpec"),
        ("tests.unit.test_tools_sdk:FOREIGN", "handler lives in module 'json'"),
    ],
)
def test_bad_entry_points_are_refused_with_a_clear_error(value: str, needle: str) -> None:
    registry = ToolRegistry(["tests"])
    with pytest.raises(ToolLoadError, match=needle) as info:
        registry.load_entry_points(entry_points=[_ep(value, name="bad")])
    assert "entry point 'bad'" in str(info.value)
    assert len(registry) == 0


def test_entry_point_naming_a_list_registers_each_spec() -> None:
    registry = ToolRegistry(["tests"])
    assert registry.load_entry_points(entry_points=[_ep("tests.unit.test_tools_sdk:GOOD")]) == [
        "good_a",
        "good_b",
    ]


def test_load_entry_points_needs_an_allowlist() -> None:
    with pytest.raises(ToolLoadError, match="allowlist"):
        ToolRegistry().load_entry_points(entry_points=[])


def test_to_proto_carries_schema_and_fields() -> None:
    spec = _spec(
        "p",
        parameters={"type": "object", "properties": {"a": {"type": "integer"}}},
        capabilities=("c",),
        sensitive=True,
        cost=2.5,
        timeout=1.5,
        keywords=("k",),
    )
    pb = to_proto(spec)
    assert pb.name == "p" and pb.sensitive and pb.cost == 2.5
    assert pb.timeout.ToNanoseconds() == 1_500_000_000
    assert list(pb.capabilities) == ["c"] and list(pb.keywords) == ["k"]
    assert pb.parameters["properties"]["a"]["type"] == "integer"


SCHEMA = {
    "type": "object",
    "properties": {
        "amount": {"type": "number", "minimum": 0},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"n": {"type": "string"}}},
        },
    },
    "required": ["amount"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"amount": -5}, "step.input.amount: -5 is less than the minimum of 0"),
        ({}, "step.input: 'amount' is a required property"),
        (
            {"amount": 1, "items": [{"n": "a"}, {"n": 3}]},
            "step.input.items[1].n: 3 is not of type 'string'",
        ),
        ({"amount": 1, "zzz": 1}, "step.input: Additional properties are not allowed"),
    ],
)
def test_schema_errors_name_the_json_path(inputs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_input(SCHEMA, inputs)
    assert str(info.value).startswith(message)
    assert info.value.field == message.split(":")[0]


def test_valid_input_passes() -> None:
    validate_input(SCHEMA, {"amount": 0, "items": [{"n": "x"}]})
