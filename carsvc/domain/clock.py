"""Wall-clock helpers (one place, so tests and the journal agree on units)."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000
