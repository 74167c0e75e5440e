"""Implementations of the backend interface (carsvc/domain/backend.py).

`memory`: everything in this process, with the SQLite journal under
--data-dir (the default). `redis`: runs, events, state, thread locks and
shared budgets in Redis (--backend redis://...). See docs/architecture.md,
"Backends"."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from carsvc.backends.journal import Journal
from carsvc.backends.memory import MemoryBackend

if TYPE_CHECKING:
    from carsvc.backends.redis import RedisBackend
    from carsvc.config import Settings


def open_backend(s: Settings) -> MemoryBackend | RedisBackend:
    """The backend the settings name (Redis is imported only when used)."""
    if s.backend:
        from carsvc.backends.redis import RedisBackend

        replica_id = s.replica_id or (f"{socket.gethostname()}:{s.port}" if s.port else "")
        return RedisBackend(s.backend, replica_id=replica_id, lease_ms=int(s.heartbeat_timeout_s * 1000))
    if s.data_dir:
        return MemoryBackend(Journal(s.data_dir, flush_interval=s.journal_flush_ms / 1000, sync=s.journal_sync))
    return MemoryBackend()
