"""The run store in Redis: run records, requests, step outputs, event streams
and state scopes, written in batches by one writer task.

Writes are queued where they are made and return at once; the writer sends
everything queued as one MULTI/EXEC pipeline (one round trip), and the next
batch collects while one is in flight. A write is acknowledged (`settle`) once
its batch is executed: from then on it is Redis's, and as durable as Redis's
persistence (AOF `appendfsync everysec` loses at most about a second of writes
when the Redis host crashes; docs/operations.md).

When Redis is unreachable (restarting, loading its AOF, a network cut) the
writer keeps the batch and retries with a backoff; producers waiting to
acknowledge wait with it, so nothing acknowledged is lost and nothing is
acknowledged that was not written."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from google.protobuf import message, struct_pb2

from carsvc._proto.car.v1 import runs_pb2, types_pb2
from carsvc.backends.redis import codec, keys
from carsvc.domain.backend import Recovered

log = logging.getLogger("carsvc.redis")

ENDED = frozenset({types_pb2.RUN_STATUS_SUCCEEDED, types_pb2.RUN_STATUS_FAILED, types_pb2.RUN_STATUS_CANCELLED})

Op = Callable[[Any], None]  # queues its commands on a pipeline

# A run record, written only by the replica that holds the run's lease (or
# when nobody does): a replica that was cut off from Redis and lost the run to
# another cannot overwrite it when it reconnects (fencing). KEYS: run, runs,
# active, lease; ARGV: record, ordinal, run id, ended (0/1), this replica, PX.
_RUN = """
local holder = redis.call('GET', KEYS[4])
if holder and ARGV[5] ~= '' and holder ~= ARGV[5] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
if ARGV[4] == '1' then
  redis.call('SREM', KEYS[3], ARGV[3])
  redis.call('DEL', KEYS[4])
else
  redis.call('SADD', KEYS[3], ARGV[3])
  if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[6]) end
