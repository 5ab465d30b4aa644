"""Hypothesis strategies that build arbitrary protobuf messages from their descriptors."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, message_factory, struct_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

FD = descriptor.FieldDescriptor
_INT32 = st.integers(-(2**31), 2**31 - 1)
_UINT32 = st.integers(0, 2**32 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_UINT64 = st.integers(0, 2**64 - 1)
_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "default", "../../etc/passwd", "a' OR '1'='1", "%", "\x00", "🙂" * 5]),
    st.text(min_size=300, max_size=5000),
)
_JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)


def _scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _INT32
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _UINT32
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _INT64
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _UINT64
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if t == FD.TYPE_FLOAT else 64
        )
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return _TEXT
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:  # known values and unknown numbers alike
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), _INT32)
    raise TypeError(f"no strategy for field type {t}")


def messages(desc: descriptor.Descriptor, depth: int = 3) -> st.SearchStrategy[Message]:
    """Arbitrary messages of type ``desc``: random subsets of fields, odd values included."""
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.Struct":
        return st.dictionaries(_TEXT, _JSON, max_size=4).map(_struct)
    if desc.full_name == "google.protobuf.Value":
        return _JSON.map(_value)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for field in desc.fields:
            if not draw(st.booleans()):
                continue
            _fill(draw, msg, field, depth)
        return msg

    return build()


def _fill(draw: st.DrawFn, msg: Message, field: descriptor.FieldDescriptor, depth: int) -> None:
    is_message = field.type == FD.TYPE_MESSAGE
    if is_message and depth <= 0:
        return
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, value_f = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        target = getattr(msg, field.name)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(_scalar(key_f))
            if value_f.type == FD.TYPE_MESSAGE:
                target[key].CopyFrom(draw(messages(value_f.message_type, depth - 1)))
            else:
                target[key] = draw(_scalar(value_f))
        return
    if field.is_repeated:
        target = getattr(msg, field.name)
        for _ in range(draw(st.integers(0, 4))):
            if is_message:
                target.add().CopyFrom(draw(messages(field.message_type, depth - 1)))
            else:
                target.append(draw(_scalar(field)))
        return
    if is_message:
        getattr(msg, field.name).CopyFrom(draw(messages(field.message_type, depth - 1)))
    else:
        setattr(msg, field.name, draw(_scalar(field)))


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


def _value(data: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if data is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        v.bool_value = data
    elif isinstance(data, float):
        v.number_value = data
    elif isinstance(data, str):
        v.string_value = data
    elif isinstance(data, list):
        v.list_value.extend(data)
    else:
        v.struct_value.update(data)
    return v


__all__ = ["messages"]
