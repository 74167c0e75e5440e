"""A run's event log: append-only, per-run sequence numbers, bounded retention,
and watchers that replay then follow with no gap and no duplicate."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from carsvc._proto.car.v1 import events_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import CarError, Code, FailedPrecondition

RunEvent = events_pb2.RunEvent


class WatcherTooSlow(CarError):
    """A watcher's buffer overflowed; it may resume from the last seq it saw."""

    code = Code.RESOURCE_EXHAUSTED


class Subscription:
    """One watcher's view: a bounded buffer filled by the log, drained in batches."""

    __slots__ = ("_buffer", "_closed", "_log", "_max_buffer", "_overflowed", "_wakeup", "last_seq")

    def __init__(self, log: RunEventLog, max_buffer: int, last_seq: int) -> None:
        self._log = log
        self._buffer: deque[RunEvent] = deque()
        self._max_buffer = max_buffer
        self._wakeup = asyncio.Event()
        self._closed = False
        self._overflowed = False
        self.last_seq = last_seq

    def _push(self, event: RunEvent) -> None:
        if self._overflowed:
            return
        if len(self._buffer) >= self._max_buffer:
            self._overflowed = True
            self._buffer.clear()
            self._log._drop(self)
        else:
            self._buffer.append(event)
        self._wakeup.set()

    def _close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def batches(self) -> AsyncIterator[list[RunEvent]]:
        """Yields batches of events in seq order until the log closes.

        Raises WatcherTooSlow when the buffer overflowed (nothing is skipped
        silently: the caller learns the last seq it received)."""
        try:
            while True:
                if self._buffer:
                    batch = list(self._buffer)
                    self._buffer.clear()
                    self.last_seq = batch[-1].seq
                    yield batch
                    continue
                if self._overflowed:
                    raise WatcherTooSlow(
                        f"watcher fell more than {self._max_buffer} events behind run "
                        f"'{self._log.run_id}'; resume with after_seq={self.last_seq}"
                    )
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
        finally:
            self._log._drop(self)


class RunEventLog:
    """Events of one run. seq starts at 1; only the newest `retention` are kept."""

    __slots__ = ("_closed", "_events", "_first_seq", "_frozen", "_subscribers", "last_seq", "run_id", "sink")

    def __init__(self, run_id: str, retention: int, sink: Callable[[RunEvent], None] | None = None) -> None:
        self.run_id = run_id
        self._events: deque[RunEvent] = deque(maxlen=retention)
        # A closed log keeps its events serialized: one bytes object instead of a
        # protobuf arena per event (a retained finished run costs a third as much).
        self._frozen: bytes | None = None
        self._first_seq = 0
        self._subscribers: list[Subscription] = []
        self._closed = False
        self.last_seq = 0
        # Told about every appended event (the journal, when there is one).
        self.sink = sink

    def restore(self, events: list[RunEvent]) -> None:
        """Puts back events read from the journal, as they were."""
        self._events.extend(events)
        if events:
            self.last_seq = events[-1].seq

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def first_retained_seq(self) -> int:
        if self._frozen is not None:
            return self._first_seq
        return self._events[0].seq if self._events else self.last_seq + 1

    def _retained(self) -> list[RunEvent]:
        if self._frozen is None:
            return list(self._events)
        return list(events_pb2.ReadEventsResponse.FromString(self._frozen).events)

    def append(self, event: RunEvent) -> RunEvent:
        """Stamps run id, seq and time on `event`, keeps it, and hands it to watchers."""
        if self._closed:
            raise FailedPrecondition(f"run '{self.run_id}' has finished; its event log is closed")
        self.last_seq += 1
        event.run_id = self.run_id
        event.seq = self.last_seq
        event.time_unix_ms = now_ms()
        self._events.append(event)
        if self.sink is not None:
            self.sink(event)
        if self._subscribers:
            for sub in tuple(self._subscribers):  # a push may drop an overflowing watcher
                sub._push(event)
        return event

    def close(self) -> None:
        """No more events; watchers end once they have drained."""
        self._closed = True
        for sub in list(self._subscribers):
            sub._close()
        self._first_seq = self.first_retained_seq
        self._frozen = events_pb2.ReadEventsResponse(events=self._events).SerializeToString()
        self._events.clear()

    def since(self, after_seq: int) -> list[RunEvent]:
        """Retained events with seq > after_seq. after_seq 0 means from the oldest
        retained one; a later after_seq whose successors were dropped is
        FAILED_PRECONDITION (the caller would miss events without knowing)."""
        first = self.first_retained_seq
        if after_seq and after_seq + 1 < first:
            raise CarError(
                f"events {after_seq + 1}..{first - 1} of run '{self.run_id}' are no longer "
                f"retained; the oldest retained seq is {first}",
                field="after_seq",
                code=Code.FAILED_PRECONDITION,
            )
        if after_seq >= self.last_seq:
            return []
        skip = max(0, after_seq + 1 - first)
        return self._retained()[skip:]

    def subscribe(self, after_seq: int, max_buffer: int, max_watchers: int = 0) -> Subscription:
        """Replays what is retained after `after_seq`, then follows live events.

        Replay and registration happen without an await in between, so no
        event can fall in a gap or arrive twice."""
        if max_watchers and len(self._subscribers) >= max_watchers:
            raise CarError(
                f"run '{self.run_id}' already has {len(self._subscribers)} watchers (max_watchers_per_run)",
                field="run_id",
                code=Code.RESOURCE_EXHAUSTED,
            )
        replay = self.since(after_seq)
        sub = Subscription(self, max(max_buffer, len(replay) + 1), after_seq)
        sub._buffer.extend(replay)
        if replay:
            sub._wakeup.set()
        if self._closed:
            sub._close()
        else:
            self._subscribers.append(sub)
        return sub

    def _drop(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    @property
    def watcher_count(self) -> int:
        return len(self._subscribers)