end
return 1
"""

# A run's end drops what it needed to resume, unless another replica holds it
# now. KEYS: lease, resumable, request, steps, admitted; ARGV: run id, this replica.
_RUN_ENDED = """
local holder = redis.call('GET', KEYS[1])
if holder and ARGV[2] ~= '' and holder ~= ARGV[2] then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return 1
"""

# Retry delays while Redis cannot be reached (seconds; the last repeats).
BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
# How long close() waits for the last batch.
CLOSE_TIMEOUT = 10.0


class RedisRunStore:
    """`RunStore` on Redis (carsvc.domain.backend)."""

    def __init__(self, client: redis.asyncio.Redis, sync_client: redis.Redis) -> None:
        self._redis = client
        self._sync = sync_client
        self._ops: list[Op] = []
        self._enqueued = 0
        self._durable = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        # Set by the backend: this replica's id and how long its run leases last.
        self.replica_id = ""
        self.lease_ms = 0

    # -- recovery ----------------------------------------------------------------

    def load(self) -> Recovered:
        try:
            return self._load()
        except redis.RedisError as err:
            raise OSError(f"Redis: {err}") from None

    def _load(self) -> Recovered:
        """The state scopes. Runs are not loaded here: each replica takes the
        runs it may run through the run directory (its own from before a
        restart, and those whose lease lapsed) and reads the others on demand."""
        got = Recovered()
        r: Any = self._sync  # replies are bytes (no decode_responses)
        for name in sorted(_text(n) for n in r.smembers(keys.SCOPES)):
            values = r.hgetall(keys.scope(name))
            writers = r.hgetall(keys.scope_writers(name))
            scope: dict[str, tuple[struct_pb2.Value, str]] = {}
            for key, blob in values.items():
                try:
                    scope[_text(key)] = (struct_pb2.Value.FromString(blob), _text(writers.get(key, b"")))
                except message.DecodeError as err:
                    _skipped(got, "state", "state %r key %r", name[:200], _text(key)[:200], err=err)
            if scope:
                got.state[name] = scope
        return got

    # -- writing -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._write_loop(), name="carsvc-redis-writer")

    def run(self, ordinal: int, record: runs_pb2.Run) -> None:
        run_id, data = record.run_id, record.SerializeToString()
        ended = record.status in ENDED

        names = [keys.run(run_id), keys.RUNS, keys.ACTIVE, keys.lease(run_id)]
        args = [data, ordinal, run_id, int(ended), self.replica_id, self.lease_ms]
        self.put(lambda p: p.eval(_RUN, len(names), *names, *args))

    def request(self, run_id: str, request: bytes) -> None:
        def op(p: Any) -> None:
            p.set(keys.request(run_id), request)
            p.sadd(keys.RESUMABLE, run_id)

        self.put(op)

    def step(self, run_id: str, step: str, output: types_pb2.AgentOutput) -> None:
        data = output.SerializeToString()
        self.put(lambda p: p.hset(keys.steps(run_id), step, data))

    def event(self, run_id: str, seq: int, data: bytes) -> None:
        self.put(lambda p: p.xadd(keys.events(run_id), {"e": data}, id=f"{seq}-0"))

    def state(self, scope: str, key: str, value: object, writer: str, time_ms: int) -> None:
        data = value.SerializeToString() if isinstance(value, struct_pb2.Value) else None
        change = codec.encode(self.replica_id, "state", scope, key, writer, data)
        if data is not None:

            def op(p: Any) -> None:
                p.hset(keys.scope(scope), key, data)
                p.hset(keys.scope_writers(scope), key, writer)
                p.sadd(keys.SCOPES, scope)
                p.publish(keys.CHANGES, change)

        else:

            def op(p: Any) -> None:
                p.hdel(keys.scope(scope), key)
                p.hdel(keys.scope_writers(scope), key)
                p.publish(keys.CHANGES, change)

        self.put(op)

    def run_ended(self, run_id: str) -> None:
        names = [keys.lease(run_id), keys.RESUMABLE, keys.request(run_id), keys.steps(run_id), keys.admitted(run_id)]
        self.put(lambda p: p.eval(_RUN_ENDED, len(names), *names, run_id, self.replica_id))

    def forget(self, run_id: str) -> None:
        def op(p: Any) -> None:
            p.zrem(keys.RUNS, run_id)
            p.delete(keys.run(run_id), keys.events(run_id))

        self.put(op)

    def put(self, op: Op) -> None:
        """Queues commands for the next batch (the backend's thread hand-overs
        use it too, so they are ordered with the run's records)."""
        self._ops.append(op)
        self._enqueued += 1
        self._wake.set()

    def barrier(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._durable >= self._enqueued:
            fut.set_result(None)
        else:
            self._waiters.append((self._enqueued, fut))
        return fut

    def settle(self) -> asyncio.Future[None] | None:
        """Every acknowledgement waits until its writes are in Redis."""
        return self.barrier() if self._durable < self._enqueued else None

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch, self._ops = self._ops, []
                upto = self._enqueued
                await self._commit(batch)
                self._durable = upto
                while self._waiters and self._waiters[0][0] <= upto:
                    _, fut = self._waiters.popleft()
                    if not fut.done():
                        fut.set_result(None)
            if self._done is not None:
                return

    async def _commit(self, batch: list[Op]) -> None:
        attempt = 0
        while True:
            pipe = self._redis.pipeline(transaction=True)
            for op in batch:
                op(pipe)
            try:
                results = await pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as err:
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)]
                if attempt in (0, len(BACKOFF) - 1):
                    log.warning(
                        "redis: %d writes wait, Redis is unreachable (%s); retrying in %.2fs", len(batch), err, delay
                    )
                attempt += 1
                await asyncio.sleep(delay)
                continue
            if attempt:
                log.warning("redis: reachable again after %d retries; %d writes committed", attempt, len(batch))
            for result in results:
                if isinstance(result, Exception):
                    # A replayed write (an event seq already there after a retried
                    # batch) is refused by Redis: the data is there already.
                    log.debug("redis: a write was refused: %s", result)
            return

    def close(self) -> None:
        loop, task = self._loop, self._task
        if loop is None or task is None or loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._stop(), loop).result(CLOSE_TIMEOUT)

    async def _stop(self) -> None:
        self._done = asyncio.get_running_loop().create_future()
        self._wake.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), CLOSE_TIMEOUT)
            except TimeoutError:
                task.cancel()
                log.error("redis: %d writes were not committed before the sidecar stopped", len(self._ops))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _skipped(got: Recovered, table: str, what: str, *args: object, err: Exception) -> None:
    got.skipped_rows[table] = got.skipped_rows.get(table, 0) + 1
    log.error("redis: skipped " + what + " that cannot be read back: %s", *args, err)
