"""The journal's commit barrier, its back-pressure and its recovery from bad rows
(in process; the SIGKILL tests are in test_durability.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.backends.journal import Journal
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.values import to_value


def _rows(journal: Journal, table: str) -> int:
    with sqlite3.connect(journal.path) as db:
        count: int = db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return count


async def test_barrier_resolves_once_what_came_before_is_committed(tmp_path: Path) -> None:
    # A long pace: only the barrier makes the writer commit this soon.
    journal = Journal(tmp_path, flush_interval=60.0)
    journal.start()
    try:
        journal.state("s", "k", to_value(1), "w", 0)
        first = journal.barrier()
        journal.state("s", "k2", to_value(2), "w", 0)
        assert journal.barrier() is first  # callers between two commits share one future
        assert not first.done()
        await asyncio.wait_for(first, 10)
        assert _rows(journal, "state") == 2
        # Nothing uncommitted: already done.
        assert journal.barrier().done()
    finally:
        journal.close()


async def test_a_cancelled_waiter_does_not_cancel_the_shared_barrier(tmp_path: Path) -> None:
    journal = Journal(tmp_path, flush_interval=60.0)
    journal.state("s", "k", to_value(1), "w", 0)
    barrier = journal.barrier()  # the writer is not started yet: it stays pending
    impatient = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(barrier), 0.01))
    waiter = asyncio.create_task(_await(barrier))
    await asyncio.sleep(0)
    waiter.cancel()  # cancelling one awaiting task ...
    with pytest.raises(TimeoutError):
        await impatient
    journal.start()
    await asyncio.wait_for(asyncio.shield(barrier), 10)  # ... leaves it pending for the others
    assert not barrier.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await waiter  # the cancelled task still ends, once the commit is done
    journal.close()


async def _await(future: asyncio.Future[None]) -> None:
    await future


async def test_strict_settles_every_acknowledgement_and_normal_only_when_lagging(tmp_path: Path) -> None:
    strict = Journal(tmp_path / "strict", sync="strict")
    strict.start()
    try:
        strict.state("s", "k", to_value(1), "w", 0)
        wait = strict.settle()
        assert wait is not None
        await asyncio.wait_for(wait, 10)
        assert _rows(strict, "state") == 1
    finally:
        strict.close()

    normal = Journal(tmp_path / "normal", flush_interval=0.05)
    normal.start()
    blocker = sqlite3.connect(normal.path, isolation_level=None)
    try:
        normal.state("s", "k", to_value(1), "w", 0)
        assert normal.settle() is None  # fresh: acknowledge now
        blocker.execute("BEGIN IMMEDIATE")  # a stalled disk: the writer cannot commit
        await asyncio.sleep(0.1)
        lagging = normal.settle()  # the oldest uncommitted record is older than the bound
        assert lagging is not None
        await asyncio.sleep(0.05)
        assert not lagging.done()
        blocker.execute("COMMIT")
        await asyncio.wait_for(lagging, 10)
        assert _rows(normal, "state") == 1
        assert normal.settle() is None
    finally:
        blocker.close()
        normal.close()


def test_journal_refuses_an_unknown_sync_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="normal, full, strict"):
        Journal(tmp_path, sync="fast")


def test_a_bad_row_is_skipped_and_named_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path)
    good = events_pb2.RunEvent(run_id="r1", seq=1, run_started=events_pb2.RunStarted(thread_id="t"))
    with sqlite3.connect(journal.path) as db:
        db.execute("INSERT INTO runs VALUES ('r1', 1, ?)", (runs_pb2.Run(run_id="r1").SerializeToString(),))
        db.execute("INSERT INTO runs VALUES ('r2', 2, ?)", (b"\xff\xff\xff",))
        db.execute("INSERT INTO events VALUES ('r1', 1, ?)", (good.SerializeToString(),))
        db.execute("INSERT INTO events VALUES ('r1', 2, ?)", (poisoned_event("r1", 2),))
        db.execute("INSERT INTO state (scope, key, value, writer, time_ms) VALUES ('s', 'ok', ?, 'w', 0)",
                   (to_value(1).SerializeToString(),))
        db.execute("INSERT INTO state (scope, key, value, writer, time_ms) VALUES ('s', 'bad', ?, 'w', 0)",
                   (b"\x0a\xff",))
    got = journal.load()
    assert [r.run_id for r in got.runs] == ["r1"]
    assert [e.seq for e in got.events["r1"]] == [1]
    assert got.skipped_events == {"r1": [2]}
    assert list(got.state["s"]) == ["ok"]
    assert got.skipped_rows == {"runs": 1, "events": 1, "state": 1}
    text = caplog.text
    assert "event seq 2 of run 'r1'" in text and "the record of run 'r2'" in text and "key 'bad'" in text


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field, encoded by hand."""
    size, length = bytearray(), len(payload)
    while True:
        byte, length = length & 0x7F, length >> 7
        size.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([number << 3 | 2]) + bytes(size) + payload


