"""StateService: read, write and watch a state scope from outside a run."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import state_pb2, state_pb2_grpc
from carsvc.domain.bounds import MAX_KEY_BYTES, check_key, check_room, check_scope, check_value_size
from carsvc.domain.convert import transition_to_proto
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.eventlog import frame
from carsvc.domain.overlay import StateStore, StateTransition
from carsvc.domain.runs import RunManager
from carsvc.services.errors import shown, streaming, unary
from carsvc.services.watchers import MESSAGE_BYTES, RESUME_INDEX_KEY, Ending, TransitionFeed

DEFAULT_WRITER = "client"
MAX_WRITER_CHARS = 256
DEFAULT_KEYS_PAGE = 1_000
MAX_KEYS_PAGE = 10_000
KEYS_PAGE_BYTES = 1024 * 1024


def _check_writer(writer: str) -> None:
    if len(writer) > MAX_WRITER_CHARS:
        raise InvalidArgument(f"is {len(writer)} characters; the limit is {MAX_WRITER_CHARS}", field="writer")


class StateService(state_pb2_grpc.StateServiceServicer):
    def __init__(
        self,
        runs: RunManager,
        max_field_bytes: int,
        watcher_buffer: int,
        *,
        max_value_depth: int,
        max_state_keys: int,
        watcher_max_bytes: int,
    ) -> None:
        self.runs = runs
        self.max_field_bytes = max_field_bytes
        # How far a watcher may fall behind, in transitions and in bytes.
        self.watcher_buffer = watcher_buffer
        self.watcher_max_bytes = watcher_max_bytes
        # The last transition serialized: every watcher of its scope is sent these bytes.
        self._encoded: tuple[StateTransition | None, bytes] = (None, b"")
        self.max_value_depth = max_value_depth
        self.max_state_keys = max_state_keys

    @staticmethod
    def _scope_key(scope: str, key: str | None) -> None:
        check_scope(scope, "scope")
        if key is not None:
            check_key(key, "key")

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
        check_value_size(request.value, "value", self.max_field_bytes, self.max_value_depth)
        _check_writer(request.writer)
        store = self.runs.scope(request.scope)
        check_room(len(store), request.key in store, self.max_state_keys, "key")
        value = struct_pb2.Value()
        value.CopyFrom(request.value)
        t = store.set(request.key, value, request.writer or DEFAULT_WRITER)
        await self.runs.acknowledged()  # strict journal: the write is on disk
        return state_pb2.SetResponse(index=t.index)

    @unary
    async def Delete(
        self, request: state_pb2.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.DeleteResponse:
        self._scope_key(request.scope, request.key)
        _check_writer(request.writer)
        store = self.runs.scopes.get(request.scope)
        t = store.delete(request.key, request.writer or DEFAULT_WRITER) if store is not None else None
        if t is None:
            return state_pb2.DeleteResponse(existed=False)
        await self.runs.acknowledged()  # strict journal: the delete is on disk
        return state_pb2.DeleteResponse(existed=True, index=t.index)

    @unary
    async def ListKeys(
        self, request: state_pb2.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> state_pb2.ListKeysResponse:
        self._scope_key(request.scope, None)
        if request.page_size > MAX_KEYS_PAGE:
            raise InvalidArgument(f"must be at most {MAX_KEYS_PAGE}", field="page_size")
        if len(request.page_token) > MAX_KEY_BYTES:
            raise InvalidArgument("is not a token from a previous ListKeys", field="page_token")
        store = self.runs.scopes.get(request.scope)
        keys = store.keys(request.prefix) if store is not None else []
        start = bisect.bisect_right(keys, request.page_token) if request.page_token else 0
        size = request.page_size or DEFAULT_KEYS_PAGE
        response = state_pb2.ListKeysResponse()
        used = 0
        for key in itertools.islice(keys, start, None):
            cost = len(key) + 4
            if len(response.keys) == size or (response.keys and used + cost > KEYS_PAGE_BYTES):
                # The token is the last key sent: later pages start after it even
                # if keys are written or deleted in between.
                response.next_page_token = response.keys[-1]
                break
            response.keys.append(key)
            used += cost
        return response

    @streaming
    async def Watch(  # type: ignore[override]
        self, request: state_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Serialized WatchResponses (registered with a pass-through serializer)."""
        self._scope_key(request.scope, None)
        store = self.runs.hold_scope(request.scope)  # a watched scope is kept, even empty
        try:
            async for response in self._watch(store, request, context):
                yield response
        finally:
            self.runs.release_scope(request.scope)

    def _frame(self, t: StateTransition) -> bytes:
        """`t` as one element of WatchResponse.transitions, serialized once for all watchers."""
        last, data = self._encoded
        if last is not t:
            data = frame(transition_to_proto(t).SerializeToString())
            self._encoded = (t, data)
        return data

    async def _watch(
        self, store: StateStore, request: state_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        prefix = request.key_prefix
        first = store.first_retained_index
        if request.after_index + 1 < first and request.after_index < store.transition_count:
            raise InvalidArgument(
                f"transitions before index {first} are no longer retained", field="after_index"
            )
        replay = [t for t in store.transitions_since(request.after_index) if t.key.startswith(prefix)]
        feed = TransitionFeed(replay, self._frame, request.after_index, self.watcher_buffer, self.watcher_max_bytes)

        def listener(t: StateTransition) -> None:
            if t.key.startswith(prefix):
                feed.push(t)

        ending = Ending(context)

        def behind(resume_after: int, why: str) -> None:
            store.unsubscribe(listener)
            ending.behind(
                f"watcher fell behind state scope '{shown(request.scope, 64)}': {why}; "
                f"resume with after_index={resume_after}",
                RESUME_INDEX_KEY,
                resume_after,
            )

        feed.on_overflow = behind
        store.subscribe(listener)
        try:
            await context.send_initial_metadata(())
            while True:
                chunk = feed.take(MESSAGE_BYTES)
                if chunk is None:
                    if feed.overflowed:
                        return  # ended RESOURCE_EXHAUSTED (behind)
                    await feed.wait()
                    continue
                yield chunk  # returns once gRPC has written it
                feed.ack()
        finally:
            ending.settle()
            store.unsubscribe(listener)
