"""JSON out: protobuf messages with protobuf's JSON mapping (the proto's own
field names, enums by name, 64-bit integers as strings), compact."""

from __future__ import annotations

import json

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = ["dumps", "to_json"]


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def to_json(message: Message) -> str:
    return dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))
