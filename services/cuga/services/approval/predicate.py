"""The rule predicate language: a small, safe expression language parsed by hand.

Grammar (keywords are lowercase)::

    expr       := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand [compare_op operand | ["not"] "in" collection]
    operand    := "(" expr ")" | literal | path
    compare_op := "==" | "!=" | "<" | "<=" | ">" | ">="
    collection := list | NAME (a list defined under ``lists:``) | path
    literal    := NUMBER | STRING | "true" | "false" | list
    list       := "[" [literal ("," literal)*] "]"
    path       := NAME ("." NAME)*

Paths: ``input.amount`` (or just ``amount``) is a field of the step input;
``context.profile``, ``context.user_id``, ``context.run_id`` and ``context.metadata.<key>``
come from the run's context; ``tool`` and ``profile`` name the step's tool and profile.
A path that does not resolve makes every comparison that uses it false (and a bare path
tests false), so ``not (amount > 10)`` is true when there is no amount. Comparisons of
mismatched types (a string with a number) are false too; booleans are not numbers.

Nothing here evaluates Python: the tokenizer and recursive-descent parser build a tree
of the node classes below, and :meth:`Node.evaluate` walks it. Every malformed input
raises :class:`PredicateError` (never anything else), with the column of the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Longest predicate accepted, characters.
MAX_PREDICATE_CHARS = 4096
#: Deepest nesting (parentheses, ``not``) accepted, so parsing never exhausts the stack.
MAX_DEPTH = 64

_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_COMPARE_OPS = ("==", "!=", "<=", ">=", "<", ">")
_MISSING = object()


class PredicateError(ValueError):
    """A predicate is malformed; ``column`` is 1-based (0 when not tied to a place)."""

    def __init__(self, problem: str, column: int = 0) -> None:
        super().__init__(f"{problem} at column {column}" if column else problem)
        self.problem = problem
        self.column = column


@dataclass(frozen=True)
class Token:
    """One lexical token: kind is NUMBER, STRING, NAME, OP, KEYWORD or END."""

    kind: str
    value: Any
    column: int


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens (ending with an END token)."""
    if len(text) > MAX_PREDICATE_CHARS:
        raise PredicateError(f"predicate is longer than {MAX_PREDICATE_CHARS} characters")
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        col = i + 1
        if ch in " \t\r\n":
            i += 1
        elif ch in "()[],.":
            tokens.append(Token("OP", ch, col))
            i += 1
        elif ch in "=!<>":
            two = text[i : i + 2]
            if two in ("==", "!=", "<=", ">="):
                tokens.append(Token("OP", two, col))
                i += 2
            elif ch in "<>":
                tokens.append(Token("OP", ch, col))
                i += 1
            else:
                raise PredicateError(f"unexpected {ch!r} (did you mean '=='?)", col)
        elif ch in "\"'":
            string, i = _read_string(text, i)
            tokens.append(Token("STRING", string, col))
        elif ch.isascii() and (ch.isdigit() or (ch == "-" and _digit_at(text, i + 1))):
            number, i = _read_number(text, i)
            tokens.append(Token("NUMBER", number, col))
        elif ch.isascii() and (ch.isalpha() or ch == "_"):
            j = i
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            word = text[i:j]
            tokens.append(Token("KEYWORD" if word in _KEYWORDS else "NAME", word, col))
            i = j
        else:
            raise PredicateError(f"unexpected character {ch!r}", col)
    tokens.append(Token("END", None, n + 1))
    return tokens


def _digit_at(text: str, i: int) -> bool:
    return i < len(text) and text[i].isascii() and text[i].isdigit()


