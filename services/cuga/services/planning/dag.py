"""Plan validation: step syntax, the dependency DAG, tools and input schemas, ordering.

Every failure is INVALID_ARGUMENT naming the step (``steps[2].depends_on[0]``) and the
problem, so a client can fix its plan without guessing.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from jsonschema import exceptions as jsonschema_exceptions

from cuga.common.v1 import common_pb2
from cuga.shared.config import Limits
from cuga.shared.errors import FailedPreconditionError, InvalidArgumentError
from cuga.shared.messages import struct_to_dict
from cuga.shared.templates import has_reference, references
from cuga.shared.validation import check_plan_step
from cuga.tools import InputSchema


def _label(index: int, step: common_pb2.PlanStep) -> str:
    return f"steps[{index}]" + (f" ({step.step_id!r})" if step.step_id else "")


def check_step_syntax(steps: Sequence[common_pb2.PlanStep], limits: Limits) -> None:
    """Checks that need no catalogue: ids, costs, sizes and dependency references."""
    if len(steps) > limits.max_steps:
        raise InvalidArgumentError(
            "steps", f"has {len(steps)} steps, the limit is {limits.max_steps}"
        )
    index_of: dict[str, int] = {}
    for i, step in enumerate(steps):
        check_plan_step(
            f"steps[{i}]",
            step,
            max_input_bytes=limits.max_input_bytes,
            max_depends_on=limits.max_steps,
        )
        if step.step_id in index_of:
            raise InvalidArgumentError(
                f"steps[{i}].step_id",
                f"{step.step_id!r} is already the id of steps[{index_of[step.step_id]}]",
            )
        index_of[step.step_id] = i
    for i, step in enumerate(steps):
        seen: set[str] = set()
        for j, dep in enumerate(step.depends_on):
            field = f"steps[{i}].depends_on[{j}]"
            if dep == step.step_id:
                raise InvalidArgumentError(field, f"step {step.step_id!r} depends on itself")
            if dep not in index_of:
                raise InvalidArgumentError(
                    field, f"step {step.step_id!r} depends on {dep!r}, which is not in the plan"
                )
            if dep in seen:
                raise InvalidArgumentError(field, f"step {step.step_id!r} lists {dep!r} twice")
            seen.add(dep)


def find_cycle(steps: Sequence[common_pb2.PlanStep]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]`` (each depends on the next), or None."""
    deps = {s.step_id: list(s.depends_on) for s in steps}
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for root in deps:
        if colour[root] != white:
            continue
        # Iterative DFS so a long chain cannot overflow the recursion limit.
        path: list[str] = [root]
        iters: list[Iterator[str]] = [iter(deps[root])]
        colour[root] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
                continue
            if nxt not in colour:
                continue  # a missing dependency is reported by check_step_syntax
            if colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def topological_order(steps: Sequence[common_pb2.PlanStep]) -> list[int]:
    """Indexes of ``steps`` in dependency order, keeping the client's order where possible.

    Kahn's algorithm with the original index as priority: among the ready steps the one
    given first goes first, so an already-ordered plan comes back unchanged.

    Raises:
        InvalidArgumentError: on a cycle, naming the steps on it.
    """
    cycle = find_cycle(steps)
    if cycle is not None:
        raise InvalidArgumentError("steps", f"the dependencies form a cycle: {' -> '.join(cycle)}")
    index_of = {s.step_id: i for i, s in enumerate(steps)}
    pending = [len(set(s.depends_on)) for s in steps]
    dependants: dict[int, list[int]] = {i: [] for i in range(len(steps))}
    for i, s in enumerate(steps):
        for dep in set(s.depends_on):
            dependants[index_of[dep]].append(i)
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in dependants[i]:
            pending[j] -= 1
            if pending[j] == 0:
                heapq.heappush(ready, j)
    return order


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _ancestors(steps: Sequence[common_pb2.PlanStep]) -> dict[str, set[str]]:
    deps = {s.step_id: list(s.depends_on) for s in steps}
    result: dict[str, set[str]] = {}
    for s in steps:
        seen: set[str] = set()
        stack = list(deps[s.step_id])
        while stack:
            d = stack.pop()
            if d not in seen:
                seen.add(d)
                stack.extend(deps.get(d, ()))
        result[s.step_id] = seen
    return result


def schema_errors(validator: InputSchema, instance: Any) -> list[str]:
    """``"<json path>: <problem>"`` for each way ``instance`` fails ``validator``'s schema.

    A string holding a ``{{steps...}}`` reference is only known at run time, so errors
    about such a value are not counted.
    """
    return [
        f"{problem.json_path}: {problem.message}"
        for problem in validator.problems(instance)
        if not (isinstance(problem.instance, str) and has_reference(problem.instance))
    ]


