"""Requests that are not the method's message: INVALID_ARGUMENT, not UNKNOWN.

grpcio decodes a unary request before any servicer runs, and a DecodeError
there ends the call UNKNOWN "Unexpected DecodeError". This interceptor gives
unary-request handlers a decoder that cannot raise, and answers what it could
not decode with INVALID_ARGUMENT naming `request` (streaming requests are
decoded, and refused the same way, inside the servicers)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _message_name(decode: Callable[[bytes], Any]) -> str:
    owner = getattr(decode, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request message"))


class UndecodableRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        problem = f"is not a valid {_message_name(decode)}"

        def safe_decode(data: bytes) -> Any:
            try:
                return decode(data)
            except DecodeError as err:
                return _Undecodable(str(err))

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {problem} ({request.reason})")

        if handler.response_streaming:
            stream = handler.unary_stream

            async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for response in stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                each, request_deserializer=safe_decode, response_serializer=handler.response_serializer
            )
        unary = handler.unary_unary

        async def once(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            once, request_deserializer=safe_decode, response_serializer=handler.response_serializer
        )
