"""Input validation against a tool's JSON schema, with the semantics JSON Schema specifies.

One validator, :class:`InputSchema`, serves the worker (every step's input, before the
handler runs) and planning (explicit plans and ranked candidates), so both accept exactly
the same inputs.

It runs on jsonschema-rs, not on the pure-Python ``jsonschema`` package. JSON Schema's
``pattern`` and ``patternProperties`` are ECMA-262 regular expressions, and ``jsonschema``
matches them with Python's ``re.search``: its ``$`` also matches before a final newline (so
``"DE44ZZZZ9999\\n"`` passed ``^DE[0-9]{2}[A-Z0-9]{8}$`` and reached a payment tool), its
``\\d`` and ``\\w`` match any Unicode digit or letter, and it backtracks (``^(a+)+$`` takes
exponential time on ``"aaaa...!"``). jsonschema-rs translates ECMA-262 (``\\d`` is
``[0-9]``, ``\\w`` ASCII, ``.`` matches no line terminator, ``$`` only the very end) and,
with :class:`jsonschema_rs.RegexOptions`, matches on Rust's ``regex`` crate, which runs in
time linear in the input. What that engine cannot do in linear time (lookaround,
backreferences) is refused when the schema is compiled, that is when a tool is defined.

Formats are annotations only (as they were), and no ``$ref`` is fetched over the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
import jsonschema_rs

from cuga.shared.errors import InvalidArgumentError

#: Longest message quoted from a violation (messages quote the offending value).
MAX_MESSAGE_CHARS = 300

_KIND = jsonschema_rs.ValidationErrorKind
#: Violations less telling than any other at the same place (as jsonschema's best_match).
_WEAK = frozenset({"anyOf", "oneOf"})
_JSONPATH_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*")


def json_path(prefix: str, parts: Iterable[str | int]) -> str:
    """``prefix`` followed by a dotted/indexed path: ``step.input.items[2].name``."""
    path = prefix
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


@dataclass(frozen=True)
class SchemaProblem:
    """One way an input fails its schema."""

    path: tuple[str | int, ...]
    """Where in the input: keys and indexes from its root."""
    message: str
    """What is wrong, quoting the value (at most 300 characters)."""
    rule: str
    """The schema keyword violated (``minimum``, ``pattern``, ``required`` ...)."""
    instance: Any
    """The offending value."""

    @property
    def json_path(self) -> str:
        """The place as a JSONPath: ``$.items[1].name``, ``$['odd key']``."""
        path = "$"
        for part in self.path:
            if isinstance(part, int):
                path += f"[{part}]"
            elif _JSONPATH_NAME.fullmatch(part):
                path += f".{part}"
            else:
                path += "['" + part.replace("\\", "\\\\").replace("'", "\\'") + "']"
        return path


def _message(error: jsonschema_rs.ValidationError) -> str:
    """The violation in the words ``jsonschema`` used (Python reprs), which clients and
    messages written before the switch rely on; jsonschema-rs's own words otherwise."""
    kind, value = error.kind, error.instance
    if isinstance(kind, _KIND.Required):
        return f"{kind.property!r} is a required property"
    if isinstance(kind, _KIND.Type):
        return f"{value!r} is not of type {', '.join(repr(t) for t in kind.types)}"
    if isinstance(kind, _KIND.Minimum):
        return f"{value!r} is less than the minimum of {kind.limit!r}"
    if isinstance(kind, _KIND.Maximum):
        return f"{value!r} is greater than the maximum of {kind.limit!r}"
    if isinstance(kind, _KIND.ExclusiveMinimum):
        return f"{value!r} is less than or equal to the minimum of {kind.limit!r}"
    if isinstance(kind, _KIND.ExclusiveMaximum):
        return f"{value!r} is greater than or equal to the maximum of {kind.limit!r}"
    if isinstance(kind, _KIND.Pattern):
        return f"{value!r} does not match {kind.pattern!r}"
    if isinstance(kind, _KIND.Enum):
        return f"{value!r} is not one of {kind.options!r}"
    if isinstance(kind, _KIND.Constant):
        return f"{kind.expected_value!r} was expected"
    if isinstance(kind, _KIND.AdditionalProperties):
        extra = ", ".join(repr(name) for name in sorted(kind.unexpected))
        verb = "was" if len(kind.unexpected) == 1 else "were"
        return f"Additional properties are not allowed ({extra} {verb} unexpected)"
    if isinstance(kind, _KIND.AnyOf | _KIND.OneOfNotValid):
        return f"{value!r} is not valid under any of the given schemas"
    return error.message


