"""The tool definition tool authors write: :class:`ToolSpec` and :class:`ToolContext`."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema

from cuga.tools._schema import InputSchema

#: Tool names: 1 to 128 characters of ``[A-Za-z0-9_.-]`` (the contract's limit).
TOOL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
#: Capabilities and keywords: short lowercase-ish tokens routing and planning match on.
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")

#: What a handler may return: any JSON value (dict, list, str, number, bool, None).
ToolResult = Any
#: ``(inputs, context) -> result``, plain or ``async``.
ToolHandler = Callable[[dict[str, Any], "ToolContext"], ToolResult | Awaitable[ToolResult]]


class ToolDefinitionError(ValueError):
    """A :class:`ToolSpec` is malformed (bad name, schema, handler, cost or timeout)."""


@dataclass(frozen=True)
class ToolContext:
    """What a handler knows about the call it serves.

    Attributes:
        run_id: the run the step belongs to (empty when called outside a run).
        step_id: the step being executed.
        profile: tenant/profile of the run (``default`` when the run named none).
        user_id: who started the run.
        attempt: attempt number, starting at 1.
        deadline: epoch seconds by which the handler must have returned (the tool's timeout
            or the caller's deadline, whichever comes first); ``None`` when unbounded.
        sandbox_dir: the only directory a tool may read or write files in.
        metadata: the run's free-form labels.
    """

    run_id: str = ""
    step_id: str = ""
    profile: str = "default"
    user_id: str = ""
    attempt: int = 1
    deadline: float | None = None
    sandbox_dir: Path = Path(".")
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolSpec:
    """A tool: its contract (name, schema, capabilities, cost, timeout) and its handler.

    Attributes:
        name: unique tool name, 1 to 128 characters of ``[A-Za-z0-9_.-]``.
        description: what it does, for planners and people.
        parameters: JSON schema of the input object (Draft 2020-12 unless its ``$schema``
            names another); ``pattern`` is an ECMA-262 regular expression, matched in linear
            time, so lookaround and backreferences are refused (see
            :class:`~cuga.tools.InputSchema`).
        handler: ``(inputs, context) -> result``; an ``async def`` runs on the worker's
            event loop; a plain function defined at the top level of a module runs in a
            tool process (killed when it overruns its timeout), any other callable in a
            thread. The result must be JSON-serialisable.
        capabilities: capabilities it provides (routing matches on them).
        sensitive: whether a call may need human approval (the default approval policy
            gates sensitive tools).
        cost: budget units charged per call, >= 0.
        timeout: longest a call may run, seconds, > 0.
        keywords: words that help planning rank the tool against a goal.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    handler: ToolHandler
    capabilities: tuple[str, ...] = ()
    sensitive: bool = False
    cost: float = 1.0
    timeout: float = 30.0
    keywords: tuple[str, ...] = ()
    validator: InputSchema = field(init=False, repr=False, compare=False)
    """The compiled input validator (made once here, not on every call)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TOOL_NAME_PATTERN.fullmatch(self.name):
            raise ToolDefinitionError(
                f"tool name {self.name!r} is malformed (want {TOOL_NAME_PATTERN.pattern})"
            )
        if not callable(self.handler):
            raise ToolDefinitionError(f"tool {self.name!r}: handler is not callable")
        if not isinstance(self.parameters, Mapping):
            raise ToolDefinitionError(f"tool {self.name!r}: parameters must be a JSON schema dict")
        if self.parameters.get("type", "object") != "object":
            raise ToolDefinitionError(f"tool {self.name!r}: parameters must describe an object")
        try:
            validator = InputSchema(self.parameters)
        except jsonschema.SchemaError as exc:
            raise ToolDefinitionError(
                f"tool {self.name!r}: parameters is not a valid JSON schema: {exc.message}"
            ) from None
        # Frozen dataclass: set once, here, like a field the constructor computes.
        object.__setattr__(self, "validator", validator)
        for what, values in (("capabilities", self.capabilities), ("keywords", self.keywords)):
            for value in values:
                if not isinstance(value, str) or not TOKEN_PATTERN.fullmatch(value):
                    raise ToolDefinitionError(
                        f"tool {self.name!r}: {what} entry {value!r} is malformed"
                    )
        if not math.isfinite(self.cost) or self.cost < 0:
            raise ToolDefinitionError(f"tool {self.name!r}: cost must be a finite number >= 0")
        if not math.isfinite(self.timeout) or self.timeout <= 0:
            raise ToolDefinitionError(f"tool {self.name!r}: timeout must be > 0 seconds")

    @property
    def is_async(self) -> bool:
        """Whether the handler is a coroutine function (runs on the loop, not in a tool
        process or thread)."""
        handler: Any = self.handler
        return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )

    @property
    def handler_module(self) -> str:
        """The module the handler is defined in (checked against the allowlist)."""
        handler: Any = self.handler
        module = getattr(handler, "__module__", None)
        if module is None:
            module = getattr(type(handler), "__module__", "")
        return str(module or "")
