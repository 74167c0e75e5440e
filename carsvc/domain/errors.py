"""Errors the domain raises; the services layer maps each code to a gRPC status."""

from __future__ import annotations

import enum

# How much of a caller's value an error message echoes back.
SHOWN_CHARS = 200


def shown(value: str, limit: int = SHOWN_CHARS) -> str:
    """`value` for an error message: cut to `limit` characters (and says how long
    it was), so echoing a huge id never makes the answer bigger than the request."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


class Code(enum.IntEnum):
    """The gRPC status code a domain error maps to (values follow google.rpc.Code)."""

    CANCELLED = 1
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNAVAILABLE = 14
    UNIMPLEMENTED = 12
    INTERNAL = 13


class CarError(Exception):
    """A request the sidecar refuses, with the status it maps to and the field at fault."""

    code: Code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, *, field: str = "", code: Code | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message
        if code is not None:
            self.code = code


class InvalidArgument(CarError):
    code = Code.INVALID_ARGUMENT


class NotFound(CarError):
    code = Code.NOT_FOUND


class AlreadyExists(CarError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(CarError):
    code = Code.PERMISSION_DENIED


class FailedPrecondition(CarError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(CarError):
    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(CarError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(CarError):
    code = Code.UNAVAILABLE
