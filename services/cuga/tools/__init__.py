"""The tool SDK: what a tool author imports to define tools for cuga workers.

A tool is a :class:`ToolSpec` (name, description, JSON-schema ``parameters``,
capabilities, ``sensitive``, cost, timeout, keywords) plus a handler
``(inputs, context) -> result``, plain or ``async``. Packages publish tools through the
entry-point group ``cuga.tools``; a worker loads them with
:meth:`ToolRegistry.load_entry_points`, refusing handlers outside its allowlisted module
namespaces. See ``docs/tools/creating-tools.md``.
"""

from __future__ import annotations

from cuga.tools._registry import (
    ENTRY_POINT_GROUP,
    ToolLoadError,
    ToolRegistry,
    in_namespaces,
    to_proto,
)
from cuga.tools._schema import InputSchema, SchemaProblem, check_input, json_path, validate_input
from cuga.tools._spec import (
    TOOL_NAME_PATTERN,
    ToolContext,
    ToolDefinitionError,
    ToolHandler,
    ToolResult,
    ToolSpec,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "TOOL_NAME_PATTERN",
    "InputSchema",
    "SchemaProblem",
    "ToolContext",
    "ToolDefinitionError",
    "ToolHandler",
    "ToolLoadError",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "check_input",
    "in_namespaces",
    "json_path",
    "to_proto",
    "validate_input",
]
