"""Chaos: worker processes killed (SIGKILL) and restarted at random while they
serve a map-reduce; then the same with the sidecar itself (a process on a data
directory) SIGKILLed and restarted on the same port mid-run as well, its run
resuming from the journal. Nothing may be lost or accepted twice.

The default runs are short (300 items, CI); `-m slow` runs the long ones
(2,000 items, more kills). CARSVC_CHAOS_ITEMS overrides the size."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.server import Sidecar
from tests.conftest import TEST_SETTINGS
from tests.procs import free_port, sidecar_process

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


# The sidecar process of the runs with sidecar kills: as CHAOS_SETTINGS, a journal
# committed often so a kill finds most finished steps on disk, and every event of the
# run retained (the check reads them all again from seq 0).
SIDECAR_ENV = {
    "CARSVC_MAX_ATTEMPTS": "100", "CARSVC_JOURNAL_FLUSH_MS": "20", "CARSVC_UNPLACED_TIMEOUT_S": "60",
    "CARSVC_EVENT_RETENTION": "100000",
}


async def _chaos_with_sidecar_kills(
    data_dir: Path, items: int, kill_every: float, sidecar_kills: int, seed: int
) -> None:
    """Worker kills as in _chaos, and `sidecar_kills` SIGKILLs of the sidecar, each
    once the run has finished a random share (10% to 80%) of its items. One watch
    follows the run across every restart (Client.watch resumes after UNAVAILABLE)."""
    rng = random.Random(seed)
    print(f"chaos with sidecar kills: seed {seed}, {items} items, {sidecar_kills} sidecar kills")
    port = free_port()
    address = f"127.0.0.1:{port}"
    marks = sorted(rng.sample(range(items // 10, items * 8 // 10), sidecar_kills))
    live: Counter[str] = Counter()  # agent_finished per step, as the one watch saw them

    async def follow(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
        seen = []
        async for event in client.watch(run_id, reconnect_for=60):
            seen.append(event)
            if event.WhichOneof("kind") == "agent_finished":
                live[event.agent_finished.step] += 1
        return seen

    names = ["w0", "w1", "w2"]
    procs: dict[str, asyncio.subprocess.Process] = {}
    stack = contextlib.AsyncExitStack()
    worker_kills = killed_sidecars = 0
    loop = asyncio.get_running_loop()
    try:
        sidecar = await stack.enter_async_context(sidecar_process(port, data_dir, SIDECAR_ENV))
        procs = {n: await _spawn_worker(address, n) for n in names}
        async with Client(address) as client:
            while len(await client.list_workers()) < len(names):
                await asyncio.sleep(0.05)
            handle = await client.start_run(
                map_reduce(agent("mapper"), agent("reducer"), "t", [f"item-{i}" for i in range(items)],
                           max_concurrent=24),
                budget=types_pb2.BudgetLimits(max_agents=items + 1),
            )
            watching = asyncio.create_task(follow(client, handle.run_id))
            next_worker_kill = loop.time() + 0.2  # the first lands while every worker holds assignments
            while not watching.done():
                await asyncio.wait({watching}, timeout=0.02)
                if watching.done():
                    break
                if marks and sum(live[f"map/{i}"] > 0 for i in range(items)) >= marks[0]:
                    marks.pop(0)
                    sidecar.kill()
                    await sidecar.wait()
                    killed_sidecars += 1
                    await stack.aclose()
                    await asyncio.sleep(rng.uniform(0, 0.5))  # worker kills may land while it is down
                    sidecar = await stack.enter_async_context(sidecar_process(port, data_dir, SIDECAR_ENV))
                if loop.time() >= next_worker_kill:
                    victim = rng.choice(names)
                    procs[victim].kill()
                    await procs[victim].wait()
                    worker_kills += 1
                    procs[victim] = await _spawn_worker(address, victim)
                    next_worker_kill = loop.time() + rng.uniform(0.5, 1.5) * kill_every
            events = await watching
            run = await client.get_run(handle.run_id)
            replayed = [e async for e in client.watch(handle.run_id, reconnect_for=0)]
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await stack.aclose()

    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run.termination_detail
    outputs = run.result.map_reduce.map_outputs
    assert len(outputs) == items
    for i, output in enumerate(outputs):
        assert output.name == f"mapper_{i}"
        assert output.answer.startswith("done from w") and output.answer.endswith(f"item-{i}"), output
    expected = Counter({f"map/{i}": 1 for i in range(items)}) + Counter({"reduce": 1})
    # Every item accepted exactly once: as the live watch saw it, and as the journal kept it.
    assert live == expected, (live - expected) + (expected - live)
    kept = Counter(e.agent_finished.step for e in replayed if e.WhichOneof("kind") == "agent_finished")
    assert kept == expected, (kept - expected) + (expected - kept)
    assert [e.seq for e in events] == [e.seq for e in replayed]
    resumed = [e for e in replayed if e.WhichOneof("kind") == "status_changed" and "resumed" in e.status_changed.reason]
    # A kill is due at a share of the items seen done; the run may finish before the watch,
    # reconnecting after a restart, sees the last share: at least one kill always lands.
    assert 1 <= killed_sidecars <= sidecar_kills and len(resumed) == killed_sidecars
    assert worker_kills >= 1
    assert any(e.WhichOneof("kind") == "agent_redispatched" for e in replayed), "no worker kill hit an assignment"
    assert run.budget.agents_started == items + 1 and run.budget.agents_denied == 0
    print(f"chaos: {killed_sidecars} sidecar kills, {worker_kills} worker kills")


async def test_chaos_with_sidecar_kills_short(tmp_path: Path) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "300"))
    await _chaos_with_sidecar_kills(tmp_path, items, kill_every=0.4, sidecar_kills=2, seed=random.randrange(1 << 30))


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chaos_with_sidecar_kills_long(tmp_path: Path) -> None:
    items = int(os.environ.get("CARSVC_CHAOS_ITEMS", "2000"))
    await _chaos_with_sidecar_kills(tmp_path, items, kill_every=0.3, sidecar_kills=5, seed=random.randrange(1 << 30))
