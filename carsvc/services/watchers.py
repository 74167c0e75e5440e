"""What every watcher stream shares (WatchRun, Session, ReadEvents with follow,
StateService.Watch): pre-serialized batches, a size per message, and the way a
watcher that fell behind is ended.

* Events are serialized once, by the run's event log; a handler yields bytes
  (a whole serialized response), and the methods that do are registered with
  a response serializer that passes bytes through (`add_servicer`).
* A message holds events up to MESSAGE_BYTES (one larger event travels alone),
  far below gRPC's default 4 MiB receive limit.
* A watcher that falls behind is ended at once, even while its handler is
  blocked writing to a client that does not read: `end_behind` sends the
  status (RESOURCE_EXHAUSTED, with where to resume in the message and in the
  trailing metadata) from a task of its own. gRPC delivers it after the
  messages already handed to it, so the client sees every event up to the seq
  it is told, then the status. The handler's generator returns as soon as its
  pending write completes or fails; what stays allocated until then is that
  one message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from carsvc._proto.car.v1 import events_pb2, runs_pb2
from carsvc.domain.eventlog import Subscription, frame, payload_of

log = logging.getLogger("carsvc.watchers")

# Trailing metadata of a watcher ended for falling behind: resume after this seq
# (WatchRun, ReadEvents, Session) or transition index (StateService.Watch).
RESUME_SEQ_KEY = "carsvc-resume-after-seq"
RESUME_INDEX_KEY = "carsvc-resume-after-index"
# Target size of one message to a watcher.
MESSAGE_BYTES = 32 * 1024

_ENDING: set[asyncio.Task[None]] = set()


def passthrough(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """A response serializer that sends bytes as they are."""

    def serializer(message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        assert serialize is not None
        return serialize(message)

    return serializer


class _Capture:
    """Stands in for a server while a generated add_*_to_server registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service = service
        self.handlers = dict(handlers)


def add_servicer(
    add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server, raw_methods: tuple[str, ...]
) -> None:
    """`add(servicer, server)` (a generated add_*Servicer_to_server), except that
    the handlers of `raw_methods` may yield pre-serialized bytes."""
    capture = _Capture()
    add(servicer, capture)
    if not capture.service:
        raise RuntimeError(f"{add.__name__} did not register its handlers by name (grpcio-tools too old)")
    handlers = capture.handlers
    for name in raw_methods:
        handler = handlers[name]
        handlers[name] = handler._replace(response_serializer=passthrough(handler.response_serializer))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


class Ending:
    """Ends one watcher's call RESOURCE_EXHAUSTED now, whatever its handler is doing.

    `behind()` sets the status at once (so a handler that returns first ends
    the call with it) and sends it from a task of its own (so a handler blocked
    in a write does not hold it back), unless the handler has `settle()`d by
    then. The handler must have sent its initial metadata before (the status
    batch would otherwise send it a second time) and must call `settle()` when
    it ends."""

    __slots__ = ("_context", "_settled")

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._settled = False

    def behind(self, details: str, key: str, resume_after: int) -> None:
        context = self._context
        metadata = ((key, str(resume_after)),)
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(details)
        context.set_trailing_metadata(metadata)

        async def abort() -> None:
            if self._settled:
                return  # the handler returned first: gRPC sends the status set above
            # AbortError always; a call the peer has closed fails the batch too.
            with contextlib.suppress(Exception):
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, details, metadata)

        task = asyncio.get_running_loop().create_task(abort())
        _ENDING.add(task)
        task.add_done_callback(_ENDING.discard)

    def settle(self) -> None:
        self._settled = True


def events_behind(sub: Subscription, context: grpc.aio.ServicerContext[Any, Any], run_id: str) -> Ending:
    """Makes `sub` end its call when it falls behind run `run_id`."""
    ending = Ending(context)

    def behind(resume_after: int, why: str) -> None:
        ending.behind(
            f"watcher fell behind run '{run_id}': {why}; resume with after_seq={resume_after}",
            RESUME_SEQ_KEY,
            resume_after,
        )

    sub.on_overflow = behind
    return ending


async def event_batches(
    context: grpc.aio.ServicerContext[Any, Any], sub: Subscription, run_id: str
) -> AsyncIterator[bytes]:
    """A subscription's events as serialized WatchRunResponse/ReadEventsResponse
    messages, until the run ends (or a one-off read its end); the call ends
    RESOURCE_EXHAUSTED when the watcher falls behind."""
    ending = events_behind(sub, context, run_id)
    try:
        await context.send_initial_metadata(())
        while True:
            chunk = sub.take(MESSAGE_BYTES)
            if chunk is None:
                if sub.overflowed or sub.done:
                    return
                await sub.wait()
                continue
            if chunk:
                yield chunk  # returns once gRPC has written it
            sub.ack()
    finally:
        ending.settle()
        sub.close()


