"""``to_value`` writes plain JSON-like values into the Value directly (issue 27: the JSON
round trip was most of converting a tool's output, on every step); whatever it gives must
be what ``json_format.Parse(json.dumps(value))`` gives, byte for byte, and whatever the
round trip refuses it must refuse with the same error."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.shared.messages import to_value

_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=0x7F),
        st.characters(min_codepoint=0x80, max_codepoint=0xFFFF),
        st.characters(min_codepoint=0x10000, max_codepoint=0x1FFFF),
        st.sampled_from('\x00\x1f"\\\u2028\ud800\udfff'),  # lone surrogates: refused
    ),
    max_size=6,
)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**60), max_value=2**60),
    st.sampled_from([2**53, -(2**53), 2**53 + 1, 10**400, 0, -0.0, 1e308]),
    st.floats(),  # NaN and the infinities included
)
_KEYS = st.one_of(_TEXT, st.integers(-3, 3), st.booleans(), st.none(), st.floats(0, 2))
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(_TEXT, inner, max_size=4),
        st.dictionaries(_KEYS, inner, max_size=3),
    ),
    max_leaves=20,
)


def _round_trip(value: Any) -> struct_pb2.Value | tuple[type[BaseException], str]:
    v = struct_pb2.Value()
    try:
        json_format.Parse(json.dumps(value), v)
    except Exception as exc:
        return type(exc), str(exc)
    return v


def _direct(value: Any) -> struct_pb2.Value | tuple[type[BaseException], str]:
    try:
        return to_value(value)
    except Exception as exc:
        return type(exc), str(exc)


def _same(value: Any) -> None:
    got, want = _direct(value), _round_trip(value)
    if isinstance(want, tuple):
        assert got == want
        return
    assert isinstance(got, struct_pb2.Value)
    assert got.SerializeToString() == want.SerializeToString()
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)
    assert got.WhichOneof("kind") == want.WhichOneof("kind")


@settings(max_examples=800, deadline=None)
@given(_JSON)
def test_the_value_is_the_json_round_trips(value: Any) -> None:
    _same(value)


class _Str(str):
    pass


class _Int(int):
    pass


def _nested(depth: int) -> Any:
    value: Any = {}
    for i in range(depth):
        value = {"k": [value]} if i % 2 else [value]
    return value


@pytest.mark.parametrize(
    "value",
    [
        {},
        [],
        (),
        {"a": {}},
        {"a": []},
        [None, True, False, 0, -0.0, 1.5, "x"],
        2**53,
        2**53 + 1,
        10**400,  # too large for a double: the round trip's OverflowError
        float("nan"),
        float("inf"),
        {"a": float("-inf")},
        "\ud800",  # a lone surrogate: the round trip's UnicodeEncodeError
        {3: "three", None: "none", True: "yes", 2.5: "x"},  # keys json.dumps turns to text
        {"a": 1, 1: 2, "1": 3},  # a key that collides once turned to text
        OrderedDict([("b", 1), ("a", 2)]),
        _Str("sub"),
        _Int(7),
        {"set": {1, 2}},  # not JSON at all
        object(),
        _nested(30),  # past the direct conversion's depth
        _nested(120),  # past Parse's recursion limit
    ],
)
def test_edges(value: Any) -> None:
    _same(value)


def test_a_circular_value_is_refused_as_before() -> None:
    loop: list[Any] = []
    loop.append(loop)
    _same(loop)
