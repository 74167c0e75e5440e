"""One active run per thread across every replica: the thread's key holds
the id of the run that holds it. The lock belongs to the run, not to a
replica: a run that another replica resumes keeps its thread."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio

from carsvc.backends.redis import keys
from carsvc.backends.redis.errors import reachable
from carsvc.backends.redis.store import RedisRunStore

# KEYS[1] thread key; ARGV[1] run id. Returns the holder (ARGV[1] when taken).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return ARGV[1] end
return redis.call('GET', KEYS[1])
"""
# KEYS[1] thread key; ARGV[1] holder, ARGV[2] successor ('' releases).
_PASS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""


class RedisThreadLocks:
    def __init__(self, client: redis.asyncio.Redis, store: RedisRunStore) -> None:
        self._acquire = client.register_script(_ACQUIRE)
        self._store = store
        # Threads with a hand-over or release queued here and not yet written:
        # what a new start on that thread waits for (and only that).
        self._queued: dict[str, asyncio.Future[None]] = {}

    @reachable
    async def acquire(self, thread_id: str, run_id: str) -> str:
        queued = self._queued.get(thread_id)
        if queued is not None:
            await queued  # a hand-over or release this replica queued for the thread goes first
        holder = await self._acquire(keys=[keys.thread(thread_id)], args=[run_id])
        return holder.decode() if isinstance(holder, bytes) else str(holder)

    def hand_over(self, thread_id: str, holder: str, successor: str) -> None:
        self._queue(thread_id, holder, successor)

    def release(self, thread_id: str, holder: str) -> None:
        self._queue(thread_id, holder, "")

    def _queue(self, thread_id: str, holder: str, successor: str) -> None:
        def op(p: Any) -> None:
            p.eval(_PASS, 1, keys.thread(thread_id), holder, successor)

        self._store.put(op)
        written = self._store.barrier()
        self._queued[thread_id] = written
        written.add_done_callback(lambda done: self._forget(thread_id, done))

    def _forget(self, thread_id: str, written: asyncio.Future[None]) -> None:
        if self._queued.get(thread_id) is written:
            del self._queued[thread_id]
