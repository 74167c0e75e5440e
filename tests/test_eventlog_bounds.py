"""The run event log's watchers (no gRPC): events serialized once and shared,
byte and event bounds counted from the last batch a watcher received, and
publication after the journal's barrier."""

from __future__ import annotations

import asyncio

import pytest

from carsvc._proto.car.v1 import events_pb2, runs_pb2
from carsvc.domain.errors import CarError, Code
from carsvc.domain.eventlog import RunEventLog, Subscription


def _custom(size: int = 10) -> events_pb2.RunEvent:
    event = events_pb2.RunEvent()
    event.custom.kind = "x" * size
    return event


def _seqs(chunk: bytes | None) -> list[int]:
    assert chunk is not None
    return [e.seq for e in runs_pb2.WatchRunResponse.FromString(chunk).events]


def _drain(sub: Subscription, budget: int = 1 << 20) -> list[int]:
    seen: list[int] = []
    while (chunk := sub.take(budget)) is not None:
        seen += _seqs(chunk)
        sub.ack()
    return seen


def test_a_batch_is_a_serialized_watch_response_split_by_bytes() -> None:
    log = RunEventLog("r", 100)
    for _ in range(10):
        log.append(_custom(1000))
    sub = log.subscribe(0, 100)
    first = sub.take(3000)
    assert _seqs(first) == [1, 2]  # ~1 KiB each: two fit in 3000 bytes
    sub.ack()
    assert _drain(sub, 3000) == list(range(3, 11))
    big = RunEventLog("r", 100)
    big.append(_custom(50_000))
    assert _seqs(big.subscribe(0, 100).take(1000)) == [1]  # one event always goes, whatever its size


def test_every_watcher_is_sent_the_same_bytes() -> None:
    log = RunEventLog("r", 100)
    subs = [log.subscribe(0, 100) for _ in range(3)]
    log.append(_custom())
    chunks = [s.take(1 << 20) for s in subs]
    assert chunks[0] == chunks[1] == chunks[2]
    assert chunks[0] is not None and _seqs(chunks[0]) == [1]


def test_a_watcher_that_does_not_receive_is_dropped_past_its_byte_bound() -> None:
    log = RunEventLog("r", 10_000)
    told: list[tuple[int, str]] = []
    stalled = log.subscribe(0, 10_000, max_bytes=50_000)
    stalled.on_overflow = lambda seq, why: told.append((seq, why))
    keeping_up = log.subscribe(0, 10_000, max_bytes=50_000)
    log.append(_custom(1000))
    assert _seqs(stalled.take(1 << 20)) == [1]  # taken, never acknowledged (a write that blocks)
    for _ in range(200):
        log.append(_custom(1000))
        _drain(keeping_up)
        if told:
            break
    assert told and told[0][0] == 1 and "watcher_max_bytes" in told[0][1]
    assert 45 <= log.last_seq <= 55  # ended as soon as ~50 KB were pending, not later
    assert stalled.overflowed and stalled.take(1 << 20) is None
    assert not keeping_up.overflowed
    log.subscribe(log.last_seq, 10_000, max_watchers=2)  # the ended watcher no longer counts


def test_the_event_bound_and_a_late_joiners_replay() -> None:
    log = RunEventLog("r", 10_000)
    for _ in range(100):
        log.append(_custom())
    late = log.subscribe(0, 10)  # replays 100 events: the replay does not count
    told: list[int] = []
    late.on_overflow = lambda seq, why: told.append(seq)
    for _ in range(10):
        log.append(_custom())
    assert not told
    log.append(_custom())  # 11 events past the head it joined at, none received
    assert told == [0]
    log2 = RunEventLog("r", 10_000)
    steady = log2.subscribe(0, 10)
    for _ in range(5_000):
        log2.append(_custom())
        _drain(steady)
    assert not steady.overflowed and steady.sent_seq == 5_000


def test_a_watcher_whose_events_were_dropped_by_retention_is_ended() -> None:
    log = RunEventLog("r", 20)
    for _ in range(30):
        log.append(_custom())
    sub = log.subscribe(0, 1_000, follow=False)  # from the oldest retained: 11
    assert _seqs(sub.take(100))[0] == 11
    sub.ack()
    for _ in range(30):
        log.append(_custom())
    assert sub.take(1 << 20) is None and sub.overflowed and "event_retention" in sub.why


def test_resuming_past_the_last_event_is_out_of_range() -> None:
    log = RunEventLog("r", 100)
    for _ in range(3):
        log.append(_custom())
    log.close()
    with pytest.raises(CarError) as err:
        log.subscribe(7, 100)
    assert err.value.code == Code.OUT_OF_RANGE and err.value.field == "after_seq"
    assert "seq 3" in str(err.value)
    assert _drain(log.subscribe(2, 100)) == [3]
    assert log.subscribe(3, 100).done


async def test_with_a_journal_events_are_published_once_committed() -> None:
    loop = asyncio.get_running_loop()
    barriers: list[asyncio.Future[None]] = []

    def barrier() -> asyncio.Future[None]:
        barriers.append(loop.create_future())
        return barriers[-1]

    log = RunEventLog("r", 100, barrier=barrier)
    follower = log.subscribe(0, 100)
    for _ in range(3):
        log.append(_custom())
    assert len(barriers) == 1  # one pending barrier per log
    assert follower.take(1 << 20) is None and log.since(0) == [] and log.published_seq == 0
    assert log.subscribe(0, 100).take(1 << 20) is None  # a new watcher does not replay them either
    waiting = asyncio.create_task(follower.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    barriers[0].set_result(None)
    await asyncio.wait_for(waiting, 5)
    # The barrier covered what was appended before it was asked for; the rest
    # waits for the next one.
    assert _drain(follower) == [1] and len(barriers) == 2
    barriers[1].set_result(None)
    await asyncio.sleep(0)
    assert _drain(follower) == [2, 3]
    log.append(_custom())
    log.append(_custom())
    assert len(barriers) == 3
    log.close()  # closed, but the last events are not committed: watchers wait for them
    assert not follower.done
    barriers[2].set_result(None)
    await asyncio.sleep(0)
    assert len(barriers) == 4  # event 5
    barriers[3].set_result(None)
    await asyncio.sleep(0)
    assert _drain(follower) == [4, 5] and follower.done
    assert [e.seq for e in log.since(0)] == [1, 2, 3, 4, 5]


def test_without_a_journal_events_are_published_at_once() -> None:
    log = RunEventLog("r", 100)
    log.append(_custom())
    assert log.published_seq == 1 and [e.seq for e in log.since(0)] == [1]


def test_a_closed_log_serves_replays_from_its_frozen_bytes() -> None:
    log = RunEventLog("r", 5)
    for _ in range(8):
        log.append(_custom(300))
    live = log.subscribe(3, 100)
    assert _seqs(live.take(700)) == [4, 5]
    live.ack()
    log.close()
    assert _drain(live, 700) == [6, 7, 8] and live.done
    assert _drain(log.subscribe(0, 100), 700) == [4, 5, 6, 7, 8]
    assert [e.seq for e in log.since(5)] == [6, 7, 8]
