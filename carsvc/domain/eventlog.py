"""A run's event log: append-only, per-run sequence numbers, bounded retention,
and watchers that replay then follow with no gap and no duplicate.

Each event is serialized once, when it is appended, as a *frame*: the bytes of
one element of `repeated RunEvent events = 1` (tag, length, event). A batch of
frames laid end to end is a serialized WatchRunResponse (and ReadEventsResponse),
so every watcher is sent the same bytes and nothing is serialized per watcher.

A watcher (`Subscription`) is a cursor into the log, not a queue: it holds no
events of its own. What it may fall behind is bounded by events
(`max_events`) and bytes (`max_bytes`), counted from the last batch it has
finished receiving; a watcher past either bound is told once (its
`on_overflow` callback) and dropped, with the seq it can resume from. Watchers
past their bound are found through two heaps keyed by where their bound lies,
so an append costs the same with a thousand stalled watchers as with none.

With a journal, appended events are *published* (shown to watchers, in replay
and live) only once the journal has committed them (`barrier`), so no watcher
ever holds a seq that a crash and restart could give to another event. One
barrier per log is pending at a time; what is appended meanwhile waits for the
next one."""

from __future__ import annotations

import asyncio
import heapq
import logging
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Callable

from carsvc._proto.car.v1 import events_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import CarError, Code, FailedPrecondition

RunEvent = events_pb2.RunEvent

log = logging.getLogger("carsvc.events")

# Field 1, length-delimited: WatchRunResponse.events and ReadEventsResponse.events.
_EVENTS_TAG = b"\x0a"
# How many bytes of events a watcher may fall behind (watcher_max_bytes).
DEFAULT_WATCHER_MAX_BYTES = 64 * 1024 * 1024
# Compact the frame list once this many dropped frames sit at its head.
_COMPACT_AT = 1024


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def frame(payload: bytes, tag: bytes = _EVENTS_TAG) -> bytes:
    """One length-delimited field: `tag`, the length of `payload`, `payload`."""
    return tag + varint(len(payload)) + payload


def payload_of(data: bytes) -> bytes:
    """The message inside one frame (strips tag and length)."""
    pos = 1
    while data[pos] & 0x80:
        pos += 1
    return data[pos + 1 :]


class WatcherTooSlow(CarError):
    """A watcher fell too far behind; it may resume from the seq it was told."""

    code = Code.RESOURCE_EXHAUSTED


