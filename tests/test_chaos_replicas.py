"""Chaos with several replicas: three replica processes on one real Redis,
three worker processes (each given every replica's address), one map-reduce,
while a driver SIGKILLs and restarts replicas (the run's own among them) and
workers at random. The run must succeed with every item accepted exactly once
and its budget exact.

The default run is short (500 items, CI); `-m slow` runs 2,000 items with more
kills. CARSVC_CHAOS_ITEMS overrides the size."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import Counter

import pytest
import redis

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.backends.redis import keys
from carsvc.client import Client, agent, map_reduce
from tests.procs import ROOT, free_port, sidecar_process

ENV = {"CARSVC_MAX_ATTEMPTS": "100", "CARSVC_UNPLACED_TIMEOUT_S": "60", "CARSVC_EVENT_RETENTION": "100000"}


async def _spawn_worker(addresses: list[str], name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.programs.scripted_worker", ",".join(addresses), "--agent", "mapper",
        "--agent", "reducer", "--sleep", "0.1", "--worker-id", name, "--max-in-flight", "8", "--answer", "done",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )


async def _chaos(url: str, items: int, kill_every: float, seed: int) -> None:
    rng = random.Random(seed)
    print(f"replica chaos: seed {seed}, {items} items")
    ports = [free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    stacks = {p: contextlib.AsyncExitStack() for p in ports}
    replicas: dict[int, asyncio.subprocess.Process] = {}
    names = ["w0", "w1", "w2"]
    workers: dict[str, asyncio.subprocess.Process] = {}
    live: Counter[str] = Counter()
    replica_kills = owner_kills = worker_kills = 0

    async def start_replica(port: int) -> None:
        replicas[port] = await stacks[port].enter_async_context(sidecar_process(port, url, ENV))

    async def follow(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
        seen = []
        async for event in client.watch(run_id, reconnect_for=60):
            seen.append(event)
            if event.WhichOneof("kind") == "agent_finished":
                live[event.agent_finished.step] += 1
        return seen

    try:
        for port in ports:
            await start_replica(port)
        for i, name in enumerate(names):  # each starts at another replica
            workers[name] = await _spawn_worker(addresses[i:] + addresses[:i], name)
        async with Client(addresses) as client:
            handle = await client.start_run(
                map_reduce(agent("mapper"), agent("reducer"), "t", [f"item-{i}" for i in range(items)],
                           max_concurrent=24),
                budget=types_pb2.BudgetLimits(max_agents=items + 1),
            )
            watching = asyncio.create_task(follow(client, handle.run_id))
            pause = 0.3  # the first kill lands while the run is young
            with redis.Redis.from_url(url) as r:
                while not watching.done():
                    await asyncio.wait({watching}, timeout=pause)
                    pause = rng.uniform(0.5, 1.5) * kill_every
                    if watching.done():
                        break
                    if (replica_kills + worker_kills) % 2 == 0:  # a worker first, then a replica, and so on
                        victim = rng.choice(names)
                        workers[victim].kill()
                        await workers[victim].wait()
                        worker_kills += 1
                        workers[victim] = await _spawn_worker(rng.sample(addresses, 3), victim)
                        continue
                    # Mostly the replica running the run (its lease names it, HOST:PORT).
                    owner = (r.get(keys.lease(handle.run_id)) or b"").decode().rpartition(":")[2]
                    port = int(owner) if owner.isdigit() and rng.random() < 0.7 else rng.choice(ports)
                    owner_kills += str(port) == owner
                    replicas[port].kill()
                    await replicas[port].wait()
                    await stacks[port].aclose()
                    replica_kills += 1
                    await asyncio.sleep(rng.uniform(0, 1.0))  # its runs move while it is down
                    await start_replica(port)
            events = await watching
            run = await client.get_run(handle.run_id)
            replayed = [e async for e in client.watch(handle.run_id, reconnect_for=0)]
    finally:
        for proc in workers.values():
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        for stack in stacks.values():
            await stack.aclose()

    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run.termination_detail
    outputs = run.result.map_reduce.map_outputs
    assert [o.name for o in outputs] == [f"mapper_{i}" for i in range(items)]
    assert all(o.answer.startswith("done from w") and o.answer.endswith(f"item-{i}") for i, o in enumerate(outputs))
    expected = Counter({f"map/{i}": 1 for i in range(items)}) + Counter({"reduce": 1})
    # Every item accepted exactly once: as the live watch saw it, and as the store kept it.
    assert live == expected, (live - expected) + (expected - live)
    kept = Counter(e.agent_finished.step for e in replayed if e.WhichOneof("kind") == "agent_finished")
    assert kept == expected, (kept - expected) + (expected - kept)
    assert [e.seq for e in events] == [e.seq for e in replayed]
    assert run.budget.agents_started == items + 1 and run.budget.agents_denied == 0
    assert replica_kills >= 1 and worker_kills >= 1
    print(f"replica chaos: {replica_kills} replica kills ({owner_kills} of the run's), {worker_kills} worker kills")


async def test_replica_chaos_short(redis_url: str) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "500"))
    await _chaos(redis_url, items, kill_every=0.4, seed=random.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_replica_chaos_long(redis_url: str) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "2000"))
    await _chaos(redis_url, items, kill_every=0.6, seed=random.randrange(1 << 30))
