"""How replicas reach each other through Redis: an inbox stream per replica,
and a directory where each replica says which agents its workers serve.

A message is posted through the run store's writer (so it travels in the next
batch, ordered after what the run wrote before it) and read by its addressee
with a blocking XREAD. A replica's directory entry expires unless renewed: a
replica that stops renewing it is gone, and the work it held is handed out
again by the replicas that sent it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio

from carsvc.backends.redis import keys
from carsvc.backends.redis.store import BACKOFF, RedisRunStore
from carsvc.domain.backend import Peer

log = logging.getLogger("carsvc.redis")

# Inbox entries kept at most (approximately); an addressee reads them at once.
INBOX_LENGTH = 100_000
# Entries read at a time, and how long one XREAD blocks (ms).
READ_COUNT = 1_000
READ_BLOCK_MS = 1_000


class RedisBus:
    def __init__(self, client: redis.asyncio.Redis, store: RedisRunStore, replica_id: str) -> None:
        self._redis = client
        self._store = store
        self.replica_id = replica_id

    def post(self, replica_id: str, kind: str, data: bytes) -> None:
        """Queues a message for `replica_id`'s inbox (sent with the next batch)."""
        entry = {"f": self.replica_id, "k": kind, "d": data}
        self._store.put(
            lambda p: p.xadd(keys.inbox(replica_id), entry, maxlen=INBOX_LENGTH, approximate=True)
        )

    async def receive(self) -> AsyncIterator[tuple[str, str, bytes]]:
        """This replica's messages as (sender, kind, data), in order, forever."""
        inbox = keys.inbox(self.replica_id)
        last = "0-0"
        attempt = 0
        while True:
            try:
                reply: Any = await self._redis.xread({inbox: last}, count=READ_COUNT, block=READ_BLOCK_MS)
            except (redis.ConnectionError, redis.TimeoutError) as err:
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                if attempt == 0:
                    log.warning("redis: cannot read this replica's inbox (%s); retrying", err)
                attempt += 1
                await asyncio.sleep(delay)
                continue
            attempt = 0
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id
                    yield fields[b"f"].decode(), fields[b"k"].decode(), fields[b"d"]
            if reply:
                await self._redis.xtrim(inbox, minid=last)  # read: no need to keep them

    async def advertise(self, agents: list[str], capacity: int, ttl_ms: int) -> None:
        """Says which agents this replica's workers serve (renew within ttl_ms)."""
        key = keys.replica(self.replica_id)
        async with self._redis.pipeline(transaction=True) as p:
            p.hset(key, mapping={"agents": json.dumps(sorted(agents)), "capacity": capacity})
            p.pexpire(key, ttl_ms)
            p.sadd(keys.REPLICAS, self.replica_id)
            await p.execute()

    async def peers(self) -> list[Peer]:
        """The other replicas alive now (whose directory entry has not expired)."""
        members: Any = await self._redis.smembers(keys.REPLICAS)
        ids = sorted(i.decode() for i in members)
        others = [i for i in ids if i != self.replica_id]
        if not others:
            return []
        async with self._redis.pipeline(transaction=False) as p:
            for replica_id in others:
                p.hgetall(keys.replica(replica_id))
            entries = await p.execute()
        found: list[Peer] = []
        gone: list[str] = []
        for replica_id, entry in zip(others, entries, strict=True):
            if not entry:
                gone.append(replica_id)
                continue
            agents = tuple(json.loads(entry[b"agents"]))
            found.append(Peer(replica_id, agents, int(entry[b"capacity"])))
        if gone:
            await self._redis.srem(keys.REPLICAS, *gone)
            await self._redis.delete(*(keys.inbox(i) for i in gone))
        return found

    async def leave(self) -> None:
        """Removes this replica from the directory (a clean stop)."""
        await self._redis.delete(keys.replica(self.replica_id), keys.inbox(self.replica_id))
        await self._redis.srem(keys.REPLICAS, self.replica_id)
