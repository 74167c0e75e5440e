"""The Redis backend: run records, events, state, thread locks and shared
budgets kept in Redis (7.0+, or Valkey), for a sidecar whose runs must outlive
its process and for several replicas sharing one Redis (docs/operations.md,
"Redis")."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from carsvc.backends.redis.budgets import RedisBudgets
from carsvc.backends.redis.bus import RedisBus
from carsvc.backends.redis.changes import RedisChanges
from carsvc.backends.redis.directory import RedisRunDirectory
from carsvc.backends.redis.locks import RedisThreadLocks
from carsvc.backends.redis.store import RedisRunStore

__all__ = ["RedisBackend"]

# Retries of a command while Redis cannot be reached (exponential, at most 2 s apart).
RETRIES = 20


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, *, replica_id: str = "", lease_ms: int = 15_000) -> None:
        """`replica_id`: this replica's name in the cluster, kept across restarts
        so that a restarted replica takes its runs back at once (empty: a new
        random one, and its runs are taken over once their leases lapse)."""
        self.url = url
        self.replica_id = replica_id or f"r-{uuid.uuid4().hex[:12]}"
        self.lease_ms = lease_ms
        # One connection pool per client; hiredis parses replies when installed.
        # Commands are retried for about 30 s while Redis restarts or a network
        # blip passes (a budget script retried after a lost reply may count one
        # agent twice: it can under-admit, never over-admit).
        self.client = redis.asyncio.Redis.from_url(
            url, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), RETRIES), retry_on_timeout=True
        )
        self._store = RedisRunStore(self.client, redis.Redis.from_url(url))
        self._store.replica_id, self._store.lease_ms = self.replica_id, lease_ms
        self._budgets = RedisBudgets(self.client)
        self._threads = RedisThreadLocks(self.client, self._store)
        self._bus = RedisBus(self.client, self._store, self.replica_id)
        self._directory = RedisRunDirectory(self.client, self._store, self.replica_id)
        self._changes = RedisChanges(self.client, self._store, self.replica_id)

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

    @property
    def directory(self) -> RedisRunDirectory:
        return self._directory

    @property
    def changes(self) -> RedisChanges:
        return self._changes

    async def close(self) -> None:
        await self.client.aclose()

    def describe(self) -> str:
        """The URL without its password, for logs."""
        url = urlsplit(self.url)
        where = url.hostname or url.path
        if url.port:
            where += f":{url.port}"
        return f"{url.scheme}://{where}{url.path if url.hostname else ''}"
