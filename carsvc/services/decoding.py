"""Every call's request arrives whole, in time, and decodes, or the call ends
with a status that says which.

* **A receive deadline.** grpcio receives a unary request before any handler
  runs, and waits for it for as long as the connection lives: a peer that sends
  part of a length-prefixed message and stalls holds the call, unanswered,
  until it closes the connection. Here every handler is served as a
  request-streaming one that reads its first message itself, within
  `receive_timeout` seconds of the call's start, or ends the call
  DEADLINE_EXCEEDED. A unary handler then gets that message as usual; a
  request-streaming handler (a worker's Connect, a Session) gets it as the
  first item of its request iterator and the rest as they come.
* **Undecodable requests.** grpcio decodes a unary request before any servicer
  runs, and a DecodeError there ends the call UNKNOWN "Unexpected DecodeError".
  Here the first message is decoded with a decoder that cannot raise, and what
  it could not decode is answered INVALID_ARGUMENT naming `request` (later
  messages of a stream are decoded, and refused the same way, inside the
  servicers).

A call that ends before its first message (the caller half-closed with
nothing) is INVALID_ARGUMENT too, instead of a call grpcio never answers.

`receive_timeout` 0 turns the deadline off (unary handlers are then left to
grpcio's own receive, with only the decoder guard).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError

__all__ = ["RequestGuard"]

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message_name(decode: Callable[[bytes], Any]) -> str:
    owner = getattr(decode, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


def _safe_decoder(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if decode is None:
        return None

    def safe_decode(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError as err:
            return _Undecodable(str(err))

    return safe_decode


_NOTHING = object()


class _Rest:
    """A request iterator that yields the first message the guard read (or
    raises what reading it raised: the servicers turn a DecodeError into their
    own answer), then the rest of the stream."""

    __slots__ = ("_error", "_first", "_rest")

    def __init__(self, first: Any, error: DecodeError | None, rest: AsyncIterator[Any]) -> None:
        self._first = first
        self._error = error
        self._rest = rest

    def __aiter__(self) -> _Rest:
        return self

    async def __anext__(self) -> Any:
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            if first is grpc.aio.EOF:
                raise StopAsyncIteration
            return first
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return await self._rest.__anext__()


async def _read_first(context: Context, timeout: float) -> Any:
    """The call's first message (or EOF), or the call ends DEADLINE_EXCEEDED."""
    try:
        async with asyncio.timeout(timeout):
            return await context.read()
    except TimeoutError:
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"request: the request message did not arrive whole within {timeout:g} s of the call's start",
        )
        raise  # abort() raises; this only tells the type checker


class RequestGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The receive deadline and the decoder guard (see the module's doc).
    Installed innermost: it wraps the servicers' own handlers."""

    def __init__(self, receive_timeout: float) -> None:
        self.receive_timeout = receive_timeout

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if not self.receive_timeout:
            return _decoding_only(handler)
        if handler.request_streaming:
            return self._streaming(handler)
        return self._unary(handler)

    def _streaming(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        timeout = self.receive_timeout
        decode, serialize = handler.request_deserializer, handler.response_serializer

        async def requests_of(requests: AsyncIterator[Any], context: Context) -> _Rest:
            try:
                return _Rest(await _read_first(context, timeout), None, requests)
            except DecodeError as err:
                return _Rest(_NOTHING, err, requests)

        if handler.response_streaming:
            streams = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                async for response in streams(await requests_of(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode, serialize)
        stream_once = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await stream_once(await requests_of(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, serialize)

    def _unary(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        timeout = self.receive_timeout
        decode = handler.request_deserializer
        problem = f"is not a valid {_message_name(decode)}" if decode is not None else ""

        async def first(context: Context) -> Any:
            request = await _read_first(context, timeout)
            if request is grpc.aio.EOF:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "request: the call ended before its request message"
                )
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {problem} ({request.reason})")
            return request

        safe, serialize = _safe_decoder(decode), handler.response_serializer
        if handler.response_streaming:
            each = handler.unary_stream

            async def unary_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
                async for response in each(await first(context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(unary_stream, safe, serialize)
        once = handler.unary_unary

        async def unary_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await once(await first(context), context)

        return grpc.stream_unary_rpc_method_handler(unary_unary, safe, serialize)


def _decoding_only(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """Without a receive deadline: unary handlers keep grpcio's own receive,
    with the decoder guard."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    decode = handler.request_deserializer
    problem = f"is not a valid {_message_name(decode)}"
    safe = _safe_decoder(decode)

    async def refuse(request: _Undecodable, context: Context) -> None:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {problem} ({request.reason})")

    if handler.response_streaming:
        stream = handler.unary_stream

        async def each(request: Any, context: Context) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            async for response in stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            each, request_deserializer=safe, response_serializer=handler.response_serializer
        )
    unary = handler.unary_unary

    async def once(request: Any, context: Context) -> Any:
        if isinstance(request, _Undecodable):
            await refuse(request, context)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        once, request_deserializer=safe, response_serializer=handler.response_serializer
    )
