"""Replicas as real processes on one real Redis: a run moves when its replica
is SIGKILLed, one active run per thread and a shared budget hold however the
replicas race, and a run survives Redis restarting."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import redis

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, events_pb2, types_pb2
from carsvc.backends.redis import keys
from carsvc.client import Client, agent, map_reduce, single
from tests.procs import ScriptedWorker, free_port, sidecar_process
from tests.redis_server import RedisServer, redis_server

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
ENV = {"CARSVC_UNPLACED_TIMEOUT_S": "60"}


@contextlib.asynccontextmanager
async def replicas(url: str, count: int) -> AsyncIterator[list[tuple[str, asyncio.subprocess.Process]]]:
    """`count` sidecar processes on the Redis at `url`: (address, process) each."""
    async with contextlib.AsyncExitStack() as stack:
        started = []
        for _ in range(count):
            port = free_port()
            proc = await stack.enter_async_context(sidecar_process(port, url, ENV))
            started.append((f"127.0.0.1:{port}", proc))
        yield started


@pytest.fixture
async def workers() -> AsyncIterator[list[ScriptedWorker]]:
    started: list[ScriptedWorker] = []
    yield started
    for w in started:
        await w.stop()


def stored_steps(url: str, run_id: str) -> set[str]:
    with redis.Redis.from_url(url) as r:
        return {step.decode() for step in r.hkeys(keys.steps(run_id))}


async def collect(client: Client, run_id: str, into: list[events_pb2.RunEvent]) -> None:
    async for event in client.watch(run_id):
        into.append(event)


async def until(predicate: object, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_a_run_whose_replica_is_killed_moves_to_another_and_finishes(
    redis_url: str, workers: list[ScriptedWorker]
) -> None:
    """A worker on replica A, a map-reduce started on replica B, a watcher on
    replica C. B is SIGKILLed mid-run: another replica takes the run over and
    finishes it; every item is accepted once, none stored before the kill runs
    again, and C's watcher sees every event once, in order."""
    items = [f"item-{i}" for i in range(300)]
    async with replicas(redis_url, 3) as ((a, _), (b, b_proc), (c, _)):
        worker = await ScriptedWorker.spawn(
            a, "--agent", "mapper", "--agent", "reducer", "--sleep", "0.02", "--max-in-flight", "16",
            "--answer", "done",
        )
        workers.append(worker)
        async with Client(b) as on_b, Client(c) as on_c:
            handle = await on_b.start_run(map_reduce(agent("mapper"), agent("reducer"), "t", items, max_concurrent=16))
            seen: list[events_pb2.RunEvent] = []
            watcher = asyncio.create_task(collect(on_c, handle.run_id, seen))
            await until(lambda: sum(e.WhichOneof("kind") == "agent_finished" for e in seen) >= 100)
            b_proc.kill()
            await b_proc.wait()
            before = stored_steps(redis_url, handle.run_id)
            restarted_from = len(worker.started)
            await asyncio.wait_for(watcher, 60)
            run = await on_c.get_run(handle.run_id)
    assert run.status == SUCCEEDED, run.termination_detail
    assert len(before) >= 100
    outputs = run.result.map_reduce.map_outputs
    assert [o.answer.rsplit(" ", 1)[-1] for o in outputs] == items
    again = {name for _, name in worker.started[restarted_from:]}
    assert not {f"mapper_{s.split('/')[1]}" for s in before if s.startswith("map/")} & again
    finished = Counter(e.agent_finished.step for e in seen if e.WhichOneof("kind") == "agent_finished")
    assert all(finished[f"map/{i}"] == 1 for i in range(len(items))), finished.most_common(3)
    seqs = [e.seq for e in seen]
    assert seqs == sorted(set(seqs)) and seen[-1].WhichOneof("kind") == "run_finished"
    taken = [e.status_changed.reason for e in seen if e.WhichOneof("kind") == "status_changed"]
    assert any(r.startswith("resumed by replica ") and "taken over" in r for r in taken), taken


async def test_three_replicas_racing_20_starts_on_one_thread_start_exactly_one(redis_url: str) -> None:
    async with replicas(redis_url, 3) as started, contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(address)) for address, _ in started]

        async def start(i: int) -> str:
            try:
                handle = await clients[i % 3].start_run(single(agent("nobody"), "wait"), thread_id="shared")
            except grpc.aio.AioRpcError as err:
                return str(err.code().name)
            return handle.run_id

        outcomes = await asyncio.gather(*(start(i) for i in range(20)))
        winners = [o for o in outcomes if o != "FAILED_PRECONDITION"]
        assert len(winners) == 1, outcomes
        for client in clients:  # every replica names the same active run
            assert (await client.get_run(thread_id="shared")).run_id == winners[0]
        await clients[1].cancel(winners[0], wait=True)


