"""Log output of the sidecar: human-readable text (default) or one JSON object
per line for log pipelines.

Log calls that concern a run, an assignment or a worker pass their ids with
`extra=` (see `ids`); the JSON format turns them into fields (`run_id`,
`assignment_id`, `worker_id`, `session_id`, `thread_id`), so a pipeline can
follow one run through the log without parsing messages.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
