"""The durable journal behind `--data-dir`: state transitions, run events and
run records in one SQLite database (WAL mode, standard library only).

Writes never block the event loop: they go to a queue that a writer thread
commits in batches every `flush_interval` seconds. A crash of the sidecar
process (even SIGKILL) loses at most the writes of that interval; with
`sync="full"` each batch is also fsynced, so a power loss loses no more. On
start, `load()` reads everything back and the state log is compacted to one
row per live key."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import events_pb2, runs_pb2

log = logging.getLogger("carsvc.journal")

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (scope TEXT NOT NULL, key TEXT NOT NULL, value BLOB, writer TEXT NOT NULL,
                                  time_ms INTEGER NOT NULL, seq INTEGER PRIMARY KEY AUTOINCREMENT);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, ordinal INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
                                   PRIMARY KEY (run_id, seq));
"""

_STOP = object()


@dataclass
class Recovered:
    """What a journal held when the sidecar started."""

    # scope -> key -> (value, writer); deleted keys are absent.
    state: dict[str, dict[str, tuple[struct_pb2.Value, str]]] = field(default_factory=dict)
    # Run records in start order, with their events.
    runs: list[runs_pb2.Run] = field(default_factory=list)
    events: dict[str, list[events_pb2.RunEvent]] = field(default_factory=dict)


class Journal:
    def __init__(self, data_dir: str | Path, *, flush_interval: float = 0.05, sync: str = "normal") -> None:
        if sync not in ("normal", "full"):
            raise ValueError(f"journal sync must be 'normal' or 'full', not {sync!r}")
        self.path = Path(data_dir) / "carsvc.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.flush_interval = flush_interval
        self._sync = sync
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        db = self._connect()
        db.executescript(SCHEMA)
        db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
        return db

    # -- recovery ----------------------------------------------------------------

    def load(self) -> Recovered:
        """Reads the journal back and compacts the state log. Call before start()."""
        got = Recovered()
        db = self._connect()
        try:
            for scope, key, blob, writer in db.execute("SELECT scope, key, value, writer FROM state ORDER BY seq"):
                keys = got.state.setdefault(scope, {})
                if blob is None:
                    keys.pop(key, None)
                else:
                    keys[key] = (struct_pb2.Value.FromString(blob), writer)
            for (blob,) in db.execute("SELECT record FROM runs ORDER BY ordinal"):
                got.runs.append(runs_pb2.Run.FromString(blob))
            for run_id, blob in db.execute("SELECT run_id, event FROM events ORDER BY run_id, seq"):
                got.events.setdefault(run_id, []).append(events_pb2.RunEvent.FromString(blob))
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

    # -- writing -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_loop, name="carsvc-journal", daemon=True)
        self._thread.start()

    def state(self, scope: str, key: str, value: object, writer: str, time_ms: int) -> None:
        self._queue.put(("state", scope, key, value, writer, time_ms))

    def event(self, run_id: str, event: events_pb2.RunEvent) -> None:
        self._queue.put(("event", run_id, event))

    def run(self, ordinal: int, record: runs_pb2.Run) -> None:
        self._queue.put(("run", ordinal, record))

    def forget(self, run_id: str) -> None:
        """Drops a run that fell out of retention, with its events."""
        self._queue.put(("forget", run_id))

    def close(self) -> None:
        """Writes what is queued and stops the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=30)
            self._thread = None

    def _drain(self, first: Any) -> Iterator[Any]:
        yield first
        while True:
            try:
                yield self._queue.get_nowait()
            except queue.Empty:
                return

    def _write_loop(self) -> None:
        db = self._connect()
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                batch = []
                for item in self._drain(first):
                    if item is _STOP:
                        stopping = True
                    else:
                        batch.append(item)
                if batch:
                    try:
                        self._write(db, batch)
                    except sqlite3.Error:
                        log.exception("journal write of %d records failed", len(batch))
                if not stopping:
                    threading.Event().wait(self.flush_interval)
        finally:
            db.close()

    @staticmethod
    def _write(db: sqlite3.Connection, batch: list[Any]) -> None:
        db.execute("BEGIN")
        for item in batch:
            kind = item[0]
            if kind == "state":
                _, scope, key, value, writer, time_ms = item
                blob = value.SerializeToString() if isinstance(value, struct_pb2.Value) else None
                db.execute(
                    "INSERT INTO state (scope, key, value, writer, time_ms) VALUES (?, ?, ?, ?, ?)",
                    (scope, key, blob, writer, time_ms),
                )
            elif kind == "event":
                _, run_id, event = item
                db.execute(
                    "INSERT OR REPLACE INTO events (run_id, seq, event) VALUES (?, ?, ?)",
                    (run_id, event.seq, event.SerializeToString()),
                )
            elif kind == "forget":
                db.execute("DELETE FROM runs WHERE run_id = ?", (item[1],))
                db.execute("DELETE FROM events WHERE run_id = ?", (item[1],))
            else:
                _, ordinal, record = item
                db.execute(
                    "INSERT OR REPLACE INTO runs (run_id, ordinal, record) VALUES (?, ?, ?)",
                    (record.run_id, ordinal, record.SerializeToString()),
                )
        db.execute("COMMIT")
