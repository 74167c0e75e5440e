"""Redis out of reach is UNAVAILABLE for a caller (retry, or another replica),
not an internal error."""

from __future__ import annotations

import pytest

import carsvc.backends.redis as redis_backend
from carsvc.backends.redis import RedisBackend
from carsvc.domain.budget_types import BudgetLimits
from carsvc.domain.errors import Unavailable
from tests.procs import free_port


async def test_calls_that_need_redis_say_unavailable_when_it_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_backend, "RETRIES", 0)  # not the 30 s a sidecar waits
    backend = RedisBackend(f"redis://127.0.0.1:{free_port()}/0")
    try:
        calls = [
            backend.budgets.create(BudgetLimits(max_agents=1), "b"),
            backend.budgets.get("b"),
            backend.threads.acquire("t", "r"),
            backend.directory.record("r"),
            backend.directory.next_ordinal(),
            backend.directory.claimable(),
        ]
        for call in calls:
            with pytest.raises(Unavailable, match="Redis cannot be reached"):
                await call
    finally:
        await backend.close()
