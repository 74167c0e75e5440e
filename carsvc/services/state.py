"""StateService: read, write and watch a state scope from outside a run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import state_pb2, state_pb2_grpc
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.overlay import StateTransition
from carsvc.domain.runs import RunManager
from carsvc.services.errors import streaming, unary

DEFAULT_WRITER = "client"


def transition_to_proto(t: StateTransition) -> state_pb2.StateTransition:
    msg = state_pb2.StateTransition(index=t.index, key=t.key, writer=t.writer, time_unix_ms=t.time_unix_ms)
    if isinstance(t.old, struct_pb2.Value):
        msg.old_value.CopyFrom(t.old)
    if isinstance(t.new, struct_pb2.Value):
        msg.new_value.CopyFrom(t.new)
    return msg


class StateService(state_pb2_grpc.StateServiceServicer):
    def __init__(self, runs: RunManager, max_field_bytes: int, watcher_buffer: int) -> None:
        self.runs = runs
        self.max_field_bytes = max_field_bytes
        self.watcher_buffer = watcher_buffer

    @staticmethod
    def _scope_key(scope: str, key: str | None) -> None:
        if not scope:
            raise InvalidArgument("must name a state scope (usually a thread id)", field="scope")
        if key is not None and not key:
            raise InvalidArgument("must not be empty", field="key")

    @unary
    async def Get(
        self, request: state_pb2.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.GetResponse:
        self._scope_key(request.scope, request.key)
        store = self.runs.scopes.get(request.scope)
        value = store.get(request.key) if store is not None else None
        if not isinstance(value, struct_pb2.Value) or store is None:
            return state_pb2.GetResponse(found=False)
        return state_pb2.GetResponse(found=True, value=value, writer=store.writer_of(request.key) or "")

    @unary
    async def Set(
        self, request: state_pb2.SetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.SetResponse:
        self._scope_key(request.scope, request.key)
        if not request.HasField("value"):
            raise InvalidArgument("is required", field="value")
        size = request.value.ByteSize()
        if size > self.max_field_bytes:
            raise InvalidArgument(f"is {size} bytes; the limit is {self.max_field_bytes}", field="value")
        value = struct_pb2.Value()
        value.CopyFrom(request.value)
        t = self.runs.scope(request.scope).set(request.key, value, request.writer or DEFAULT_WRITER)
        return state_pb2.SetResponse(index=t.index)

    @unary
    async def Delete(
        self, request: state_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.DeleteResponse:
        self._scope_key(request.scope, request.key)
        store = self.runs.scopes.get(request.scope)
        t = store.delete(request.key, request.writer or DEFAULT_WRITER) if store is not None else None
        if t is None:
            return state_pb2.DeleteResponse(existed=False)
        return state_pb2.DeleteResponse(existed=True, index=t.index)

    @unary
    async def ListKeys(
        self, request: state_pb2.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.ListKeysResponse:
        self._scope_key(request.scope, None)
        store = self.runs.scopes.get(request.scope)
        return state_pb2.ListKeysResponse(keys=store.keys(request.prefix) if store is not None else [])

    @streaming
    async def Watch(
        self, request: state_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[state_pb2.WatchResponse]:
        self._scope_key(request.scope, None)
        store = self.runs.scope(request.scope)
        prefix = request.key_prefix
        queue: asyncio.Queue[StateTransition] = asyncio.Queue()

        def listener(t: StateTransition) -> None:
            if t.key.startswith(prefix):
                queue.put_nowait(t)

        first = store.first_retained_index
        if request.after_index + 1 < first and request.after_index < store.transition_count:
            raise InvalidArgument(
                f"transitions before index {first} are no longer retained", field="after_index"
            )
        replay = [t for t in store.transitions_since(request.after_index) if t.key.startswith(prefix)]
        store.subscribe(listener)
        try:
            if replay:
                yield state_pb2.WatchResponse(transitions=[transition_to_proto(t) for t in replay])
            while True:
                batch = [await queue.get()]
                while not queue.empty() and len(batch) < self.watcher_buffer:
                    batch.append(queue.get_nowait())
                yield state_pb2.WatchResponse(transitions=[transition_to_proto(t) for t in batch])
        finally:
            store.unsubscribe(listener)
