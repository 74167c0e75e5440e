"""Bounds on JSON-shaped values (google.protobuf.Value / Struct) taken from anyone.

Protobuf parsers refuse messages nested more than 100 levels deep (upb, C++,
prost; grpc-js through protobufjs). A Value costs up to three of those levels
per JSON level (Value -> Struct -> map entry -> Value), and the sidecar re-sends
what it stores inside envelopes up to about a dozen levels deep (a WatchRun
batch -> event -> result -> output -> outcome -> evidence). So a value accepted
at any depth could be stored and then never be decoded again by a client, a
worker SDK or the journal. Every Value and Struct the sidecar accepts is
checked here against one limit, `max_value_depth`, kept well below that.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.errors import InvalidArgument, ResourceExhausted

Value = struct_pb2.Value
Struct = struct_pb2.Struct

DEFAULT_MAX_VALUE_DEPTH = 24
# Protobuf's parse limit is 100 message levels; an envelope adds at most
# ENVELOPE_LEVELS, each JSON level at most 3: 3 * 28 + 1 + 12 < 100.
MAX_VALUE_DEPTH_LIMIT = 28
ENVELOPE_LEVELS = 12
# Each JSON level costs at least this many bytes on the wire (a tag and a length
# for the container and for its element): smaller values cannot be too deep.
_MIN_BYTES_PER_LEVEL = 4


def value_depth(value: Value) -> int:
    """JSON nesting depth: 0 for a scalar, 1 for a flat list or object, ..."""
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_depth(value.struct_value)
    if kind == "list_value":
        return 1 + max((value_depth(v) for v in value.list_value.values), default=0)
    return 0


def struct_depth(struct: Struct) -> int:
    return 1 + max((value_depth(v) for v in struct.fields.values()), default=0)


def _too_deep(depth: int, limit: int, field: str) -> InvalidArgument:
    return InvalidArgument(
        f"is nested {depth} levels deep; the limit is {limit} (max_value_depth)", field=field
    )


def check_value(value: Value, field: str, limit: int) -> None:
    """INVALID_ARGUMENT naming `field` when `value` is nested deeper than `limit`."""
    if value.ByteSize() <= _MIN_BYTES_PER_LEVEL * limit:
        return
    depth = value_depth(value)
    if depth > limit:
        raise _too_deep(depth, limit, field)


def check_struct(struct: Struct, field: str, limit: int) -> None:
    """The same for a Struct (which is itself one level)."""
    if struct.ByteSize() <= _MIN_BYTES_PER_LEVEL * (limit - 1):
        return
    depth = struct_depth(struct)
    if depth > limit:
        raise _too_deep(depth, limit, field)


def check_output_values(output: types_pb2.AgentOutput, field: str, limit: int) -> None:
    """Every Value/Struct inside an AgentOutput (its outcome's evidence and metrics)."""
    if not output.HasField("outcome"):
        return
    outcome = output.outcome
    for i, evidence in enumerate(outcome.evidence):
        if evidence.HasField("data"):
            check_value(evidence.data, f"{field}.outcome.evidence[{i}].data", limit)
    if outcome.HasField("metrics"):
        check_struct(outcome.metrics, f"{field}.outcome.metrics", limit)


# What one response to a client may hold: gRPC's default receive limit is 4 MiB in
# every language; this leaves room for the envelope (ListRuns pages, Submit batches).
CLIENT_MESSAGE_BYTES = 3 * 1024 * 1024 + 512 * 1024

# Ids (runs, threads, scopes, decisions, ...) and state keys travel in every
# record and page that names them.
MAX_ID_CHARS = 256
MAX_SCOPE_CHARS = MAX_ID_CHARS
MAX_KEY_BYTES = 1024


def check_id(value: str, field: str) -> None:
    """An id: at most MAX_ID_CHARS characters."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"is {len(value)} characters; the limit is {MAX_ID_CHARS}", field=field)


def check_value_size(value: Value, field: str, max_bytes: int, max_depth: int) -> None:
    """A value someone hands over to keep: within max_field_bytes and max_value_depth."""
    if (size := value.ByteSize()) > max_bytes:
        raise InvalidArgument(f"is {size} bytes; the limit is {max_bytes} (max_field_bytes)", field=field)
    check_value(value, field, max_depth)


def check_key(key: str, field: str) -> None:
    """A state key: not empty, at most MAX_KEY_BYTES of UTF-8."""
    if not key:
        raise InvalidArgument("must not be empty", field=field)
    if len(key) > MAX_KEY_BYTES // 4 and (size := len(key.encode())) > MAX_KEY_BYTES:
        raise InvalidArgument(f"is {size} bytes; the limit is {MAX_KEY_BYTES}", field=field)


def check_scope(scope: str, field: str) -> None:
    """A state scope name: not empty, at most MAX_SCOPE_CHARS characters."""
    if not scope:
        raise InvalidArgument("must name a state scope (usually a thread id)", field=field)
    check_id(scope, field)


def check_room(keys: int, has_key: bool, limit: int, field: str) -> None:
    """RESOURCE_EXHAUSTED when a write would add a key to a scope that holds `limit`."""
    if not has_key and keys >= limit:
        raise ResourceExhausted(
            f"the scope already holds {keys} keys (max_state_keys); delete some or use another scope", field=field
        )
