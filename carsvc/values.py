"""Python values <-> google.protobuf.Value (JSON-shaped data on the wire)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2

Value = struct_pb2.Value

JSON = None | bool | int | float | str | list["JSON"] | dict[str, "JSON"]


def to_value(obj: Any) -> struct_pb2.Value:
    """Converts JSON-shaped Python data (None, bool, numbers, str, lists, dicts
    with str keys) to a Value. Numbers travel as doubles, as in JSON."""
    v = struct_pb2.Value()
    _fill(v, obj)
    return v


def _fill(v: struct_pb2.Value, obj: Any) -> None:
    if obj is None:
        v.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        v.bool_value = obj
    elif isinstance(obj, int | float):
        if isinstance(obj, float) and not math.isfinite(obj):
            raise ValueError(f"{obj} cannot be sent as JSON")
        v.number_value = obj
    elif isinstance(obj, str):
        v.string_value = obj
    elif isinstance(obj, Mapping):
        fields = v.struct_value.fields
        for key, item in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be str, not {type(key).__name__}")
            _fill(fields[key], item)
        if not obj:
            v.struct_value.SetInParent()
    elif isinstance(obj, Sequence) and not isinstance(obj, bytes | bytearray):
        values = v.list_value.values
        for item in obj:
            _fill(values.add(), item)
        if not obj:
            v.list_value.SetInParent()
    else:
        raise TypeError(f"{type(obj).__name__} is not JSON-shaped")


def from_value(v: struct_pb2.Value) -> Any:
    """Converts a Value back to Python; whole numbers come back as int."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        n = v.number_value
        return int(n) if n.is_integer() and abs(n) < 2**53 else n
    if kind == "bool_value":
        return v.bool_value
    if kind == "struct_value":
        return {k: from_value(item) for k, item in v.struct_value.fields.items()}
    if kind == "list_value":
        return [from_value(item) for item in v.list_value.values]
    return None
