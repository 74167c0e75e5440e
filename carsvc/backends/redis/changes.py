"""What one replica changes that every replica keeps a copy of: state
transitions and registered agents. Each change is written to its hash and
published on one channel in the same batch; the other replicas apply it to
their copies. After a gap in the subscription (Redis restarted, a network
cut) a replica reads everything again ("resync"), so no change is missed for
long."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio
from google.protobuf import message, struct_pb2

from carsvc._proto.car.v1 import types_pb2
from carsvc.backends.redis import codec, keys
from carsvc.backends.redis.codec import decode
from carsvc.backends.redis.store import BACKOFF, RedisRunStore
from carsvc.domain.backend import Change

log = logging.getLogger("carsvc.redis")

class RedisChanges:
    def __init__(self, client: redis.asyncio.Redis, store: RedisRunStore, replica_id: str) -> None:
        self._redis = client
        self._store = store
        self.replica_id = replica_id

    # -- registered agents -----------------------------------------------------------

    def agent_changed(self, name: str, spec: types_pb2.AgentSpec | None) -> None:
        data = spec.SerializeToString() if spec is not None else None
        payload = codec.encode(self.replica_id, "agent", name, "", "", data)

        def op(p: Any) -> None:
            if data is None:
                p.hdel(keys.AGENTS, name)
            else:
                p.hset(keys.AGENTS, name, data)
            p.publish(keys.CHANGES, payload)

        self._store.put(op)

    async def agents(self) -> list[types_pb2.AgentSpec]:
        stored: Any = await self._redis.hgetall(keys.AGENTS)
        specs = []
        for name, blob in sorted(stored.items()):
            try:
                specs.append(types_pb2.AgentSpec.FromString(blob))
            except message.DecodeError:
                log.error("redis: the registered agent %r cannot be read back; skipped", name[:200])
        return specs

    async def state(self) -> dict[str, dict[str, tuple[struct_pb2.Value, str]]]:
        """Every state scope as the store holds it."""
        return (await asyncio.get_running_loop().run_in_executor(None, self._store.load)).state

    # -- every replica's changes ---------------------------------------------------------

    async def changes(self) -> AsyncIterator[Change]:
        """Other replicas' changes as they happen; Change("resync") first and
        after every gap: read everything again."""
        attempt = 0
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.CHANGES)
                attempt = 0
                yield Change("resync")
                while True:
                    got: Any = await pubsub.get_message(timeout=1.0)
                    if got is None:
                        continue
                    sender, change = decode(got["data"])
                    if sender != self.replica_id:
                        yield change
            except (redis.ConnectionError, redis.TimeoutError) as err:
                if attempt == 0:
                    log.warning("redis: the change feed was cut (%s); reconnecting", err)
                await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
                attempt += 1
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
