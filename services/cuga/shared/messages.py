"""Small conversions between protobuf well-known types and Python values."""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp for epoch seconds."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def seconds(ts: timestamp_pb2.Timestamp) -> float:
    """Epoch seconds of a Timestamp (0 when unset)."""
    return ts.ToNanoseconds() / 1e9


def to_struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """A Struct from a JSON-like dict."""
    s = struct_pb2.Struct()
    s.update(data)
    return s


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    """A JSON-like dict from a Struct: exactly what ``json_format.MessageToDict`` returns
    (numbers stay floats, as a Struct holds only doubles; a Value with nothing set is None).

    Walked directly rather than through the generic descriptor-driven converter: it runs
    on every step input, template and audit payload, at about half the cost.

    Raises:
        ValueError: a number is NaN or Infinity (as ``MessageToDict`` raises).
    """
    fields = s.fields
    # Keys then lookups: the map's items() view is a slow pure-Python generator.
    return {key: value_to_python(fields[key]) for key in fields}


def to_value(data: Any) -> struct_pb2.Value:
    """A Value from any JSON-like Python value: what ``json_format.Parse(json.dumps(data))``
    gives, and the same error when it refuses.

    The common case (plain dicts with string keys, lists, tuples, strings, bools, None,
    finite floats and integers within 2^53, a few levels deep) is written into the Value
    directly: a tool's output is converted on every step, and the JSON round trip was
    most of that (~10 us for an empty dict). Anything else — a subclass, a non-string
    key, a non-finite or huge number, a string protobuf refuses, deep nesting — takes the
    round trip, so its result or its error is the round trip's.
    """
    v = struct_pb2.Value()
    try:
        _fill_value(v, data, _FAST_VALUE_DEPTH)
    except Exception:
        v = struct_pb2.Value()
        json_format.Parse(json.dumps(data), v)
    return v


#: Nesting the direct conversion of :func:`to_value` handles (Parse counts each level
#: against its own limit of 100; deeper values take the round trip and meet that limit).
_FAST_VALUE_DEPTH = 24
#: Integers a double holds exactly: the round trip gives these the same number.
_EXACT_INT = 2**53


class _NotPlain(Exception):
    """A value :func:`to_value` leaves to the JSON round trip."""


def _fill_value(v: struct_pb2.Value, data: Any, depth: int) -> None:
    kind = type(data)
    if kind is str:
        v.string_value = data
    elif kind is dict:
        if not depth:
            raise _NotPlain
        struct = v.struct_value
        struct.SetInParent()  # an empty dict is an empty Struct, not an unset Value
        fields = struct.fields
        for key, item in data.items():
            if type(key) is not str:
                raise _NotPlain  # json.dumps would turn it into a string
            _fill_value(fields[key], item, depth - 1)
    elif kind is float:
        if not math.isfinite(data):
            raise _NotPlain
        v.number_value = data
    elif kind is bool:
        v.bool_value = data
    elif kind is int:
        if not -_EXACT_INT <= data <= _EXACT_INT:
            raise _NotPlain
        v.number_value = data
    elif data is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif kind is list or kind is tuple:
        if not depth:
            raise _NotPlain
        values = v.list_value
        values.SetInParent()
        for item in data:
            _fill_value(values.values.add(), item, depth - 1)
    else:
        raise _NotPlain


def value_to_python(v: struct_pb2.Value) -> Any:
    """A JSON-like Python value from a Value (as :func:`struct_to_dict`).

    Raises:
        ValueError: a number is NaN or Infinity.
    """
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        number = v.number_value
        if not math.isfinite(number):
            raise ValueError(f"a number is {number}, which JSON cannot carry")
        return number
    if kind == "struct_value":
        return struct_to_dict(v.struct_value)
    if kind == "list_value":
        return [value_to_python(item) for item in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None  # null_value, or no kind set (MessageToDict writes null too)


__all__ = ["seconds", "struct_to_dict", "timestamp", "to_struct", "to_value", "value_to_python"]