async def test_a_shared_budget_admits_exactly_max_agents_across_three_replicas(
    redis_url: str, workers: list[ScriptedWorker]
) -> None:
    async with replicas(redis_url, 3) as started:
        for address, _ in started:
            workers.append(
                await ScriptedWorker.spawn(address, "--agent", "m", "--agent", "r", "--max-in-flight", "32")
            )
        async with grpc.aio.insecure_channel(started[0][0]) as channel:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            await stub.CreateBudget(
                budget_pb2.CreateBudgetRequest(budget_id="team", limits=types_pb2.BudgetLimits(max_agents=500))
            )
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(Client(address)) for address, _ in started]
                sizes = (667, 667, 666)
                handles = [
                    await client.start_run(
                        map_reduce(agent("m"), agent("r"), "t", [f"i{n}" for n in range(size)], max_concurrent=64),
                        budget_id="team",
                    )
                    for client, size in zip(clients, sizes, strict=True)
                ]
                runs = await asyncio.gather(*(clients[i].wait(h.run_id) for i, h in enumerate(handles)))
                events = [[e async for e in clients[0].watch(h.run_id)] for h in handles]
            budget = (await stub.GetBudget(budget_pb2.GetBudgetRequest(budget_id="team"))).budget
    # A run the budget refused every agent of fails (saying so); the others succeed.
    assert all(r.status == SUCCEEDED or "budget" in r.termination_detail for r in runs), runs
    started_agents = sum(e.WhichOneof("kind") == "agent_started" for run in events for e in run)
    assert budget.agents_started == 500 == started_agents
    assert budget.agents_denied == sum(sizes) + 3 - 500


async def test_a_run_finishes_when_redis_restarts_mid_run(tmp_path: Path, workers: list[ScriptedWorker]) -> None:
    with redis_server(tmp_path / "redis") as server:
        async with replicas(server.url, 2) as ((a, _), (b, _)):
            workers.append(
                await ScriptedWorker.spawn(a, "--agent", "mapper", "--agent", "reducer", "--sleep", "0.02",
                                           "--max-in-flight", "8")
            )
            items = [f"item-{i}" for i in range(150)]
            async with Client(b) as client:
                handle = await client.start_run(map_reduce(agent("mapper"), agent("reducer"), "t", items))
                finished = 0
                async for event in client.watch(handle.run_id):
                    finished += event.WhichOneof("kind") == "agent_finished"
                    if finished == 40:
                        break
                await asyncio.get_running_loop().run_in_executor(None, _restart, server)
                run = await asyncio.wait_for(client.wait(handle.run_id), 90)
    assert run.status == SUCCEEDED, run.termination_detail
    assert len(run.result.map_reduce.map_outputs) == len(items)


def _restart(server: RedisServer) -> None:
    server.stop()  # a clean stop: the AOF has everything
    server.start()


async def test_a_run_on_a_shared_budget_that_moves_counts_each_agent_once(
    redis_url: str, workers: list[ScriptedWorker]
) -> None:
    """The budget admits each step once, in the same script that records it for
    the run: the replica that takes the run over asks only for the steps not
    counted yet, even those that were running when the first replica died."""
    items = [f"item-{i}" for i in range(200)]
    async with replicas(redis_url, 3) as ((a, _), (b, b_proc), (c, _)):
        workers.append(
            await ScriptedWorker.spawn(
                a, "--agent", "mapper", "--agent", "reducer", "--sleep", "0.05", "--max-in-flight", "16"
            )
        )
        async with grpc.aio.insecure_channel(a) as channel, Client(b) as on_b, Client(c) as on_c:
            stub = budget_pb2_grpc.BudgetServiceStub(channel)
            limits = types_pb2.BudgetLimits(max_agents=10_000)
            await stub.CreateBudget(budget_pb2.CreateBudgetRequest(budget_id="pool", limits=limits))
            handle = await on_b.start_run(
                map_reduce(agent("mapper"), agent("reducer"), "t", items, max_concurrent=16), budget_id="pool"
            )
            finished = 0
            async for event in on_c.watch(handle.run_id):
                finished += event.WhichOneof("kind") == "agent_finished"
                if finished == 60:
                    break
            b_proc.kill()
            await b_proc.wait()
            run = await asyncio.wait_for(on_c.wait(handle.run_id), 60)
            budget = (await stub.GetBudget(budget_pb2.GetBudgetRequest(budget_id="pool"))).budget
    assert run.status == SUCCEEDED, run.termination_detail
    assert budget.agents_started == len(items) + 1 and budget.agents_denied == 0