class Subscription:
    """One watcher's cursor into a log.

    Use: `take()` the next batch (bytes: a serialized WatchRunResponse), send
    it, `ack()` once it has been written, and `await wait()` when `take()` has
    nothing. `done` is true once every event has been taken (the log closed, or
    a one-off read reached its end). When the watcher falls behind,
    `overflowed` becomes true, `on_overflow(resume_after_seq, why)` is called once
    (possibly while a write is under way), and `take()` returns None from then
    on."""

    __slots__ = (
        "_base_off",
        "_base_seq",
        "_keep",
        "_listed",
        "_log",
        "_taken_end",
        "max_bytes",
        "max_events",
        "next_seq",
        "on_overflow",
        "overflowed",
        "sent_seq",
        "stop_seq",
        "wakeup",
        "why",
    )

    def __init__(self, log: RunEventLog, after_seq: int, max_events: int, max_bytes: int, stop_seq: int) -> None:
        self._log = log
        self.next_seq = after_seq + 1  # the smallest seq not taken yet
        self.sent_seq = after_seq  # the last seq taken (sent or being sent): where to resume
        self.stop_seq = stop_seq  # a one-off read ends here; followers: no end
        self.max_events = max_events
        self.max_bytes = max_bytes
        # The bounds count from here: where the last acknowledged batch ended, or
        # the log's head when the watcher joined (its replay does not count).
        self._base_seq = max(after_seq, log.published_seq)
        self._base_off = log.published_end
        self._taken_end = self._base_off
        self._keep: Callable[[bytes], bool] | None = None
        self._listed = False  # in the log's list of watchers waiting for news
        self.on_overflow: Callable[[int, str], None] | None = None
        self.overflowed = False
        self.why = ""  # why it overflowed
        # Set by the log when something changed; a consumer with other sources
        # (a session's replies) may set it too.
        self.wakeup = asyncio.Event()

    def keep_only(self, keep: Callable[[bytes], bool]) -> None:
        """Skip frames for which `keep(frame)` is false (they still advance the cursor)."""
        self._keep = keep

    @property
    def done(self) -> bool:
        log = self._log
        if self.next_seq > self.stop_seq:
            return True
        return log.closed and self.next_seq > log.published_seq and log.published_end == log._total

    def take(self, budget: int) -> bytes | None:
        """The next frames, up to `budget` bytes (at least one frame), or None
        when nothing is ready. b"" when every ready frame was filtered out."""
        if self.overflowed:
            return None
        log = self._log
        end_seq = min(log.published_seq, self.stop_seq)
        if self.next_seq > end_seq:
            return None
        if self.next_seq < log.first_retained_seq:
            # The log dropped events this watcher has not had (a long replay).
            log._overflow(self, "events it had not received were dropped (event_retention)")
            return None
        got = log._read(self.next_seq, end_seq, budget, self._keep)
        chunk, last_seq, end_off = got
        self.next_seq = last_seq + 1
        self.sent_seq = last_seq
        self._taken_end = end_off
        return chunk

    def ack(self) -> None:
        """The last batch taken has been written: the bounds move up to it."""
        if self.sent_seq > self._base_seq:
            self._base_seq = self.sent_seq
            self._base_off = self._taken_end

    async def wait(self) -> None:
        """Until the log has something new (or closes, or drops this watcher)."""
        self.wakeup.clear()
        if self.overflowed or self.done or self._ready():
            return
        if not self._listed:
            self._listed = True
            self._log._waiting.append(self)
        await self.wakeup.wait()

    def _ready(self) -> bool:
        return self.next_seq <= min(self._log.published_seq, self.stop_seq)

    def close(self) -> None:
        """The watcher has gone: the log forgets it."""
        self._log._drop(self)

    # -- the old, decoded interface -------------------------------------------------------

    async def batches(self) -> AsyncIterator[list[RunEvent]]:
        """Yields decoded batches in seq order until the log closes; raises
        WatcherTooSlow if the watcher fell behind."""
        try:
            while True:
                chunk = self.take(1 << 20)
                if chunk is not None:
                    self.ack()
                    if chunk:
                        yield list(events_pb2.ReadEventsResponse.FromString(chunk).events)
                    continue
                if self.overflowed:
                    raise WatcherTooSlow(
                        f"watcher fell behind run '{self._log.run_id}': {self.why}; "
                        f"resume with after_seq={self.sent_seq}"
                    )
                if self.done:
                    return
                await self.wait()
        finally:
            self.close()


