"""Errors as the HTTP API answers them: the HTTP status the gRPC code maps to
(google.rpc.Code's table, as grpc-gateway uses it) and a JSON body with the
gRPC status name, the message gRPC would send, and the field at fault:

    404 {"code": "NOT_FOUND", "message": "run_id: no run 'r' (...)", "field": "run_id"}
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from google.protobuf import json_format

from carsvc.domain.errors import CarError, Code, InvalidArgument, shown
from carsvc.http.jsonio import dumps

log = logging.getLogger("carsvc.http")

# gRPC status code -> HTTP status (google/rpc/code.proto).
HTTP_STATUS = {
    Code.CANCELLED: 499,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
}
UNAUTHENTICATED = 401


def error_body(code: str, message: str, field: str = "") -> dict[str, str]:
    return {"code": code, "message": message, "field": field}


def error_response(code: str, message: str, field: str = "", *, status: int) -> web.Response:
    return web.json_response(error_body(code, message, field), status=status, dumps=dumps)


def car_error_response(err: CarError) -> web.Response:
    """`err` as gRPC would send it: its code's name, and str(err) as the message."""
    return error_response(err.code.name, str(err), err.field, status=HTTP_STATUS.get(err.code, 500))


# What aiohttp itself refuses, as gRPC names it.
_HTTP_CODES = {
    404: ("NOT_FOUND", "no such endpoint (docs/console.md lists them)"),
    405: ("UNIMPLEMENTED", "this endpoint does not take that method"),
    413: ("RESOURCE_EXHAUSTED", "the request body is larger than max_message_bytes"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal of an API request is a JSON error; nothing else escapes."""
    try:
        return await handler(request)
    except CarError as err:
        return car_error_response(err)
    except json_format.ParseError as err:
        return car_error_response(InvalidArgument(shown(str(err), 1000), field="body"))
    except web.HTTPException as err:
        if not request.path.startswith("/api/") or err.status < 400:
            raise
        code, message = _HTTP_CODES.get(err.status, ("INVALID_ARGUMENT", err.reason))
        field = "body" if err.status == 413 else ""
        return error_response(code, message, field, status=err.status)
    except ConnectionResetError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response("INTERNAL", "the sidecar failed to answer; its log says why", status=500)
