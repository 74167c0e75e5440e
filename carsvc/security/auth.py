"""Bearer-token authentication of the sidecar's services: a grpc.aio server
interceptor.

Every RPC of a carsvc service must carry `authorization: Bearer <token>`
metadata with a token of the service's scope: WorkerService takes worker
tokens, every other carsvc service takes client tokens. Health and reflection
stay open (operators and load balancers probe them without credentials).

A missing token, a wrong one, and a valid token of the other scope are all
UNAUTHENTICATED with the same wording for the last two: the credential
presented is not a credential for this service, and answering
PERMISSION_DENIED instead would tell a caller that a guessed or stolen string
is a valid token of some scope.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from carsvc._proto.car.v1 import (
    budget_pb2,
    events_pb2,
    registry_pb2,
    runs_pb2,
    state_pb2,
    worker_pb2,
)
from carsvc.domain.errors import shown
from carsvc.security.tokens import TokenSet

__all__ = ["OPEN_SERVICES", "SERVICE_SCOPES", "Scope", "TokenAuthInterceptor", "bearer_token"]

log = logging.getLogger("carsvc.security")


class Scope(enum.Enum):
    WORKER = "worker"
    CLIENT = "client"


def _service(module: Any, name: str) -> str:
    full_name: str = module.DESCRIPTOR.services_by_name[name].full_name
    return full_name


SERVICE_SCOPES: Mapping[str, Scope] = {
    _service(worker_pb2, "WorkerService"): Scope.WORKER,
    _service(runs_pb2, "RunService"): Scope.CLIENT,
    _service(registry_pb2, "RegistryService"): Scope.CLIENT,
    _service(state_pb2, "StateService"): Scope.CLIENT,
    _service(budget_pb2, "BudgetService"): Scope.CLIENT,
    _service(events_pb2, "EventService"): Scope.CLIENT,
}

# Reachable without a token. Both reflection versions are listed so a newer
# grpcio-reflection that also registers v1 stays open too.
OPEN_SERVICES = frozenset(
    {health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection"}
)

AUTHORIZATION = "authorization"


def bearer_token(metadata: Any) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry (the
    scheme is case-insensitive, RFC 6750), or None."""
    for key, value in metadata or ():
        if key != AUTHORIZATION:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None
    return None


Continuation = Callable[[Any], Awaitable[Any]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits an RPC when its bearer token belongs to its service's scope.

    A service of the server that SERVICE_SCOPES does not name needs a client
    token (closed by default; tests/test_security.py checks that every carsvc
    service is named). An unknown method is left to gRPC (UNIMPLEMENTED)."""

    def __init__(self, tokens: Mapping[Scope, TokenSet]) -> None:
        self._tokens = dict(tokens)
        self._reading = 0  # refusals reading a first message now

    async def intercept_service(self, continuation: Continuation, details: Any) -> Any:
        method: str = details.method or ""
        service = method.split("/")[1] if method.count("/") == 2 else ""
        if service in OPEN_SERVICES:
            return await continuation(details)
        scope = SERVICE_SCOPES.get(service, Scope.CLIENT)
        token = bearer_token(details.invocation_metadata)
        if token is None:
            reason = f"{method} needs 'authorization: Bearer <token>' metadata with a {scope.value} token"
        elif self._tokens[scope].contains(token):
            return await continuation(details)
        else:
            reason = f"the bearer token is not a {scope.value} token of this sidecar ({method} needs one)"
        handler = await continuation(details)
        if handler is None:
            return None
        return self._refusal(method, reason)

    def _refusal(self, method: str, reason: str) -> Any:
        """A handler that ends the call UNAUTHENTICATED and holds as little of
        the caller's request as it can.

        grpcio receives a unary request whole before the handler runs (a
        stranger's 15 MiB StartRun would be held in memory just to be refused),
        but a request-streaming handler reads only when it asks. So every
        refusal is a request-streaming handler, whatever the method's shape:
        a unary caller's message is never read. A streaming method's first
        message is read (as raw bytes, up to FIRST_MESSAGE_WAIT_S) by at most
        REFUSAL_READS refusals at once, because a refusal that crosses a
        streaming caller's first write reaches grpc.aio clients as INTERNAL
        ("Internal error from Core") instead of UNAUTHENTICATED; past that many
        (a flood), streams are refused without the read."""
        streaming = _client_streaming(method)

        async def refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            log.warning("refused %s from %s: %s", method, shown(context.peer()), reason)
            if streaming and self._reading < REFUSAL_READS:
                self._reading += 1
                try:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(FIRST_MESSAGE_WAIT_S):
                            await context.read()
                finally:
                    self._reading -= 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

        return _REFUSAL_SHAPES[streaming](refuse)


# How long a refused request stream may take to send its first message, and
# how many refused streams may have theirs read at once (see _refusal).
FIRST_MESSAGE_WAIT_S = 1.0
REFUSAL_READS = 4

# Refusals are request-streaming handlers; the response side follows the
# method so the caller sees the status it expects.
_REFUSAL_SHAPES = {
    False: grpc.stream_unary_rpc_method_handler,
    True: grpc.stream_stream_rpc_method_handler,
}


def _client_streaming(method: str) -> bool:
    """Whether `method` (/package.Service/Method) takes a stream of requests,
    from the descriptors of the protos this process loaded (False when unknown:
    no read, the safe choice)."""
    found = _STREAMING.get(method)
    if found is None:
        service, _, name = method.strip("/").partition("/")
        try:
            descriptor = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
            found = bool(descriptor is not None and descriptor.client_streaming)
        except KeyError:
            found = False
        if len(_STREAMING) < 1024:  # only services this process knows are worth keeping
            _STREAMING[method] = found
    return found


_STREAMING: dict[str, bool] = {}
