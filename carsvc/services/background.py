"""Stopping the background tasks of the replica services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("carsvc")

# How long a stop waits for cancelled tasks to end.
STOP_TIMEOUT = 2.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any] | None], timeout: float = STOP_TIMEOUT) -> None:
    """Cancels `tasks` and waits for them for at most `timeout` seconds. A task
    that swallows its cancellation (redis-py's asyncio client can lose one
    while a command is in flight) must not hold a sidecar's stop forever."""
    pending = {t for t in tasks if t is not None and not t.done()}
    for task in pending:
        task.cancel()
    if not pending:
        return
    _, stuck = await asyncio.wait(pending, timeout=timeout)
    for task in stuck:
        log.warning("task %s did not end within %gs of its cancellation; left behind", task.get_name(), timeout)
