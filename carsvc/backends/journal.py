"""The durable journal behind `--data-dir`: state transitions, run events and
run records in one SQLite database (WAL mode, standard library only).

Writes never block the event loop: each record is serialized where it is
produced and put on a queue; a writer thread commits what is queued in one
transaction. The writer paces itself by the age of the oldest queued record,
not by a fixed sleep: it commits once that record is `flush_interval / 4` old,
and back to back while it is behind, so under any load a record is committed
within `flush_interval` of being queued (the bound docs/operations.md promises
for a SIGKILL). When the journal lags anyway (a slow disk), `settle()` makes
producers wait for the commit before they acknowledge: back-pressure instead
of an unbounded backlog.

Sync modes (`journal_sync`):

* "normal": commits are not fsynced (SQLite `synchronous=NORMAL`, WAL): a
  process crash loses at most `flush_interval`; a power loss may lose more.
* "full": every commit is fsynced.
* "strict": every commit is fsynced, the writer commits as soon as anything is
  queued (group commit: everything queued while one commit runs shares the next
  one), and `settle()` always waits: an acknowledgement means the record is on
  disk.

Commits never wait for a checkpoint (copying the WAL into the database, with
its fsyncs): a checkpointer thread does that every second. While a journal
runs, the interpreter's thread switch interval is 0.5 ms, so a busy event loop
does not hold the writer off the GIL for 5 ms at each SQLite call.

`barrier()` is the primitive under all of it: a future resolved (on the loop
that asked, via `call_soon_threadsafe`) once every record queued before the
call is committed.

On start, `load()` reads everything back, one row at a time: a row that does
not decode is logged and skipped (its run is marked `history_incomplete`), so
one bad record never keeps the sidecar from starting. The state log is then
compacted to one row per live key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import message, struct_pb2

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.domain.backend import Recovered
from carsvc.domain.errors import Unavailable

log = logging.getLogger("carsvc.journal")

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (scope TEXT NOT NULL, key TEXT NOT NULL, value BLOB, writer TEXT NOT NULL,
                                  time_ms INTEGER NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, ordinal INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS requests (run_id TEXT PRIMARY KEY, request BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS steps (run_id TEXT NOT NULL, step TEXT NOT NULL, output BLOB NOT NULL,
                                  PRIMARY KEY (run_id, step));
CREATE TABLE IF NOT EXISTS events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
                                   PRIMARY KEY (run_id, seq));
"""

SYNC_MODES = ("normal", "full", "strict")
# The interpreter's thread switch interval while a journal runs (seconds).
SWITCH_INTERVAL = 0.0005
# Seconds between two checkpoints of the WAL into the database.
CHECKPOINT_EVERY = 1.0

_STOP = object()

# Record kinds on the queue: (enqueued_at, kind, parameters).
_STATE, _EVENT, _RUN, _FORGET, _REQUEST, _STEP, _SETTLE = range(7)

# How much of the bound a record may wait on the queue before the writer takes
# it; the rest is for the commit itself (which, next to a busy event loop,
# waits for the GIL at each statement).
_PACE = 0.25
# Producers wait for the commit (back-pressure) once the oldest uncommitted
# record is older than this share of the bound.
_LAG = 0.6
# ... or once this many records wait: a commit takes time in proportion to what it
# writes, so a young but long queue would also outlast the bound.
_MAX_UNCOMMITTED = 1_000


class JournalError(Unavailable):
    """A commit failed: what waited for it is not on disk."""