def _value_path(desc: Descriptor, seen: frozenset[str]) -> list[int] | None:
    """Field numbers leading from `desc` to a google.protobuf.Value."""
    for f in desc.fields:
        kind = f.message_type
        if f.type != FieldDescriptor.TYPE_MESSAGE or kind is None or kind.GetOptions().map_entry:
            continue
        if kind.full_name == "google.protobuf.Value":
            return [f.number]
        if kind.full_name not in seen:
            sub = _value_path(kind, seen | {kind.full_name})
            if sub is not None:
                return [f.number, *sub]
    return None


def poisoned_event(run_id: str, seq: int, depth: int = 60) -> bytes:
    """A RunEvent carrying a Value nested deeper than protobuf's parse limit
    (encoded by hand: the library refuses to build one)."""
    out = b""
    for _ in range(depth):
        out = _field(6, _field(1, out))  # Value.list_value -> ListValue.values -> Value
    path = _value_path(events_pb2.RunEvent.DESCRIPTOR, frozenset({"car.v1.RunEvent"}))
    assert path is not None
    for number in reversed(path):
        out = _field(number, out)
    return events_pb2.RunEvent(run_id=run_id, seq=seq).SerializeToString() + out


async def test_strict_acknowledges_and_shows_a_run_end_only_once_committed(tmp_path: Path) -> None:
    sidecar = Sidecar(Settings(port=0, data_dir=str(tmp_path), journal_sync="strict"))
    await sidecar.start()
    blocker = sqlite3.connect(tmp_path / "carsvc.sqlite3", isolation_level=None)
    try:
        async with Client(sidecar.address) as client:
            handle = await client.start_run(single(agent("nobody"), "t"), thread_id="t")
            blocker.execute("BEGIN IMMEDIATE")  # the disk stalls: nothing commits
            setting = asyncio.create_task(client.set_state("s", "k", 1))
            cancelling = asyncio.create_task(client.cancel(handle.run_id))
            await asyncio.sleep(0.3)
            record = sidecar.runs.get(handle.run_id)
            assert record.ending and not record.done.is_set()  # the end is decided, not shown
            assert (await client.get_run(handle.run_id)).status == types_pb2.RUN_STATUS_RUNNING
            assert not setting.done()  # not acknowledged either
            blocker.execute("COMMIT")
            assert await asyncio.wait_for(setting, 10) == 1
            await asyncio.wait_for(cancelling, 10)
            await asyncio.wait_for(record.done.wait(), 10)
            assert (await client.get_run(handle.run_id)).status == types_pb2.RUN_STATUS_CANCELLED
    finally:
        blocker.close()
        await sidecar.stop(grace=0.1)
    recovered = Journal(tmp_path).load()
    assert recovered.state["s"]["k"][0].number_value == 1
    assert recovered.runs[0].status == types_pb2.RUN_STATUS_CANCELLED


def test_the_journal_sync_setting_is_checked() -> None:
    Settings(journal_sync="strict").validate()
    with pytest.raises(ValueError, match="journal_sync must be 'normal', 'full' or 'strict'"):
        Settings(journal_sync="paranoid").validate()
    with pytest.raises(ValueError, match="journal_flush_ms must be positive"):
        Settings(journal_flush_ms=0).validate()


def test_a_run_id_reused_after_it_was_forgotten_keeps_its_new_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    old = runs_pb2.Run(run_id="r", thread_id="old")
    new = runs_pb2.Run(run_id="r", thread_id="new")
    journal.run(1, old)
    journal.forget("r")
    journal.run(2, new)
    journal.start()
    journal.close()
    assert [r.thread_id for r in Journal(tmp_path).load().runs] == ["new"]
