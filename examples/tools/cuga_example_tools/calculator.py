"""``calculator``: arithmetic parsed by a small Pratt parser (no eval, no ast)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from cuga.tools import ToolContext, ToolSpec

MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 64
#: Largest integer result, in bits: keeps ``9**9**9`` from eating the worker.
MAX_INT_BITS = 4096

Number = int | float
_TOKEN = re.compile(r"(\d+\.\d*|\.\d+|\d+)|(\*\*|[-+*/()])")


@dataclass(frozen=True)
class _Token:
    kind: str  # "num", "op" or "end"
    text: str
    pos: int


def tokenize(text: str) -> list[_Token]:
    """Split an expression into numbers and operators.

    Raises:
        ValueError: a character that is not part of the grammar.
    """
    tokens: list[_Token] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"unexpected character {text[pos]!r} at position {pos}")
        number, op = match.groups()
        tokens.append(_Token("num", number, pos) if number else _Token("op", op, pos))
        pos = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


class _Parser:
    """Pratt parser: binding powers decide precedence; ``**`` is right-associative."""

    _INFIX = {"+": (10, 11), "-": (10, 11), "*": (20, 21), "/": (20, 21), "**": (41, 40)}
    _PREFIX_BP = 30  # unary minus binds looser than **: -2**2 == -4

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._i = 0

    def _peek(self) -> _Token:
        return self._tokens[self._i]

    def _next(self) -> _Token:
        tok = self._tokens[self._i]
        self._i += 1
        return tok

    def parse(self) -> Number:
        value = self._expr(0, 0)
        tok = self._peek()
        if tok.kind != "end":
            raise ValueError(f"unexpected {tok.text!r} at position {tok.pos}")
        return value

    def _expr(self, min_bp: int, depth: int) -> Number:
        if depth > MAX_DEPTH:
            raise ValueError("expression is nested too deeply")
        tok = self._next()
        left: Number
        if tok.kind == "num":
            left = float(tok.text) if "." in tok.text else int(tok.text)
        elif tok.text in ("-", "+"):
            operand = self._expr(self._PREFIX_BP, depth + 1)
            left = -operand if tok.text == "-" else operand
        elif tok.text == "(":
            left = self._expr(0, depth + 1)
            close = self._next()
            if close.text != ")":
                raise ValueError(f"expected ')' at position {close.pos}")
        elif tok.kind == "end":
            raise ValueError("unexpected end of expression")
        else:
            raise ValueError(f"unexpected {tok.text!r} at position {tok.pos}")
        while True:
            op = self._peek()
            if op.kind != "op" or op.text not in self._INFIX:
                break
            left_bp, right_bp = self._INFIX[op.text]
            if left_bp < min_bp:
                break
            self._next()
            right = self._expr(right_bp, depth + 1)
            left = _apply(op.text, left, right)
        return left


def _apply(op: str, a: Number, b: Number) -> Number:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        if (
            isinstance(a, int)
            and isinstance(b, int)
            and a.bit_length() + b.bit_length() > MAX_INT_BITS
        ):
            raise ValueError("result is too large")
        return a * b
    if op == "/":
        if b == 0:
            raise ValueError("division by zero")
        return a / b
    # "**"
    if a == 0 and b < 0:
        raise ValueError("division by zero")
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        if abs(a) > 1 and a.bit_length() * b > MAX_INT_BITS:
            raise ValueError("result is too large")
        return int(a**b)
    try:
        result = math.pow(a, b)
    except OverflowError:
        raise ValueError("result is too large") from None
    except ValueError:
        raise ValueError("result is not a real number") from None
    return result


def evaluate(expression: str) -> Number:
    """The value of an arithmetic expression: numbers, + - * / ** and parentheses.

    Raises:
        ValueError: a syntax error, division by zero, or a result too large.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    result = _Parser(tokenize(expression)).parse()
    if isinstance(result, float) and not math.isfinite(result):
        raise ValueError("result is not finite")
    return result


def _calculate(inputs: dict[str, Any], context: ToolContext) -> dict[str, Any]:
    expression = inputs["expression"]
    return {"expression": expression, "result": evaluate(expression)}


CALCULATOR = ToolSpec(
    name="calculator",
    description="Evaluates an arithmetic expression (+ - * / ** and parentheses) exactly.",
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_EXPRESSION_CHARS,
                "description": "e.g. '(2 + 3) * 4 ** 2'",
            }
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
    handler=_calculate,
    capabilities=("math",),
    cost=0.1,
    timeout=2.0,
    keywords=("calculate", "compute", "arithmetic", "math", "sum", "multiply", "divide"),
)
