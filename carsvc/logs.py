"""Log output of the sidecar: human-readable text (default) or one JSON object
per line for log pipelines.

Log calls that concern a run, an assignment or a worker pass their ids with
`extra=` (see `ids`); the JSON format turns them into fields (`run_id`,
`assignment_id`, `worker_id`, `session_id`, `thread_id`), so a pipeline can
follow one run through the log without parsing messages.

What a caller sends never makes the log big (`configure` installs both):

* `CutValues`: every string argument and id of a record is cut to
  SHOWN_CHARS characters (saying how long it was), and a whole message to
  MAX_MESSAGE_CHARS, so a 2 MiB worker id writes a line, not megabytes;
* `Repeats`: a WARNING (or worse) logged from one place (one logger, one
  format string) more than `burst` times within `window` seconds is
  suppressed after the first `burst`, and when the window ends one line says
  how many were left out, quoting the last: "... and 3,272 more like it in the
  last 10 s (the last: refused ...)". A flood of refused calls writes a few
  lines, not thousands.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pythonjsonlogger.json import JsonFormatter

from carsvc.domain.errors import SHOWN_CHARS, shown

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ID_FIELDS = ("run_id", "assignment_id", "worker_id", "session_id", "thread_id")
# A whole message (after formatting) is cut to this many characters.
MAX_MESSAGE_CHARS = 4_000


def ids(
    *, run_id: str = "", assignment_id: str = "", worker_id: str = "", session_id: str = "", thread_id: str = ""
) -> dict[str, str]:
    """The `extra=` of a log call: the ids that are set."""
    found = {
        "run_id": run_id,
        "assignment_id": assignment_id,
        "worker_id": worker_id,
        "session_id": session_id,
        "thread_id": thread_id,
    }
    return {key: value for key, value in found.items() if value}


class CutValues(logging.Filter):
    """Cuts what a record echoes to a sane length (see the module's doc). It
    changes the record, so it belongs on the handler that writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and len(a) > SHOWN_CHARS for a in args):
            record.args = tuple(shown(a) if isinstance(a, str) else a for a in args)
        for name in ID_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str) and len(value) > SHOWN_CHARS:
                record.__dict__[name] = shown(value)
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            record.msg, record.args = shown(message, MAX_MESSAGE_CHARS), ()
        return True


@dataclass
class _Window:
    started: float
    seen: int = 1
    left_out: int = 0
    last: logging.LogRecord | None = None
    timer: threading.Timer | None = field(default=None, repr=False)


class Repeats(logging.Filter):
    """Rate-limits repeated warnings with a count (see the module's doc).

    `emit` writes the summary line (the handler's `handle`); the summary comes
    from a timer thread when the window ends, so it is written even if the
    burst stopped. Records below `level` always pass."""

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        burst: int = 10,
        window: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.emit = emit
        self.burst = burst
        self.window = window
        self.level = level
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, str], _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or getattr(record, "repeats_summary", False):
            return True
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg).__name__)
        now = self.clock()
        summary = None
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.started >= self.window:
                summary = self._close(key, window)  # only if its timer has not run yet
                if len(self._windows) >= 1_000:
                    self._prune(now)
                self._windows[key] = _Window(now)
                passes = True
            else:
                window.seen += 1
                passes = window.seen <= self.burst
                if not passes:
                    window.left_out += 1
                    window.last = record
                    if window.timer is None:
                        delay = max(0.0, window.started + self.window - now)
                        window.timer = threading.Timer(delay, self.flush, (key,))
                        window.timer.daemon = True
                        window.timer.start()
        if summary is not None:
            self.emit(summary)
        return passes

    def flush(self, key: tuple[str, str] | None = None) -> None:
        """Writes the summary of `key`'s window (every window's when None) if it left records out."""
        with self._lock:
            keys = list(self._windows) if key is None else [key]
            summaries = [s for k in keys if (s := self._close(k, self._windows.get(k))) is not None]
        for summary in summaries:
            self.emit(summary)

    def _close(self, key: tuple[str, str], window: _Window | None) -> logging.LogRecord | None:
        if window is None or not window.left_out or window.last is None:
            return None
        if window.timer is not None:
            window.timer.cancel()
            window.timer = None
        last = window.last
        left_out, window.left_out, window.last = window.left_out, 0, None
        summary = logging.LogRecord(
            last.name, last.levelno, last.pathname, last.lineno,
            "... and %s more like it in the last %s s (the last: %s)",
            (f"{left_out:,}", f"{self.window:g}", shown(last.getMessage())), None,
        )
        summary.repeats_summary = True
        summary.left_out = left_out
        return summary

    def _prune(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.started >= self.window and not window.left_out:
                del self._windows[key]


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log_format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def configure(level: str, fmt: str = "text") -> None:
    """Sends every log record at `level` and above to stderr in `fmt`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(CutValues())
    handler.addFilter(Repeats(handler.handle))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
