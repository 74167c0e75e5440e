"""How a change travels on the change channel (backends/redis/changes.py):
length-prefixed fields, so any byte in a key or scope is carried as it is."""

from __future__ import annotations

import struct

from carsvc.domain.backend import Change

_LEN = struct.Struct(">I")
_DELETED = 0xFFFFFFFF


def encode(replica_id: str, kind: str, name: str, key: str, writer: str, data: bytes | None) -> bytes:
    """One change: who made it, what it touches, and its new value (None: deleted)."""
    parts = [p.encode() for p in (replica_id, kind, name, key, writer)]
    out = b"".join(_LEN.pack(len(p)) + p for p in parts)
    return out + (_LEN.pack(_DELETED) if data is None else _LEN.pack(len(data)) + data)


def decode(payload: bytes) -> tuple[str, Change]:
    fields: list[bytes | None] = []
    at = 0
    for _ in range(6):
        (size,) = _LEN.unpack_from(payload, at)
        at += _LEN.size
        if size == _DELETED:
            fields.append(None)
            continue
        fields.append(payload[at : at + size])
        at += size
    replica_id, kind, name, key, writer = (f.decode() if f is not None else "" for f in fields[:5])
    return replica_id, Change(kind, name, key, writer, fields[5])
