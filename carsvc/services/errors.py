"""Domain errors -> gRPC statuses, in one place."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from carsvc._proto.car.v1 import worker_pb2
from carsvc.domain.errors import SHOWN_CHARS, CarError, shown

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

STATUS: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}

__all__ = ["SHOWN_CHARS", "STATUS", "abort", "frame_error", "shown", "status_of", "streaming", "unary"]


def frame_error(err: CarError, field: str) -> worker_pb2.FrameError:
    """`err` as a FrameError; `field` names the part at fault when err names none."""
    return worker_pb2.FrameError(code=int(err.code), message=err.detail, field=err.field or field)


def status_of(err: CarError) -> grpc.StatusCode:
    return STATUS.get(int(err.code), grpc.StatusCode.UNKNOWN)


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: CarError) -> NoReturn:
    await context.abort(status_of(err), str(err))
    raise AssertionError("unreachable")  # context.abort always raises


def unary(
    fn: Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]:
    """Turns a CarError raised by a unary RPC into its gRPC status."""

    @functools.wraps(fn)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
        try:
            return await fn(self, request, context)
        except CarError as err:
            await abort(context, err)

    return wrapper


def streaming(
    fn: Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]]:
    """The same for server-streaming RPCs written as async generators."""

    @functools.wraps(fn)
    async def wrapper(
        self: _S, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Resp]:
        try:
            async for item in fn(self, request, context):
                yield item
        except CarError as err:
            await abort(context, err)

    return wrapper
