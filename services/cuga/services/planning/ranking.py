"""Deterministic, explainable ranking of tools against a goal (no external model).

A goal and each tool are reduced to sets of normalised words (lower case, stop words
removed, a light plural/-ing stemming). A tool scores 3 per goal word among its keywords,
2 per goal word in its name, 1 per goal word in its description; each goal word counts
once per tool, at its best weight. The reason given for a step lists exactly what matched.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cuga.common.v1 import common_pb2
from cuga.shared.messages import struct_to_dict

KEYWORD_WEIGHT = 3.0
NAME_WEIGHT = 2.0
DESCRIPTION_WEIGHT = 1.0

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_STOP = frozenset(
    re.findall(
        r"\w+",
        """a an and are as at be by can do does for from get give has have how i in into is it
        its me my of on or our please show that the their them then this to us use using want
        was we what when where which who will with would you your""",
    )
)


def _stem(word: str) -> str:
    if len(word) > 5 and word.endswith("ing"):
        return word[:-3]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> set[str]:
    """Normalised content words of a text (camelCase and snake_case split)."""
    text = _CAMEL.sub(" ", text)
    return {_stem(w) for w in (m.casefold() for m in _WORD.findall(text)) if w not in _STOP}


@dataclass(frozen=True)
class ToolScore:
    """How well one tool matches a goal."""

    tool: common_pb2.ToolSpec
    score: float
    keyword_hits: tuple[str, ...] = ()
    name_hits: tuple[str, ...] = ()
    description_hits: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """A sentence saying why the tool was chosen."""
        parts = []
        if self.keyword_hits:
            parts.append("keywords " + ", ".join(repr(w) for w in self.keyword_hits))
        if self.name_hits:
            parts.append("name words " + ", ".join(repr(w) for w in self.name_hits))
        if self.description_hits:
            parts.append("description words " + ", ".join(repr(w) for w in self.description_hits))
        return (
            f"tool {self.tool.name!r} matches the goal on {'; '.join(parts)} (score {self.score:g})"
        )


def score_tool(goal_words: set[str], tool: common_pb2.ToolSpec) -> ToolScore:
    """Score one tool against the goal's words."""
    keywords: set[str] = set()
    for kw in tool.keywords:
        keywords |= words(kw)
    name = words(tool.name.replace(".", " ").replace("-", " ").replace("_", " "))
    description = words(tool.description)
    kw_hits = sorted(goal_words & keywords)
    name_hits = sorted((goal_words & name) - keywords)
    desc_hits = sorted((goal_words & description) - keywords - name)
    score = (
        KEYWORD_WEIGHT * len(kw_hits)
        + NAME_WEIGHT * len(name_hits)
        + DESCRIPTION_WEIGHT * len(desc_hits)
    )
    return ToolScore(tool, score, tuple(kw_hits), tuple(name_hits), tuple(desc_hits))


def rank_tools(goal: str, tools: Iterable[common_pb2.ToolSpec]) -> list[ToolScore]:
    """Every tool with a positive score, best first (ties by name, so the order is stable)."""
    goal_words = words(goal)
    scored = [score_tool(goal_words, t) for t in tools]
    return sorted((s for s in scored if s.score > 0), key=lambda s: (-s.score, s.tool.name))


#: Property names (as words) that hold a reference to something, not free text: the goal
#: sentence put there would be a file name or an address nobody has ("summarize it" as a
#: path). Such a property cannot be derived from the goal.
_REFERENCE_WORDS = frozenset(
    {"path", "file", "filename", "dir", "directory", "url", "uri", "id", "email", "account"}
)


def _reference_kind(name: str, schema: Mapping[str, Any]) -> str:
    """What a string property refers to (``file path``, ``uri``...), or ``""`` for text."""
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt:
        return f"{fmt} (its schema's format)"
    if "enum" in schema or "const" in schema:
        return "value from a fixed list"
    described = words(str(schema.get("description", "")))
    named = words(_CAMEL.sub(" ", name).replace("_", " ").replace("-", " "))
    hit = sorted(named & _REFERENCE_WORDS) or sorted(described & {"path", "url", "uri"})
    if hit:
        return hit[0] if hit[0] != "path" else "file path"
    return ""


def _prose(name: str, schema: Any) -> bool:
    """Whether a string property takes free text such as the goal sentence."""
    return isinstance(schema, Mapping) and not _reference_kind(name, schema)


@dataclass(frozen=True)
class DerivedInput:
    """The input built for a tool from the goal, or why none could be."""

    value: dict[str, Any] | None
    problem: str = ""
    filled: tuple[str, ...] = field(default=())


def derive_input(goal: str, tool: common_pb2.ToolSpec) -> DerivedInput:
    """Build a tool's input from the goal text where its schema allows it.

    - No properties required: the input is empty, except that a schema with exactly one
      string property gets the goal in it.
    - Exactly one required property, of type string: it gets the goal.
    - Never into a property that refers to something (a file path, URL, id, a ``format``
      or an ``enum``): the goal sentence is not a file name.
    - Anything else needs facts the goal text alone does not give: no input.
    The caller still validates the result against the schema.
    """
    schema: Mapping[str, Any] = struct_to_dict(tool.parameters)
    props = schema.get("properties") or {}
    if not isinstance(props, Mapping):
        props = {}
    required = [r for r in (schema.get("required") or []) if isinstance(r, str)]
    strings = [
        name
        for name, sub in props.items()
        if isinstance(sub, Mapping) and sub.get("type") == "string"
    ]
    if not required:
        if len(strings) == 1 and _prose(strings[0], props[strings[0]]):
            return DerivedInput({strings[0]: goal}, filled=(strings[0],))
        return DerivedInput({})
    if len(required) == 1 and required[0] in strings:
        if not _prose(required[0], props[required[0]]):
            return DerivedInput(
                None,
                problem=f"needs {required[0]!r}, a {_reference_kind(required[0], props[required[0]])},"
                " which the goal text is not",
            )
        return DerivedInput({required[0]: goal}, filled=(required[0],))
    return DerivedInput(
        None,
        problem=f"needs {', '.join(repr(r) for r in required)}, which cannot be derived from"
        " the goal text",
    )


__all__ = [
    "DESCRIPTION_WEIGHT",
    "KEYWORD_WEIGHT",
    "NAME_WEIGHT",
    "DerivedInput",
    "ToolScore",
    "derive_input",
    "rank_tools",
    "score_tool",
    "words",
]