class SchemaValidators:
    """Compiled input validators by tool schema, each schema checked against its
    meta-schema once: that check costs far more than validating an input, and plans call
    the same few tools over and over. They are the workers' validator
    (:class:`cuga.tools.InputSchema`), so a plan is held to what the worker will check.

    Args:
        limit: most schemas kept; the cache starts over when it is full (a catalog has a
            bounded number of tools, so this only guards against schemas that churn).
    """

    def __init__(self, limit: int = 1024) -> None:
        self._limit = limit
        self._cache: dict[bytes, InputSchema | None] = {}

    def get(self, spec: common_pb2.ToolSpec) -> InputSchema | None:
        """The validator of ``spec.parameters`` (None for an empty schema).

        Raises:
            jsonschema.SchemaError: when the schema is invalid (never cached).
        """
        key = spec.parameters.SerializeToString(deterministic=True)
        if key in self._cache:
            return self._cache[key]
        schema = struct_to_dict(spec.parameters)
        validator = InputSchema(schema) if schema else None
        if len(self._cache) >= self._limit:
            self._cache.clear()
        self._cache[key] = validator
        return validator

    def errors(self, spec: common_pb2.ToolSpec, instance: Any) -> list[str]:
        """:func:`schema_errors` of ``instance`` against the tool's input schema.

        Raises:
            jsonschema.SchemaError: when the schema is invalid.
        """
        validator = self.get(spec)
        return [] if validator is None else schema_errors(validator, instance)


def check_against_catalog(
    steps: Sequence[common_pb2.PlanStep],
    tools: Mapping[str, common_pb2.ToolSpec],
    validators: SchemaValidators | None = None,
) -> None:
    """Unknown tools, inputs failing the tool's JSON schema, references to non-ancestors."""
    ancestors = _ancestors(steps)
    validators = validators or SchemaValidators()
    for i, step in enumerate(steps):
        spec = tools.get(step.tool)
        if spec is None:
            raise InvalidArgumentError(
                f"steps[{i}].tool",
                f"step {step.step_id!r} uses unknown tool {step.tool!r} (no registered worker"
                " offers it)",
            )
        data = struct_to_dict(step.input)
        for text in _strings(data):
            for ref in references(text):
                if ref.step_id not in ancestors[step.step_id]:
                    raise InvalidArgumentError(
                        f"steps[{i}].input",
                        f"step {step.step_id!r} references the output of {ref.step_id!r}, which is"
                        " not one of its dependencies",
                    )
        try:
            problems = validators.errors(spec, data)
        except jsonschema_exceptions.SchemaError as exc:
            raise FailedPreconditionError(
                f"tool {step.tool!r} declares an invalid input schema: {exc.message}",
                reason="INVALID_TOOL_SCHEMA",
            ) from None
        if problems:
            raise InvalidArgumentError(
                f"steps[{i}].input",
                f"step {step.step_id!r}: input does not match the schema of tool"
                f" {step.tool!r}: {problems[0]}",
            )


def tool_cost(spec: common_pb2.ToolSpec) -> float:
    """A tool's declared cost per call; a nonsensical one (negative, NaN) counts as 0."""
    return spec.cost if math.isfinite(spec.cost) and spec.cost > 0 else 0.0


def validate_steps(
    steps: Sequence[common_pb2.PlanStep],
    tools: Mapping[str, common_pb2.ToolSpec],
    limits: Limits,
    validators: SchemaValidators | None = None,
) -> list[common_pb2.PlanStep]:
    """Validate a plan's steps and return copies in topological order.

    Each copy's ``estimated_cost`` is at least the tool's declared cost (a step that gave
    0, or less, gets the declared cost: a client cannot make a plan fit a budget by
    estimating low); everything else (capability, reason, optional) stays as given.
    """
    check_step_syntax(steps, limits)
    order = topological_order(steps)
    check_against_catalog(steps, tools, validators)
    out: list[common_pb2.PlanStep] = []
    for i in order:
        copy = common_pb2.PlanStep()
        copy.CopyFrom(steps[i])
        copy.estimated_cost = max(copy.estimated_cost, tool_cost(tools[copy.tool]))
        out.append(copy)
    return out


__all__ = [
    "SchemaValidators",
    "check_against_catalog",
    "check_step_syntax",
    "find_cycle",
    "tool_cost",
    "topological_order",
    "validate_steps",
]
