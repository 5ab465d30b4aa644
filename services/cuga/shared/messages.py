"""Small conversions between protobuf well-known types and Python values."""

from __future__ import annotations

import json
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
    """A JSON-like dict from a Struct."""
    return json_format.MessageToDict(s)


def to_value(data: Any) -> struct_pb2.Value:
    """A Value from any JSON-like Python value."""
    v = struct_pb2.Value()
    json_format.Parse(json.dumps(data), v)
    return v


def value_to_python(v: struct_pb2.Value) -> Any:
    """A JSON-like Python value from a Value."""
    return json_format.MessageToDict(v)


__all__ = ["seconds", "struct_to_dict", "timestamp", "to_struct", "to_value", "value_to_python"]
