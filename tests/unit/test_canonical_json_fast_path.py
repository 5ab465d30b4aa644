"""canonical_json writes the common case with the standard library's C encoder (issue
27: RFC 8785 in pure Python was most of an audit record's preparation); its text must be
the ``rfc8785`` package's, byte for byte, for every JSON value, and it must refuse what
the package refuses."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from cuga.shared import transparency
from cuga.shared.messages import struct_to_dict
from cuga.shared.transparency import canonical_json, canonical_struct_json

# Keys and strings across the planes: ASCII, Latin, U+E000-U+FFFF (sorted differently in
# UTF-16 than by code point against supplementary characters), emoji, control characters.
_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=0x7F),
        st.characters(min_codepoint=0x80, max_codepoint=0x7FF),
        st.characters(min_codepoint=0xE000, max_codepoint=0xFFFF, exclude_categories=["Cs"]),
        st.characters(min_codepoint=0x10000, max_codepoint=0x1FFFF),
        st.sampled_from('\x00\x01\x08\t\n\x0b\x0c\r\x1f"\\\x7f\u2028'),
    ),
    max_size=8,
)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-7, 1e-6, 9.99e-5, 1e-4, 0.1, 1e16, 1e20, 1e21, 1.5e300]),
)
_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=20,
)


def _reference(value: Any) -> str:
    return rfc8785.dumps(value).decode("utf-8")


@settings(max_examples=600, deadline=None)
@given(_JSON)
def test_the_text_is_rfc8785s(value: Any) -> None:
    assert canonical_json(value) == _reference(value)


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.0, "b": [2.0, -0.0, 0.5]},  # whole doubles as integers
        {"small": 1e-5},  # ECMAScript: 0.00001, json: 1e-05
        {"big": 1e21, "bigger": 1.5e300},  # exponents in ECMAScript's spelling
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 order puts the emoji first
        {"ctl": '\x00\x1f\t"\\'},
        {"int": 2**53 - 1, "neg": -(2**53) + 1},
    ],
)
def test_the_edges_of_the_fast_path_match(value: Any) -> None:
    assert canonical_json(value) == _reference(value)


def test_the_common_case_takes_the_fast_path() -> None:
    payload = {"step_id": "s1", "output": {"n": 3.0, "text": "héllo"}, "attempt": 1}
    assert transparency._plain_json(payload) is not transparency._NOT_PLAIN
    assert transparency._plain_json({"x": 1e-5}) is transparency._NOT_PLAIN


@pytest.mark.parametrize(
    "value", [{"x": float("nan")}, {"x": float("inf")}, [float("-inf")], {"x": 2**60}]
)
def test_what_the_package_refuses_is_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        _reference(value)
    with pytest.raises(ValueError):
        canonical_json(value)


def test_a_lone_surrogate_is_refused_as_the_package_refuses_it() -> None:
    with pytest.raises(Exception) as expected:
        _reference({"x": "\ud800"})
    with pytest.raises(type(expected.value)):
        canonical_json({"x": "\ud800"})


# A Struct holds only doubles, strings, bools, nulls, lists and objects: the JSON values
# an audit payload can be, NaN and the infinities included (which the text refuses).
_STRUCT_NUMBERS = st.one_of(
    _NUMBERS, st.sampled_from([float("nan"), float("inf"), -float("inf"), 2.0**60, -(2.0**53)])
)
_STRUCT_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), _STRUCT_NUMBERS, _TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_TEXT, inner, max_size=4)),
    max_leaves=20,
)


def _long_way(payload: struct_pb2.Struct) -> str | type[Exception]:
    try:
        return canonical_json(struct_to_dict(payload))
    except ValueError as exc:
        return type(exc)


def _one_walk(payload: struct_pb2.Struct) -> str | type[Exception]:
    try:
        return canonical_struct_json(payload)
    except ValueError as exc:
        return type(exc)


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(_TEXT, _STRUCT_JSON, max_size=6))
def test_a_structs_text_in_one_walk_is_the_long_ways(value: dict[str, Any]) -> None:
    """canonical_struct_json (the audit leaf's payload) is canonical_json(struct_to_dict(s)):
    the same text, or the same refusal."""
    payload = struct_pb2.Struct()
    payload.update(value)
    assert _one_walk(payload) == _long_way(payload)


def test_a_value_with_nothing_set_is_null_in_one_walk_too() -> None:
    payload = struct_pb2.Struct()
    payload.fields["unset"].SetInParent()  # a Value with no kind
    payload.fields["list"].list_value.values.add()
    assert canonical_struct_json(payload) == canonical_json(struct_to_dict(payload))
    assert canonical_struct_json(payload) == '{"list":[null],"unset":null}'