def kinds_filter(kinds: frozenset[str]) -> Callable[[bytes], bool]:
    """Keeps the frames of events of these kinds."""

    def keep(data: bytes) -> bool:
        return events_pb2.RunEvent.FromString(payload_of(data)).WhichOneof("kind") in kinds

    return keep


def wrapped(data: bytes, tag: bytes) -> bytes:
    """`data` (a serialized message) as the field `tag` of an enclosing message."""
    return frame(data, tag)


class TransitionFeed:
    """One StateService.Watch: the replay (serialized as it is sent), then live
    transitions, kept serialized (frames of WatchResponse.transitions) and
    bounded: a watcher that falls more than `max_events` transitions or
    `max_bytes` bytes behind (counting what is being written to it) is told
    once, through `on_overflow(resume_after_index, why)`, and gets nothing more.
    The replay does not count: it is the store's own retained transitions."""

    __slots__ = (
        "_encode",
        "_flight_bytes",
        "_flight_count",
        "_live",
        "_pending",
        "_replay",
        "max_bytes",
        "max_events",
        "on_overflow",
        "overflowed",
        "sent_index",
        "wakeup",
    )

    def __init__(
        self, replay: list[Any], encode: Callable[[Any], bytes], after_index: int, max_events: int, max_bytes: int
    ) -> None:
        self._replay = deque(replay)
        self._live: deque[tuple[int, bytes]] = deque()
        self._encode = encode
        self._pending = 0  # bytes of live transitions buffered or being written
        self._flight_bytes = 0
        self._flight_count = 0
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.sent_index = after_index  # the last index taken (sent or being sent)
        self.overflowed = False
        self.on_overflow: Callable[[int, str], None] | None = None
        self.wakeup = asyncio.Event()
        if replay:
            self.wakeup.set()

    def push(self, transition: Any) -> None:
        """A live transition (call from the store's listener)."""
        if self.overflowed:
            return
        data = self._encode(transition)
        behind = len(self._live) + self._flight_count
        if behind >= self.max_events:
            self._overflow(f"more than {self.max_events} transitions behind (watcher_buffer)")
        elif behind and self._pending + len(data) > self.max_bytes:
            self._overflow(f"more than {self.max_bytes} bytes of transitions behind (watcher_max_bytes)")
        else:
            self._live.append((transition.index, data))
            self._pending += len(data)
            self.wakeup.set()

    def _overflow(self, why: str) -> None:
        self.overflowed = True
        self._live.clear()
        self._replay.clear()
        self.wakeup.set()
        if self.on_overflow is not None:
            self.on_overflow(self.sent_index, why)

    def take(self, budget: int) -> bytes | None:
        """The next transitions, up to `budget` bytes (at least one), or None."""
        if self.overflowed:
            return None
        parts: list[bytes] = []
        size = 0
        replay = self._replay
        while replay:
            data = self._encode(replay[0])
            if parts and size + len(data) > budget:
                break
            self.sent_index = replay.popleft().index
            parts.append(data)
            size += len(data)
        live = self._live
        if not replay:
            while live and (not parts or size + len(live[0][1]) <= budget):
                index, data = live.popleft()
                parts.append(data)
                size += len(data)
                self.sent_index = index
                self._flight_bytes += len(data)
                self._flight_count += 1
        if not parts:
            return None
        return b"".join(parts)

    def ack(self) -> None:
        """The last batch taken has been written."""
        self._pending -= self._flight_bytes
        self._flight_bytes = self._flight_count = 0

    async def wait(self) -> None:
        self.wakeup.clear()
        if self.overflowed or self._replay or self._live:
            return
        await self.wakeup.wait()


def messages(
    events: list[events_pb2.RunEvent],
    response: type[runs_pb2.WatchRunResponse] | type[events_pb2.ReadEventsResponse],
) -> list[bytes]:
    """`events` (read from a shared store) as serialized responses of about
    MESSAGE_BYTES each (an event larger than that has a message of its own)."""
    out: list[bytes] = []
    current: list[events_pb2.RunEvent] = []
    size = 0
    for event in events:
        cost = event.ByteSize() + 6
        if current and size + cost > MESSAGE_BYTES:
            out.append(response(events=current).SerializeToString())
            current, size = [], 0
        current.append(event)
        size += cost
    if current:
        out.append(response(events=current).SerializeToString())
    return out