def _read_string(text: str, start: int) -> tuple[str, int]:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'"}
    while i < len(text):
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt not in escapes:
                raise PredicateError(f"unknown escape '\\{nxt}' in string", i + 1)
            out.append(escapes[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    raise PredicateError("unterminated string", start + 1)


def _read_number(text: str, start: int) -> tuple[float | int, int]:
    i = start + 1 if text[start] == "-" else start
    while _digit_at(text, i):
        i += 1
    is_float = False
    if i < len(text) and text[i] == "." and _digit_at(text, i + 1):
        is_float = True
        i += 1
        while _digit_at(text, i):
            i += 1
    literal = text[start:i]
    if i < len(text) and text[i].isascii() and (text[i].isalpha() or text[i] == "_"):
        raise PredicateError(f"malformed number {text[start : i + 1]!r}", start + 1)
    return (float(literal) if is_float else int(literal)), i


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Node:
    """A node of a parsed predicate."""

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        """The node's value in ``env`` (``_MISSING`` for an unresolved path)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Literal(Node):
    """A number, string, boolean or list literal."""

    value: Any

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        return self.value


@dataclass(frozen=True)
class Path(Node):
    """A dotted path into the evaluation environment."""

    parts: tuple[str, ...]

    def evaluate(self, env: Mapping[str, Any]) -> Any:
        value: Any = env
        for part in self.parts:
            if not isinstance(value, Mapping) or part not in value:
                return _MISSING
            value = value[part]
        return value


@dataclass(frozen=True)
class Compare(Node):
    """``left op right``; false when a side is missing or the types do not compare."""

    op: str
    left: Node
    right: Node

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        left = self.left.evaluate(env)
        right = self.right.evaluate(env)
        if left is _MISSING or right is _MISSING:
            return False
        if self.op in ("in", "not in"):
            if not isinstance(right, list | tuple):
                return False
            found = any(_equal(left, item) for item in right)
            return found if self.op == "in" else not found
        if self.op == "==":
            return _equal(left, right)
        if self.op == "!=":
            return _comparable(left, right) and not _equal(left, right)
        if not _ordered(left, right):
            return False
        if self.op == "<":
            return bool(left < right)
        if self.op == "<=":
            return bool(left <= right)
        if self.op == ">":
            return bool(left > right)
        return bool(left >= right)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _comparable(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return True
    return type(a) is type(b)


def _ordered(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return not (isinstance(a, float) and math.isnan(a)) and not (
            isinstance(b, float) and math.isnan(b)
        )
    return isinstance(a, str) and isinstance(b, str)


def _equal(a: Any, b: Any) -> bool:
    return _comparable(a, b) and bool(a == b)


@dataclass(frozen=True)
class Truthy(Node):
    """A bare operand used as a condition: true when present and truthy."""

    operand: Node

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        value = self.operand.evaluate(env)
        return value is not _MISSING and bool(value)


@dataclass(frozen=True)
class Not(Node):
    """Negation."""

    operand: Node

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        return not self.operand.evaluate(env)


@dataclass(frozen=True)
class And(Node):
    """Conjunction (short-circuit)."""

    operands: tuple[Node, ...]

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        return all(op.evaluate(env) for op in self.operands)


@dataclass(frozen=True)
class Or(Node):
    """Disjunction (short-circuit)."""

    operands: tuple[Node, ...]

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        return any(op.evaluate(env) for op in self.operands)


# ----------------------------------------------------------------------------- the parser


class _Parser:
    def __init__(self, tokens: Sequence[Token], lists: Mapping[str, Sequence[Any]]) -> None:
        self._tokens = tokens
        self._pos = 0
        self._lists = lists
        self._depth = 0

    @property
    def _tok(self) -> Token:
        return self._tokens[self._pos]

    def _advance(self) -> Token:
        tok = self._tokens[self._pos]
        if tok.kind != "END":
            self._pos += 1
        return tok

    def _at(self, kind: str, value: Any = None) -> bool:
        tok = self._tok
        return tok.kind == kind and (value is None or tok.value == value)

    def _expect(self, kind: str, value: Any, what: str) -> Token:
        if not self._at(kind, value):
            raise PredicateError(f"expected {what}, found {_describe(self._tok)}", self._tok.column)
        return self._advance()

    def _enter(self) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise PredicateError(f"nested deeper than {MAX_DEPTH} levels", self._tok.column)

    def parse(self) -> Node:
        if self._at("END"):
            raise PredicateError("predicate is empty", 1)
        node = self._or()
        if not self._at("END"):
            raise PredicateError(f"unexpected {_describe(self._tok)}", self._tok.column)
        return node

    def _or(self) -> Node:
        items = [self._and()]
        while self._at("KEYWORD", "or"):
            self._advance()
            items.append(self._and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def _and(self) -> Node:
        items = [self._not()]
        while self._at("KEYWORD", "and"):
            self._advance()
            items.append(self._not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def _not(self) -> Node:
        if self._at("KEYWORD", "not"):
            self._advance()
            self._enter()
            node = Not(self._not())
            self._depth -= 1
            return node
        return self._comparison()

    def _comparison(self) -> Node:
        left = self._operand()
        tok = self._tok
        if tok.kind == "OP" and tok.value in _COMPARE_OPS:
            self._advance()
            return Compare(tok.value, left, self._operand())
        if self._at("KEYWORD", "in"):
            self._advance()
            return Compare("in", left, self._collection())
        if self._at("KEYWORD", "not"):
            nxt = self._tokens[self._pos + 1]
            if nxt.kind == "KEYWORD" and nxt.value == "in":
                self._advance()
                self._advance()
                return Compare("not in", left, self._collection())
        return left if isinstance(left, Compare | And | Or | Not | Truthy) else Truthy(left)

    def _operand(self) -> Node:
        tok = self._tok
        if tok.kind == "OP" and tok.value == "(":
            self._advance()
            self._enter()
            node = self._or()
            self._depth -= 1
            self._expect("OP", ")", "')'")
            return node
        if tok.kind == "NAME":
            return self._path()
        return Literal(self._literal())

    def _collection(self) -> Node:
        tok = self._tok
        if tok.kind == "NAME":
            nxt = self._tokens[self._pos + 1]
            if not (nxt.kind == "OP" and nxt.value == "."):
                # A bare name after `in` names a list of the policy file.
                self._advance()
                if tok.value not in self._lists:
                    known = ", ".join(sorted(self._lists)) or "none defined"
                    raise PredicateError(f"unknown list {tok.value!r} (lists: {known})", tok.column)
                return Literal(tuple(self._lists[tok.value]))
            return self._path()
        if tok.kind == "OP" and tok.value == "[":
            return Literal(self._literal())
        raise PredicateError(
            f"expected a list, a list name or a path after 'in', found {_describe(tok)}",
            tok.column,
        )

    def _path(self) -> Node:
        parts = [self._expect("NAME", None, "a name").value]
        while self._at("OP", "."):
            self._advance()
            parts.append(self._expect("NAME", None, "a name after '.'").value)
        # `amount` is short for `input.amount`; `tool` and `profile` are the step's own.
        if parts[0] not in ("input", "context", "tool", "profile"):
            parts.insert(0, "input")
        return Path(tuple(parts))

    def _literal(self) -> Any:
        tok = self._advance()
        if tok.kind in ("NUMBER", "STRING"):
            return tok.value
        if tok.kind == "KEYWORD" and tok.value in ("true", "false"):
            return tok.value == "true"
        if tok.kind == "OP" and tok.value == "[":
            items: list[Any] = []
            if self._at("OP", "]"):
                self._advance()
                return tuple(items)
            while True:
                if self._at("OP", "["):
                    raise PredicateError("lists cannot be nested", self._tok.column)
                items.append(self._literal())
                if self._at("OP", ","):
                    self._advance()
                    continue
                self._expect("OP", "]", "',' or ']'")
                return tuple(items)
        raise PredicateError(f"expected a value, found {_describe(tok)}", tok.column)


def _describe(tok: Token) -> str:
    if tok.kind == "END":
        return "end of predicate"
    if tok.kind == "STRING":
        return f"string {tok.value!r}"
    return repr(str(tok.value))


@dataclass(frozen=True)
class Predicate:
    """A parsed predicate and its source text."""

    source: str
    root: Node

    def evaluate(self, env: Mapping[str, Any]) -> bool:
        """Whether the predicate holds in ``env`` (keys ``input``, ``context``, ...)."""
        return bool(self.root.evaluate(env))


def parse_predicate(text: str, lists: Mapping[str, Sequence[Any]] | None = None) -> Predicate:
    """Parse ``text``; ``lists`` are the named lists a bare name after ``in`` may use.

    Raises:
        PredicateError: the text is not a valid predicate (and nothing else, ever).
    """
    if not isinstance(text, str):
        raise PredicateError("predicate must be a string")
    try:
        root = _Parser(tokenize(text), lists or {}).parse()
    except PredicateError:
        raise
    except (ValueError, IndexError, RecursionError, OverflowError) as exc:
        # Defensive: a parser bug must still surface as a parse error, not a crash.
        raise PredicateError(f"cannot parse predicate ({type(exc).__name__})") from None
    return Predicate(text, root)


__all__ = [
    "MAX_DEPTH",
    "MAX_PREDICATE_CHARS",
    "Predicate",
    "PredicateError",
    "Token",
    "parse_predicate",
    "tokenize",
]
