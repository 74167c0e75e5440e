"""The Redis backend: run records, events, state, thread locks and shared
budgets kept in Redis (7.0+, or Valkey), for a sidecar whose runs must outlive
its process and for several replicas sharing one Redis (docs/operations.md,
"Redis")."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
import redis.asyncio

from carsvc.backends.redis.budgets import RedisBudgets
from carsvc.backends.redis.bus import RedisBus
from carsvc.backends.redis.locks import RedisThreadLocks
from carsvc.backends.redis.store import RedisRunStore

__all__ = ["RedisBackend"]


class RedisBackend:
    name = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        # One connection pool per client; hiredis parses replies when installed.
        self.client = redis.asyncio.Redis.from_url(url)
        self._store = RedisRunStore(self.client, redis.Redis.from_url(url))
        self._budgets = RedisBudgets(self.client)
        self._threads = RedisThreadLocks(self.client, self._store)
        self._bus = RedisBus(self.client, self._store)

    @property
    def store(self) -> RedisRunStore:
        return self._store

    @property
    def budgets(self) -> RedisBudgets:
        return self._budgets

    @property
    def threads(self) -> RedisThreadLocks:
        return self._threads

    @property
    def bus(self) -> RedisBus:
        return self._bus

    async def close(self) -> None:
        await self.client.aclose()

    def describe(self) -> str:
        """The URL without its password, for logs."""
        url = urlsplit(self.url)
        where = url.hostname or url.path
        if url.port:
            where += f":{url.port}"
        return f"{url.scheme}://{where}{url.path if url.hostname else ''}"
