"""Runs across replicas: which replica runs each active run (a lease it
renews), taking over the runs of a replica that stopped renewing, and reading
any run's record and events from Redis, wherever it runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio
from google.protobuf import message

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.backends.redis import keys
from carsvc.backends.redis.errors import reachable
from carsvc.backends.redis.store import ENDED, RedisRunStore
from carsvc.domain.backend import Recovered

# KEYS: leases; ARGV[1]: this replica, ARGV[2]: PX. Renews the leases still
# this replica's (and takes those that lapsed unclaimed); returns the indexes
# (1-based) of the leases another replica holds now.
_RENEW = """
local lost = {}
for i, key in ipairs(KEYS) do
  local holder = redis.call('GET', key)
  if holder == ARGV[1] or not holder then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# KEYS[1] lease; ARGV: this replica, PX. Takes a lapsed or released lease, or its own.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] and string.sub(holder, 1, 9) ~= 'released:' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: leases; ARGV[1]: this replica, ARGV[2]: PX. Lets go of those still
# this replica's: any replica may claim them now, and this one (restarted)
# knows them for its own.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('SET', key, 'released:' .. ARGV[1], 'PX', ARGV[2]) end
end
return 0
"""

# How long a released lease says whose it was (a replica restarting within it
# knows the run for its own).
RELEASED_MS = 60_000

# Ended runs dropped at most per trim.
TRIM_BATCH = 1_000

# How long a blocking read of a run's events waits before it looks again (ms).
EVENTS_BLOCK_MS = 1_000
EVENTS_COUNT = 1_000


class RedisRunDirectory:
    def __init__(self, client: redis.asyncio.Redis, store: RedisRunStore, replica_id: str) -> None:
        self._redis = client
        self._store = store
        self.replica_id = replica_id
        self._renew = client.register_script(_RENEW)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    # -- ownership -------------------------------------------------------------------

    @reachable
    async def renew(self, run_ids: list[str], lease_ms: int) -> list[str]:
        """Renews this replica's leases on `run_ids`; returns those it lost."""
        if not run_ids:
            return []
        lost: list[int] = await self._renew(keys=[keys.lease(r) for r in run_ids], args=[self.replica_id, lease_ms])
        return [run_ids[i - 1] for i in lost]

    @reachable
    async def claimable(self) -> list[tuple[str, bool]]:
        """Active runs whose lease lapsed (their replica stopped renewing it),
        or is this replica's own (it restarted under the same id)."""
        members: Any = await self._redis.smembers(keys.ACTIVE)
        run_ids = sorted(m.decode() for m in members)
        if not run_ids:
            return []
        holders: Any = await self._redis.mget([keys.lease(r) for r in run_ids])
        mine, released = self.replica_id.encode(), b"released:"
        return [
            (r, h in (mine, released + mine))
            for r, h in zip(run_ids, holders, strict=True)
            if h is None or h == mine or h.startswith(released)
        ]

    @reachable
    async def claim(self, run_id: str, lease_ms: int) -> bool:
        return bool(await self._claim(keys=[keys.lease(run_id)], args=[self.replica_id, lease_ms]))

    @reachable
    async def release(self, run_ids: list[str]) -> None:
        if run_ids:
            await self._release(keys=[keys.lease(r) for r in run_ids], args=[self.replica_id, RELEASED_MS])

    @reachable
    async def trim(self, keep: int) -> int:
        """Drops the oldest ended runs (record, events and all) beyond the newest
        `keep` ended ones, whichever replica ran them; returns how many went."""
        async with self._redis.pipeline(transaction=False) as p:
            p.zcard(keys.RUNS)
            p.scard(keys.ACTIVE)
            total, active = await p.execute()
        excess = min(total - active - keep, TRIM_BATCH)
        if excess <= 0:
            return 0
        oldest: Any = await self._redis.zrange(keys.RUNS, 0, excess - 1)
        still: Any = await self._redis.smismember(keys.ACTIVE, oldest)
        gone = [m.decode() for m, a in zip(oldest, still, strict=True) if not a]
        if not gone:
            return 0
        async with self._redis.pipeline(transaction=True) as p:
            p.zrem(keys.RUNS, *gone)
            for run_id in gone:
                p.delete(
                    keys.run(run_id), keys.events(run_id), keys.request(run_id), keys.steps(run_id),
                    keys.admitted(run_id),
                )
            await p.execute()
        return len(gone)

    @reachable
    async def next_ordinal(self) -> int:
        return int(await self._redis.incr(keys.ORDINAL))

    @reachable
    async def owner(self, run_id: str) -> str:
        holder: Any = await self._redis.get(keys.lease(run_id))
        return holder.decode() if holder and not holder.startswith(b"released:") else ""

    @reachable
    async def load(self, run_id: str) -> Recovered:
        """One run as the store holds it (record, events, request, steps)."""
        got = Recovered()
        record = await self.record(run_id)
        if record is None:
            return got
        got.runs.append(record)
        r: Any = self._redis
        score = await r.zscore(keys.RUNS, run_id)
        if score is not None:
            got.ordinals[run_id] = int(score)
        for entry_id, fields in await r.xrange(keys.events(run_id)):
            seq = int(entry_id.decode().split("-", 1)[0])
            try:
                got.events.setdefault(run_id, []).append(events_pb2.RunEvent.FromString(fields[b"e"]))
            except (message.DecodeError, KeyError):
                got.skipped_events.setdefault(run_id, []).append(seq)
        request = await r.get(keys.request(run_id))
        if request is not None:
            got.requests[run_id] = request
        got.admitted[run_id] = {s.decode() for s in await r.smembers(keys.admitted(run_id))}
        for step, blob in (await r.hgetall(keys.steps(run_id))).items():
            try:
                got.steps.setdefault(run_id, {})[step.decode()] = types_pb2.AgentOutput.FromString(blob)
            except message.DecodeError:
                got.skipped_rows["steps"] = got.skipped_rows.get("steps", 0) + 1
        return got

    # -- reading any run -------------------------------------------------------------------

    @reachable
    async def record(self, run_id: str) -> runs_pb2.Run | None:
        """The run's record as last written, with last_seq from its event stream."""
        async with self._redis.pipeline(transaction=False) as p:
            p.get(keys.run(run_id))
            p.xrevrange(keys.events(run_id), count=1)
            blob, last = await p.execute()
        if blob is None:
            return None
        try:
            run = runs_pb2.Run.FromString(blob)
        except message.DecodeError:
            return None
        if last:
            run.last_seq = max(run.last_seq, int(last[0][0].decode().split("-", 1)[0]))
        return run

    @reachable
    async def thread_run(self, thread_id: str) -> str:
        """The run holding the thread now, if any."""
        holder: Any = await self._redis.get(keys.thread(thread_id))
        return holder.decode() if holder else ""

    @reachable
    async def newest(self, before: int, count: int) -> list[tuple[int, runs_pb2.Run]]:
        """Up to `count` runs with an ordinal below `before` (0: any), newest first."""
        top = f"({before}" if before else "+inf"
        found: Any = await self._redis.zrevrangebyscore(keys.RUNS, top, "-inf", start=0, num=count, withscores=True)
        if not found:
            return []
        blobs: Any = await self._redis.mget([keys.run(m.decode()) for m, _ in found])
        runs: list[tuple[int, runs_pb2.Run]] = []
        for (_, score), blob in zip(found, blobs, strict=True):
            if blob is not None:
                try:
                    runs.append((int(score), runs_pb2.Run.FromString(blob)))
                except message.DecodeError:
                    continue
        return runs

    async def events(
        self, run_id: str, after_seq: int, *, follow: bool
    ) -> AsyncIterator[list[events_pb2.RunEvent]]:
        """The run's events after `after_seq`, in batches; with `follow`, until
        its run_finished event (waiting for new ones), else up to its end now."""
        stream = keys.events(run_id)
        last = f"{after_seq}-0"
        r: Any = self._redis
        while True:
            if follow:
                reply = await r.xread({stream: last}, count=EVENTS_COUNT, block=EVENTS_BLOCK_MS)
                entries = reply[0][1] if reply else []
            else:
                entries = await r.xrange(stream, f"({last}", "+", count=EVENTS_COUNT)
            batch: list[events_pb2.RunEvent] = []
            for entry_id, fields in entries:
                last = entry_id.decode()
                try:
                    batch.append(events_pb2.RunEvent.FromString(fields[b"e"]))
                except (message.DecodeError, KeyError):
                    continue
            if batch:
                yield batch
                if batch[-1].WhichOneof("kind") == "run_finished":
                    return
            if not follow and len(entries) < EVENTS_COUNT:
                return
            if follow and not entries:
                record = await self.record(run_id)  # ended with nothing after `last`?
                if record is None or record.status in ENDED:
                    return
