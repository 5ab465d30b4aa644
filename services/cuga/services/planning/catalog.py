"""Where the planner learns which tools exist: an injected catalogue."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml
from google.protobuf import json_format

from cuga.common.v1 import common_pb2
from cuga.shared.config import ConfigError, yaml_problem


@runtime_checkable
class ToolCatalog(Protocol):
    """The tools plans may use, by name.

    Implementations raise :class:`~cuga.shared.errors.UnavailableError` when they cannot
    tell (never an empty mapping standing in for "unknown"), so a plan is never validated
    against a catalogue that failed to load.
    """

    async def tools(self) -> Mapping[str, common_pb2.ToolSpec]:
        """Every known tool, by name."""
        ...


class StaticToolCatalog:
    """A fixed set of tools (unit tests, ``static_tools_file``, embedded use)."""

    def __init__(self, specs: Iterable[common_pb2.ToolSpec]) -> None:
        self._tools: dict[str, common_pb2.ToolSpec] = {}
        for spec in specs:
            copy = common_pb2.ToolSpec()
            copy.CopyFrom(spec)
            self._tools[spec.name] = copy

    async def tools(self) -> Mapping[str, common_pb2.ToolSpec]:
        # Copies: a caller that edits a spec must not change the catalogue.
        out: dict[str, common_pb2.ToolSpec] = {}
        for name, spec in self._tools.items():
            out[name] = common_pb2.ToolSpec()
            out[name].CopyFrom(spec)
        return out


def parse_tool_specs(data: Any, where: str) -> list[common_pb2.ToolSpec]:
    """ToolSpecs from a list of mappings (or ``{"tools": [...]}``) in proto JSON form.

    Raises:
        ConfigError: naming ``where`` and the offending entry.
    """
    if isinstance(data, Mapping) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise ConfigError(where, "must hold a list of tool specs (or a mapping with 'tools')")
    specs: list[common_pb2.ToolSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}[{i}]", "must be a mapping")
        try:
            spec = json_format.ParseDict(dict(item), common_pb2.ToolSpec())
        except json_format.ParseError as exc:
            raise ConfigError(f"{where}[{i}]", f"is not a ToolSpec: {exc}") from None
        if not spec.name:
            raise ConfigError(f"{where}[{i}].name", "is required")
        if spec.name in seen:
            raise ConfigError(f"{where}[{i}].name", f"{spec.name!r} is listed twice")
        if spec.cost < 0:
            raise ConfigError(f"{where}[{i}].cost", "must be >= 0")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def load_tool_specs_file(
    path: str | Path, key: str = "planning.static_tools_file"
) -> list[common_pb2.ToolSpec]:
    """Read a YAML or JSON file of ToolSpecs (JSON is YAML, so one parser reads both)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"not valid YAML/JSON: {yaml_problem(str(path), exc)}") from None
    return parse_tool_specs(data, key)


def tool_specs_to_json(specs: Iterable[common_pb2.ToolSpec]) -> str:
    """The JSON form :func:`load_tool_specs_file` reads (handy for writing fixtures)."""
    return json.dumps({"tools": [json_format.MessageToDict(s) for s in specs]}, indent=2)


__all__ = [
    "StaticToolCatalog",
    "ToolCatalog",
    "load_tool_specs_file",
    "parse_tool_specs",
    "tool_specs_to_json",
]
