"""Chaos: worker processes killed (SIGKILL) and restarted at random while they
serve a map-reduce. Nothing may be lost or accepted twice.

The default run is short (300 items, CI); `-m slow` runs the long one
(2,000 items, more kills). CARSVC_CHAOS_ITEMS overrides the size."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections import Counter

import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.server import Sidecar
from tests.conftest import TEST_SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAOS_SETTINGS = TEST_SETTINGS.replace(max_attempts=100)


async def _spawn_worker(address: str, name: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.programs.scripted_worker", address, "--agent", "mapper", "--agent",
        "reducer", "--sleep", "0.1", "--worker-id", name, "--max-in-flight", "8", "--answer", "done",
        cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )
    return proc


async def _chaos(sidecar: Sidecar, items: int, kill_every: float, seed: int) -> None:
    rng = random.Random(seed)
    print(f"chaos seed {seed}, {items} items")
    names = ["w0", "w1", "w2"]
    procs = {n: await _spawn_worker(sidecar.address, n) for n in names}
    kills = 0
    async with Client(sidecar.address) as client:
        while len(await client.list_workers()) < len(names):
            await asyncio.sleep(0.05)
        handle = await client.start_run(
            map_reduce(agent("mapper"), agent("reducer"), "t", [f"item-{i}" for i in range(items)],
                       max_concurrent=24),
            budget=types_pb2.BudgetLimits(max_agents=items + 1),
        )
        watching = asyncio.create_task(_events(client, handle.run_id))
        pause = 0.2  # the first kill lands while every worker holds assignments
        try:
            while not watching.done():
                await asyncio.sleep(pause)
                pause = rng.uniform(0.5, 1.5) * kill_every
                if watching.done():
                    break
                victim = rng.choice(names)
                procs[victim].kill()
                await procs[victim].wait()
                kills += 1
                procs[victim] = await _spawn_worker(sidecar.address, victim)
            events = await watching
        finally:
            for proc in procs.values():
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()
        run = await client.get_run(handle.run_id)

    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run.termination_detail
    outputs = run.result.map_reduce.map_outputs
    assert len(outputs) == items
    for i, output in enumerate(outputs):
        assert output.name == f"mapper_{i}"
        assert output.answer.startswith("done from w") and output.answer.endswith(f"item-{i}"), output
    finished = Counter(
        e.agent_finished.output.name for e in events if e.WhichOneof("kind") == "agent_finished"
    )
    assert all(finished[f"mapper_{i}"] == 1 for i in range(items)), "an item was accepted twice or never"
    assert finished["reducer"] == 1
    redispatched = [e for e in events if e.WhichOneof("kind") == "agent_redispatched"]
    assert len(redispatched) == sidecar.dispatcher.redispatched
    assert kills >= 1 and redispatched, "the chaos never hit a worker mid-assignment"
    assert sidecar.dispatcher.accepted == items + 1  # exactly one accepted output per agent
    assert run.budget.agents_started == items + 1 and run.budget.agents_denied == 0
    print(f"chaos: {kills} kills, {len(redispatched)} re-dispatches, {sidecar.dispatcher.superseded} late results")


async def _events(client: Client, run_id: str) -> list:  # type: ignore[type-arg]
    return [e async for e in client.watch(run_id)]


@pytest.mark.parametrize("settings", [CHAOS_SETTINGS])
async def test_chaos_short(sidecar: Sidecar, settings: Settings) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "300"))
    await _chaos(sidecar, items, kill_every=0.4, seed=random.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("settings", [CHAOS_SETTINGS])
async def test_chaos_long(sidecar: Sidecar, settings: Settings) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "2000"))
    await _chaos(sidecar, items, kill_every=0.3, seed=random.randrange(1 << 30))