class _Barrier(asyncio.Future[None]):
    """A future shared by every caller between two commits. One caller's
    cancellation must not cancel it for the others, so cancel() refuses: a
    cancelled task that awaits it ends once the commit is done."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class Journal:
    def __init__(self, data_dir: str | Path, *, flush_interval: float = 0.05, sync: str = "normal") -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"journal sync must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if flush_interval <= 0:
            raise ValueError(f"journal flush interval must be positive, not {flush_interval!r}")
        self.path = Path(data_dir) / "carsvc.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval = flush_interval
        self.sync = sync
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._hurry = threading.Event()
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopped = threading.Event()
        self._closed = False
        # Loop side (only touched on the event loop's thread).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._enqueued = 0  # records queued so far
        self._durable = 0  # records known committed (the first _durable queued ones)
        self._pending_since: deque[tuple[int, float]] = deque()  # (number, queued at) of uncommitted records
        self._waiters: deque[tuple[int, _Barrier]] = deque()  # (records it waits for, future)
        self._open: _Barrier | None = None  # the future callers share until the next commit
        self._resolved: asyncio.Future[None] | None = None
        # Writer side.
        self._committed = 0
        # For metrics and tests.
        self.commits = 0
        self.slowest_commit = 0.0
        self._slow_commits = 0
        self._slow_warned = 0.0
        db = self._connect()
        db.executescript(SCHEMA)
        db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'NORMAL' if self.sync == 'normal' else 'FULL'}")
        # Checkpoints (copying the WAL into the database, with fsyncs) are the
        # checkpointer thread's: a commit never waits for one.
        db.execute("PRAGMA wal_autocheckpoint=0")
        return db

    @property
    def strict(self) -> bool:
        return self.sync == "strict"

    # -- recovery ----------------------------------------------------------------

    def load(self) -> Recovered:
        """Reads the journal back and compacts the state log. Call before start().

        Every row is decoded on its own; one that does not decode is logged and
        skipped, never fatal."""
        got = Recovered()
        db = self._connect()
        try:
            for seq, scope, key, blob, writer in db.execute(
                "SELECT seq, scope, key, value, writer FROM state ORDER BY seq"
            ):
                keys = got.state.setdefault(scope, {})
                if blob is None:
                    keys.pop(key, None)
                    continue
                try:
                    keys[key] = (struct_pb2.Value.FromString(blob), writer)
                except message.DecodeError as err:
                    keys.pop(key, None)  # its previous value was overwritten: it is gone too
                    self._skipped(got, "state", "state %r key %r (row %d)", scope[:200], key[:200], seq, err=err)
            for run_id, blob in db.execute("SELECT run_id, record FROM runs ORDER BY ordinal"):
                try:
                    got.runs.append(runs_pb2.Run.FromString(blob))
                except message.DecodeError as err:
                    self._skipped(got, "runs", "the record of run %r", run_id, err=err)
            for run_id, seq, blob in db.execute("SELECT run_id, seq, event FROM events ORDER BY run_id, seq"):
                try:
                    got.events.setdefault(run_id, []).append(events_pb2.RunEvent.FromString(blob))
                except message.DecodeError as err:
                    got.skipped_events.setdefault(run_id, []).append(seq)
                    self._skipped(got, "events", "event seq %d of run %r", seq, run_id, err=err)
            for run_id, blob in db.execute("SELECT run_id, request FROM requests"):
                got.requests[run_id] = blob
            for run_id, step, blob in db.execute("SELECT run_id, step, output FROM steps"):
                try:
                    got.steps.setdefault(run_id, {})[step] = types_pb2.AgentOutput.FromString(blob)
                except message.DecodeError as err:
                    self._skipped(got, "steps", "step %r of run %r", step[:200], run_id, err=err)
            db.execute("BEGIN")
            db.execute("DELETE FROM state")
            db.executemany(
                "INSERT INTO state (scope, key, value, writer, time_ms) VALUES (?, ?, ?, ?, 0)",
                (
                    (scope, key, value.SerializeToString(), writer)
                    for scope, keys in got.state.items()
                    for key, (value, writer) in keys.items()
                ),
            )
            db.execute("COMMIT")
        finally:
            db.close()
        return got

    @staticmethod
    def _skipped(got: Recovered, table: str, what: str, *args: object, err: Exception) -> None:
        got.skipped_rows[table] = got.skipped_rows.get(table, 0) + 1
        log.error("journal: skipped " + what + " that cannot be read back: %s", *args, err)

    # -- writing (event loop side) ---------------------------------------------------

    def start(self) -> None:
        """Starts the writer; call it on the event loop that will use barrier()."""
        with contextlib.suppress(RuntimeError):  # no loop: commits are not reported back
            self._loop = asyncio.get_running_loop()
        # The writer takes the GIL back after every SQLite call; a busy event loop
        # gives it up only every switch interval (5 ms by default), which made a
        # commit of a few statements take tens of ms. A shorter interval costs
        # nothing while only one thread wants the GIL.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._write_loop, name="carsvc-journal", daemon=True)
        self._thread.start()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="carsvc-journal-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def state(self, scope: str, key: str, value: object, writer: str, time_ms: int) -> None:
        blob = value.SerializeToString() if isinstance(value, struct_pb2.Value) else None
        self._put(_STATE, (scope, key, blob, writer, time_ms))

    def event(self, run_id: str, seq: int, data: bytes) -> None:
        """A run event, serialized once by the event log for watchers and journal alike."""
        self._put(_EVENT, (run_id, seq, data))

    def run(self, ordinal: int, record: runs_pb2.Run) -> None:
        self._put(_RUN, (record.run_id, ordinal, record.SerializeToString()))

    def request(self, run_id: str, request: bytes) -> None:
        """The StartRunRequest a run was started with, kept while it may resume."""
        self._put(_REQUEST, (run_id, request))

    def step(self, run_id: str, step: str, output: types_pb2.AgentOutput) -> None:
        """An accepted agent output under its step key (a resumed run returns it
        instead of dispatching the step again)."""
        self._put(_STEP, (run_id, step, output.SerializeToString()))

    def run_ended(self, run_id: str) -> None:
        """The run has ended: it will not resume, its request and steps can go."""
        self._put(_SETTLE, (run_id,))

    def forget(self, run_id: str) -> None:
        """Drops a run that fell out of retention, with its events."""
        self._put(_FORGET, (run_id,))

    def _put(self, kind: int, params: tuple[Any, ...]) -> None:
        now = time.monotonic()
        self._enqueued += 1
        if self._loop is not None:  # commits are reported back: track what waits
            self._pending_since.append((self._enqueued, now))
        self._queue.put((now, kind, params))

    @property
    def lag(self) -> float:
        """Seconds the oldest uncommitted record has waited (0 when none waits)."""
        if not self._pending_since:
            return 0.0
        return time.monotonic() - self._pending_since[0][1]

    def barrier(self) -> asyncio.Future[None]:
        """A future of the running loop, resolved once every record queued before
        this call is committed (and fsynced where the sync mode says so).

        Cheap to call very often: all callers between two commits share one
        future, and with nothing uncommitted it is already done. A barrier wakes
        the writer: it commits now rather than at its pace. The future cannot be
        cancelled (it is shared); it fails with JournalError when the commit
        does."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self._durable >= self._enqueued or (self._closed and self._thread is None):
            done = self._resolved
            if done is None or done.get_loop() is not loop:
                done = self._resolved = loop.create_future()
                done.set_result(None)
            return done
        if self._open is not None:
            self._waiters[-1] = (self._enqueued, self._open)
            return self._open
        fut = self._open = _Barrier(loop=loop)
        self._waiters.append((self._enqueued, fut))
        self._hurry.set()
        return fut

    def settle(self) -> asyncio.Future[None] | None:
        """What a producer awaits before it acknowledges: in strict mode the
        commit of everything queued so far; otherwise the same only while the
        journal lags (its oldest uncommitted record is older than most of the
        bound, or many records wait), else None (acknowledge now)."""
        if self.strict or self.lag > self.flush_interval * _LAG or self._enqueued - self._durable > _MAX_UNCOMMITTED:
            return self.barrier()
        return None

    def _on_commit(self, committed: int, failed: BaseException | None) -> None:
        """On the loop: the first `committed` records are written (or failed)."""
        self._durable = max(self._durable, committed)
        pending = self._pending_since
        while pending and pending[0][0] <= committed:
            pending.popleft()
        self._open = None
        waiters = self._waiters
        while waiters and waiters[0][0] <= committed:
            _, fut = waiters.popleft()
            if fut.done():
                continue
            if failed is None:
                fut.set_result(None)
            else:
                fut.set_exception(JournalError(f"the journal could not commit: {failed}"))

    def close(self) -> None:
        """Writes what is queued and stops the writer (blocks: call it off the
        loop, e.g. in an executor, when barriers may be pending)."""
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._hurry.set()
            self._thread.join(timeout=30)
            self._thread = None
        self._stopped.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=30)
            self._checkpointer = None

    # -- the writer thread ------------------------------------------------------------

    def _drain(self, first: Any) -> Iterator[Any]:
        yield first
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _write_loop(self) -> None:
        db = self._connect()
        pace = 0.0 if self.strict else self.flush_interval * _PACE
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is not _STOP and pace:
                    # Wait until the oldest record is `pace` old, or a barrier asks.
                    delay = first[0] + pace - time.monotonic()
                    if delay > 0:
                        self._hurry.wait(delay)
                self._hurry.clear()
                batch = []
                for item in self._drain(first):
                    if item is _STOP:
                        stopping = True
                    else:
                        batch.append(item)
                if not batch:
                    continue
                failed: BaseException | None = None
                began = time.monotonic()
                try:
                    self._write(db, batch)
                except sqlite3.Error as err:
                    failed = err
                    log.exception("journal write of %d records failed", len(batch))
                    if db.in_transaction:
                        db.rollback()
                self._committed += len(batch)
                self.commits += 1
                self._slow(began, time.monotonic(), len(batch))
                self._notify(self._committed, failed)
        finally:
            db.close()

    def _slow(self, began: float, ended: float, records: int) -> None:
        """Keeps the slowest commit, and warns (at most every 10 s) when commits
        take longer than the bound: the disk, not the load, breaks it then."""
        took = ended - began
        self.slowest_commit = max(self.slowest_commit, took)
        if took <= self.flush_interval:
            return
        self._slow_commits += 1
        if ended - self._slow_warned >= 10.0:
            log.warning(
                "journal: %d commits took longer than journal_flush_ms (%.0f ms) since the last warning, the "
                "latest %.0f ms for %d records; producers wait for the journal (a slow disk?)",
                self._slow_commits, self.flush_interval * 1000, took * 1000, records,
            )
            self._slow_commits = 0
            self._slow_warned = ended

    def _checkpoint_loop(self) -> None:
        """Copies the WAL into the database every CHECKPOINT_EVERY seconds without
        blocking the writer (PASSIVE), and truncates it when the journal closes."""
        db = self._connect()
        try:
            while not self._stopped.wait(CHECKPOINT_EVERY):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.exception("journal checkpoint failed")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            log.exception("journal checkpoint failed")
        finally:
            db.close()

    def _notify(self, committed: int, failed: BaseException | None) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._on_commit, committed, failed)

    @staticmethod
    def _write(db: sqlite3.Connection, batch: list[Any]) -> None:
        """One transaction. Rows go in multi-row statements, one per kind and
        chunk: SQLite releases the GIL at every statement step and a busy event
        loop holds it for up to the switch interval, so a statement per row
        would make a commit of N rows wait N times."""
        db.execute("BEGIN")
        rows: dict[int, list[tuple[Any, ...]]] = {kind: [] for kind in _INSERTS}
        for _, kind, params in batch:
            if kind in _DELETES:  # deletes keep their place between the inserts
                _insert(db, rows)
                for table in _DELETES[kind]:
                    db.execute(f"DELETE FROM {table} WHERE run_id = ?", params)  # table: one of _DELETES' names
            else:
                rows[kind].append(params)
        _insert(db, rows)
        db.execute("COMMIT")