class RunEventLog:
    """Events of one run. seq starts at 1; only the newest `retention` are kept."""

    __slots__ = (
        "_barrier",
        "_by_bytes",
        "_by_seq",
        "_closed",
        "_committing",
        "_ends",
        "_frames",
        "_frozen",
        "_head",
        "_retention",
        "_seqs",
        "_subscribers",
        "_tiebreak",
        "_total",
        "_waiting",
        "last_seq",
        "published_end",
        "published_seq",
        "run_id",
        "sink",
    )

    def __init__(
        self,
        run_id: str,
        retention: int,
        sink: Callable[[int, bytes], None] | None = None,
        barrier: Callable[[], asyncio.Future[None]] | None = None,
    ) -> None:
        self.run_id = run_id
        self._retention = retention
        # Retained frames (open log) from index _head on, with their seqs and the
        # log-wide byte offset where each ends. A closed log keeps its frames as
        # one bytes object (a retained finished run costs a third as much).
        self._frames: list[bytes] = []
        self._seqs = array("q")
        self._ends = array("q")
        self._head = 0
        self._frozen: bytes | None = None
        self._total = 0  # bytes of every frame ever appended
        self.last_seq = 0
        # What watchers may see: everything, or (with a journal) what it has committed.
        self.published_seq = 0
        self.published_end = 0
        self._barrier = barrier
        self._committing = False
        self._closed = False
        self._subscribers: list[Subscription] = []
        self._waiting: list[Subscription] = []
        # (bound, tiebreak, subscription): the smallest bound first.
        self._by_seq: list[tuple[int, int, Subscription]] = []
        self._by_bytes: list[tuple[int, int, Subscription]] = []
        self._tiebreak = 0
        # Told about every appended event (the journal, when there is one).
        self.sink = sink

    # -- writing ------------------------------------------------------------------------

    def restore(self, events: list[RunEvent]) -> None:
        """Puts back events read from the journal, as they were (already durable)."""
        for event in events:
            self._keep(event.seq, frame(event.SerializeToString()))
        if events:
            self.last_seq = max(self.last_seq, events[-1].seq)
            self._publish(self._seqs[-1], self._total)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def first_retained_seq(self) -> int:
        return self._seqs[self._head] if self._head < len(self._seqs) else self.last_seq + 1

    def append(self, event: RunEvent) -> RunEvent:
        """Stamps run id, seq and time on `event`, keeps it, and publishes it
        (with a journal: once the journal has it)."""
        if self._closed:
            raise FailedPrecondition(f"run '{self.run_id}' has finished; its event log is closed")
        self.last_seq += 1
        event.run_id = self.run_id
        event.seq = self.last_seq
        event.time_unix_ms = now_ms()
        data = event.SerializeToString()
        self._keep(event.seq, frame(data))
        if self.sink is not None:
            self.sink(event.seq, data)
        if self._barrier is None:
            self._publish(event.seq, self._total)
        elif not self._committing:
            self._await_commit()
        return event

    def _keep(self, seq: int, data: bytes) -> None:
        if self._frozen is not None:
            raise FailedPrecondition(f"run '{self.run_id}' has finished; its event log is closed")
        self._total += len(data)
        self._frames.append(data)
        self._seqs.append(seq)
        self._ends.append(self._total)
        if len(self._seqs) - self._head > self._retention:
            self._frames[self._head] = b""
            self._head += 1
            if self._head >= _COMPACT_AT and self._head * 2 >= len(self._seqs):
                del self._frames[: self._head]
                del self._seqs[: self._head]
                del self._ends[: self._head]
                self._head = 0

    def _await_commit(self) -> None:
        """Publishes what is appended so far once the journal has committed it."""
        assert self._barrier is not None
        upto_seq, upto_end = self.last_seq, self._total
        future = self._barrier()
        if future.done():
            self._committed(upto_seq, upto_end, future)
            return
        self._committing = True
        future.add_done_callback(lambda f: self._committed(upto_seq, upto_end, f))

    def _committed(self, upto_seq: int, upto_end: int, future: asyncio.Future[None]) -> None:
        self._committing = False
        if not future.cancelled() and (err := future.exception()) is not None:
            # The events are not durable; watchers still get them (the run goes on).
            log.error("run %s: the journal failed to commit events up to seq %d: %s", self.run_id, upto_seq, err)
        self._publish(upto_seq, upto_end)
        if self._total > self.published_end:
            self._await_commit()

    def _publish(self, seq: int, end: int) -> None:
        if seq <= self.published_seq:
            return
        self.published_seq = seq
        self.published_end = end
        if self._waiting:
            waiting, self._waiting = self._waiting, []
            for sub in waiting:
                sub._listed = False
                sub.wakeup.set()
        by_seq = self._by_seq
        while by_seq and by_seq[0][0] < seq:
            _, _, sub = heapq.heappop(by_seq)
            if sub.overflowed:
                continue
            if sub._base_seq + sub.max_events < seq:
                self._overflow(sub, f"more than {sub.max_events} events behind (watcher_buffer)")
            else:
                self._watch_bound(by_seq, sub._base_seq + sub.max_events, sub)
        by_bytes = self._by_bytes
        recheck = []
        while by_bytes and by_bytes[0][0] < end:
            _, _, sub = heapq.heappop(by_bytes)
            if sub.overflowed:
                continue
            if sub._base_off + sub.max_bytes >= end:
                self._watch_bound(by_bytes, sub._base_off + sub.max_bytes, sub)
            elif seq - sub._base_seq <= 1:
                recheck.append(sub)  # one event, however large, is always sent
            else:
                self._overflow(sub, f"more than {sub.max_bytes} bytes of events behind (watcher_max_bytes)")
        for sub in recheck:
            self._watch_bound(by_bytes, end, sub)

    def _watch_bound(self, heap: list[tuple[int, int, Subscription]], bound: int, sub: Subscription) -> None:
        self._tiebreak += 1
        heapq.heappush(heap, (bound, self._tiebreak, sub))

    def close(self) -> None:
        """No more events; watchers end once they have taken what is published."""
        self._closed = True
        start = self._head
        self._frozen = b"".join(self._frames[start:])
        self._frames = []
        if start:
            del self._seqs[:start]
            del self._ends[:start]
            self._head = 0
        self._by_seq.clear()
        self._by_bytes.clear()
        waiting, self._waiting = self._waiting, []
        for sub in waiting:
            sub._listed = False
            sub.wakeup.set()

    # -- reading ------------------------------------------------------------------------

    def _read(
        self, first_seq: int, last_seq: int, budget: int, keep: Callable[[bytes], bool] | None
    ) -> tuple[bytes, int, int]:
        """Frames with first_seq <= seq <= last_seq, up to `budget` bytes (at
        least one): (the frames, the last seq read, the offset it ends at)."""
        seqs, ends = self._seqs, self._ends
        i = bisect_left(seqs, first_seq, self._head)
        hi = bisect_right(seqs, last_seq, i)
        start = ends[i - 1] if i > 0 else (ends[i] - self._size(i))
        j = max(i + 1, bisect_right(ends, start + budget, i, hi))
        frames = self._frames_between(i, j, start)
        if keep is not None:
            frames = [f for f in frames if keep(f)]
        return b"".join(frames), seqs[j - 1], ends[j - 1]

    def _size(self, i: int) -> int:
        if self._frozen is None:
            return len(self._frames[i])
        before = self._ends[i - 1] if i > 0 else self._ends[-1] - len(self._frozen)
        return self._ends[i] - before

    def _frames_between(self, i: int, j: int, start: int) -> list[bytes]:
        if self._frozen is None:
            return self._frames[i:j]
        base = self._ends[-1] - len(self._frozen)  # the offset of the frozen bytes' start
        ends = self._ends
        out = []
        at = start - base
        for k in range(i, j):
            end = ends[k] - base
            out.append(self._frozen[at:end])
            at = end
        return out

    def frames_after(self, after_seq: int) -> list[bytes]:
        """Published, retained frames with seq > after_seq."""
        self.check_resume(after_seq)
        start = max(after_seq, self.first_retained_seq - 1) + 1
        if start > self.published_seq:
            return []
        chunk, _, _ = self._read(start, self.published_seq, 1 << 62, None)
        return [bytes(f) for f in _split(chunk)]

    def since(self, after_seq: int) -> list[RunEvent]:
        """Published, retained events with seq > after_seq (see check_resume)."""
        return [RunEvent.FromString(payload_of(f)) for f in self.frames_after(after_seq)]

    def check_resume(self, after_seq: int) -> None:
        """after_seq 0 means from the oldest retained event; a later after_seq
        whose successors were dropped is FAILED_PRECONDITION (the caller would
        miss events without knowing), and one past the run's last event is
        OUT_OF_RANGE (those seqs were never given to this run's events)."""
        if after_seq < 0:
            raise CarError("must not be negative", field="after_seq", code=Code.INVALID_ARGUMENT)
        if after_seq > self.last_seq:
            raise CarError(
                f"{after_seq} is past the last event of run '{self.run_id}' (seq {self.last_seq}); "
                "no event of this run has that seq",
                field="after_seq",
                code=Code.OUT_OF_RANGE,
            )
        first = self.first_retained_seq
        if after_seq and after_seq + 1 < first:
            raise CarError(
                f"events {after_seq + 1}..{first - 1} of run '{self.run_id}' are no longer "
                f"retained; the oldest retained seq is {first}",
                field="after_seq",
                code=Code.FAILED_PRECONDITION,
            )

    def subscribe(
        self,
        after_seq: int,
        max_buffer: int,
        max_watchers: int = 0,
        *,
        max_bytes: int = 1 << 62,
        follow: bool = True,
    ) -> Subscription:
        """A watcher from `after_seq` on: it replays what is retained, then
        (with `follow`) the live events; without `follow` it ends at the
        current end of the log. No event can fall in a gap or arrive twice."""
        if follow and max_watchers and len(self._subscribers) >= max_watchers:
            raise CarError(
                f"run '{self.run_id}' already has {len(self._subscribers)} watchers (max_watchers_per_run)",
                field="run_id",
                code=Code.RESOURCE_EXHAUSTED,
            )
        self.check_resume(after_seq)
        after_seq = max(after_seq, self.first_retained_seq - 1)
        stop = (1 << 62) if follow else self.published_seq
        sub = Subscription(self, after_seq, max_buffer, max_bytes, stop)
        if follow and not self._closed:
            self._subscribers.append(sub)
            self._watch_bound(self._by_seq, sub._base_seq + max_buffer, sub)
            self._watch_bound(self._by_bytes, sub._base_off + max_bytes, sub)
        return sub

    def _overflow(self, sub: Subscription, why: str) -> None:
        self._drop(sub)
        sub.why = why
        sub.wakeup.set()
        if sub.on_overflow is not None:
            sub.on_overflow(sub.sent_seq, why)

    def _drop(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)
        # Its heap entries go when popped (they are skipped once it has overflowed);
        # a watcher that went away is marked so too.
        sub.overflowed = True


def _split(data: bytes) -> list[memoryview]:
    """The frames laid end to end in `data`."""
    out = []
    view = memoryview(data)
    pos = 0
    size = len(data)
    while pos < size:
        at = pos + 1
        length = shift = 0
        while True:
            b = data[at]
            at += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        out.append(view[pos : at + length])
        pos = at + length
    return out