def _problem(error: jsonschema_rs.ValidationError, instance: Any) -> SchemaProblem:
    message, rule = _message(error), error.kind.name
    value: Any = error.instance
    path = list(error.schema_path)
    if isinstance(error.kind, _KIND.FalseSchema) and path and path[-1] == "additionalProperties":
        # jsonschema-rs compiles ``additionalProperties: false`` beside no ``properties``
        # into a false schema for the first member's value ("False schema does not allow
        # 1", at the object's path): every member is unexpected, say which.
        for part in error.instance_path:  # the object, found where the validator was
            instance = instance[part]
        extra = ", ".join(repr(name) for name in sorted(instance))
        verb = "was" if len(instance) == 1 else "were"
        message = f"Additional properties are not allowed ({extra} {verb} unexpected)"
        rule, value = "additionalProperties", instance
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    return SchemaProblem(tuple(error.instance_path), message, rule, value)


def _path_order(problem: SchemaProblem) -> tuple[tuple[bool, str | int], ...]:
    # Keys and indexes never compare with each other; (is_key, part) always does.
    return tuple((isinstance(part, str), part) for part in problem.path)


class InputSchema:
    """A tool's input schema, checked against its meta-schema and compiled once.

    The draft is the one the schema's ``$schema`` names, Draft 2020-12 when it names none.

    Raises:
        jsonschema.SchemaError: the schema is not a valid JSON schema, or one of its
            patterns is not an ECMA-262 regular expression matchable in linear time.
    """

    __slots__ = ("_validator", "schema")

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = dict(schema)
        """The schema, as given."""
        try:
            self._validator = jsonschema_rs.validator_for(
                self.schema,
                pattern_options=jsonschema_rs.RegexOptions(),
                validate_formats=False,
                offline=True,
            )
        except jsonschema_rs.ValidationError as exc:  # unresolvable $refs included
            raise jsonschema.SchemaError(_schema_problem(exc)) from None

    def is_valid(self, instance: Any) -> bool:
        """Whether ``instance`` satisfies the schema (the fast check: no messages)."""
        return self._validator.is_valid(instance)

    def problems(self, instance: Any) -> list[SchemaProblem]:
        """Every way ``instance`` fails the schema, in the order of their places."""
        if self._validator.is_valid(instance):
            return []
        problems = (_problem(e, instance) for e in self._validator.iter_errors(instance))
        return sorted(problems, key=_path_order)

    def best_problem(self, instance: Any) -> SchemaProblem | None:
        """The most telling way ``instance`` fails (None when it does not): the one nearest
        the root, an ``anyOf``/``oneOf`` only when nothing else fails there."""
        if self._validator.is_valid(instance):
            return None
        best: SchemaProblem | None = None
        for error in self._validator.iter_errors(instance):
            problem = _problem(error, instance)
            if best is None or _rank(problem) > _rank(best):
                best = problem
        return best


def _rank(problem: SchemaProblem) -> tuple[int, bool]:
    return -len(problem.path), problem.rule not in _WEAK


def _schema_problem(exc: jsonschema_rs.ValidationError) -> str:
    where = json_path("", exc.instance_path)
    message = exc.message.split("\n", 1)[0]
    if isinstance(exc.kind, _KIND.Format) and exc.kind.format == "regex":
        message += (
            " (patterns are ECMA-262 regular expressions matched in linear time:"
            " no lookaround, no backreferences)"
        )
    return f"{where}: {message}" if where else message


def validate_input(
    parameters: Mapping[str, Any], inputs: Any, *, field: str = "step.input"
) -> None:
    """Check ``inputs`` against the schema ``parameters``.

    Raises:
        InvalidArgumentError: naming the JSON path of the most relevant violation, e.g.
            ``step.input.amount: -5 is less than the minimum of 0``.
        jsonschema.SchemaError: ``parameters`` is not a valid schema.
    """
    check_input(InputSchema(parameters), inputs, field=field)


def check_input(validator: InputSchema, inputs: Any, *, field: str = "step.input") -> None:
    """:func:`validate_input` with a validator made once (``ToolSpec.validator``).

    Raises:
        InvalidArgumentError: as :func:`validate_input`.
    """
    problem = validator.best_problem(inputs)
    if problem is None:
        return
    raise InvalidArgumentError(
        json_path(field, problem.path), problem.message, metadata={"schema_rule": problem.rule}
    )