_INSERTS = {
    _STATE: ("INSERT INTO state (scope, key, value, writer, time_ms) VALUES ", "(?, ?, ?, ?, ?)"),
    _EVENT: ("INSERT OR REPLACE INTO events (run_id, seq, event) VALUES ", "(?, ?, ?)"),
    _RUN: ("INSERT OR REPLACE INTO runs (run_id, ordinal, record) VALUES ", "(?, ?, ?)"),
    _REQUEST: ("INSERT OR REPLACE INTO requests (run_id, request) VALUES ", "(?, ?)"),
    _STEP: ("INSERT OR REPLACE INTO steps (run_id, step, output) VALUES ", "(?, ?, ?)"),
}
# Tables a delete of one run's rows clears.
_DELETES = {
    _FORGET: ("runs", "events", "requests", "steps"),
    _SETTLE: ("requests", "steps"),
}
# Rows per statement (5 parameters each at most: well within SQLite's limit of 32,766).
_CHUNK = 256


def _insert(db: sqlite3.Connection, rows: dict[int, list[tuple[Any, ...]]]) -> None:
    """Writes and empties `rows`, in order within each kind."""
    for kind, pending in rows.items():
        head, row = _INSERTS[kind]
        for start in range(0, len(pending), _CHUNK):
            chunk = pending[start:start + _CHUNK]
            db.execute(head + ", ".join([row] * len(chunk)), [p for params in chunk for p in params])
        pending.clear()
