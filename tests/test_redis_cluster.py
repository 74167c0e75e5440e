"""Several replicas on one real Redis behave as one sidecar: a worker connected
to one replica serves runs started on another, with its runtime calls answered
by the run's replica, and cancels reaching it there."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
import redis

from carsvc._proto.car.v1 import state_pb2, types_pb2
from carsvc._proto.car.v1.registry_pb2 import ListAgentsRequest
from carsvc.backends.redis import keys
from carsvc.client import Client, agent, map_reduce, resume, single, swarm
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[list[Sidecar]]:
    settings = dataclasses.replace(TEST_SETTINGS, backend=redis_url)
    started = [Sidecar(settings) for _ in range(2)]
    for s in started:
        await s.start()
    try:
        yield started
    finally:
        for s in started:
            await s.stop(grace=0.5)


async def until_peers_see(replicas: list[Sidecar], agent_name: str) -> None:
    """Waits until every replica without its own worker has a peer session serving `agent_name`."""
    async with asyncio.timeout(10):
        while not all(
            any(s.serves(agent_name) for s in r.dispatcher.sessions.values()) for r in replicas
        ):
            await asyncio.sleep(0.05)


async def test_a_worker_on_replica_a_serves_a_map_reduce_started_on_replica_b(replicas: list[Sidecar]) -> None:
    a, b = replicas
    pool = Workers(a.address)
    served: list[str] = []

    async def summarize(ctx: AgentContext) -> str:
        served.append(ctx.assignment_id)
        seen = await ctx.state.get("seen") or 0
        await ctx.state.set(f"done/{ctx.assignment_id}", 1)
        return f"summary {seen}"

    await pool.start({"summarizer": summarize, "combiner": lambda ctx: asyncio.sleep(0, "combined")})
    try:
        await until_peers_see(replicas, "summarizer")
        async with Client(b.address) as client:
            items = [f"item-{i:03d}" for i in range(40)]
            run = await client.run(map_reduce(agent("summarizer"), agent("combiner"), "sum", items))
            assert run.status == SUCCEEDED, run.termination_detail
            assert run.result.map_reduce.reduced_answer == "combined"
            assert len(served) == 40 and run.result.map_reduce.all_succeeded
            # Every state write of the relayed agents landed in the run's scope on replica b.
            assert [await client.get_state(run.state_scope, f"done/{i}") for i in served] == [1] * 40
        # Replica a ran nothing of its own: every assignment came from b.
        assert a.runs.runs == {}
    finally:
        await pool.stop_all()


async def test_a_cancel_on_the_runs_replica_reaches_the_worker_on_another(replicas: list[Sidecar]) -> None:
    a, b = replicas
    pool = Workers(a.address)
    started = asyncio.Event()
    cancelled: list[str] = []

    async def slow(ctx: AgentContext) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(ctx.cancel_reason)
            raise
        return "never"

    await pool.start({"slow": slow})
    try:
        await until_peers_see(replicas, "slow")
        async with Client(b.address) as client:
            handle = await client.start_run(single(agent("slow"), "wait"))
            async with asyncio.timeout(10):
                await started.wait()
            await client.cancel(handle.run_id, reason="not needed", wait=True)
            assert (await client.get_run(handle.run_id)).status == CANCELLED
        async with asyncio.timeout(10):
            while not cancelled:
                await asyncio.sleep(0.02)
        assert cancelled == ["not needed"]
        assert a.dispatcher.in_flight == 0
    finally:
        await pool.stop_all()


async def test_replicas_prefer_their_own_workers(replicas: list[Sidecar], redis_url: str) -> None:
    a, b = replicas
    where: list[str] = []
    pools = [Workers(a.address), Workers(b.address)]

    def handler(name: str):  # type: ignore[no-untyped-def]
        async def run(ctx: AgentContext) -> str:
            where.append(name)
            return "ok"

        return run

    await pools[0].start({"echo": handler("a")})
    await pools[1].start({"echo": handler("b")})
    try:
        await until_peers_see(replicas, "echo")
        async with Client(b.address) as client:
            for _ in range(5):
                assert (await client.run(single(agent("echo"), "x"))).status == SUCCEEDED
        assert where == ["b"] * 5
    finally:
        for pool in pools:
            await pool.stop_all()


async def test_state_and_registered_agents_written_on_one_replica_are_read_on_another(
    replicas: list[Sidecar],
) -> None:
    a, b = replicas
    async with Client(a.address) as on_a, Client(b.address) as on_b:
        await on_a.set_state("shared", "greeting", {"text": "hello"})
        await on_a.register_agent(types_pb2.AgentSpec(name="helper", system_prompt="be brief"))
        async with asyncio.timeout(5):
            while await on_b.get_state("shared", "greeting") != {"text": "hello"}:
                await asyncio.sleep(0.02)
            while not [s for s in (await on_b.registry.ListAgents(ListAgentsRequest())).agents if s.name == "helper"]:
                await asyncio.sleep(0.02)
        await on_b.state.Delete(state_pb2.DeleteRequest(scope="shared", key="greeting"))
        async with asyncio.timeout(5):
            while await on_a.get_state("shared", "greeting") is not None:
                await asyncio.sleep(0.02)


async def test_a_restarted_replica_reads_the_state_others_wrote(redis_url: str) -> None:
    settings = dataclasses.replace(TEST_SETTINGS, backend=redis_url)
    first = Sidecar(settings)
    await first.start()
    try:
        async with Client(first.address) as client:
            await client.set_state("kept", "n", 41)
    finally:
        await first.stop(grace=0.5)
    second = Sidecar(settings)
    await second.start()
    try:
        async with Client(second.address) as client:
            assert await client.get_state("kept", "n") == 41
    finally:
        await second.stop(grace=0.5)


async def test_a_decision_sent_to_any_replica_reaches_the_agent_waiting_on_another(replicas: list[Sidecar]) -> None:
    """The run is on b, its agent's worker on a, the client decides through a."""
    a, b = replicas
    pool = Workers(a.address)

    async def careful(ctx: AgentContext) -> str:
        decision = await ctx.suspend_tool_call("call-1", "shell", {"cmd": "deploy"})
        return f"deployed: {decision.result}" if decision.approved else "held back"

    await pool.start({"deployer": careful})
    try:
        await until_peers_see(replicas, "deployer")
        async with Client(b.address) as on_b, Client(a.address) as on_a:
            handle = await on_b.start_run(single(agent("deployer", tools=["shell"]), "ship it"), agent_id="alice")
            async with asyncio.timeout(10):
                while (await on_a.get_run(handle.run_id)).status != types_pb2.RUN_STATUS_WAITING:
                    await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # the owner check holds on the other replica
                await on_a.submit_decisions(resume("call-1", "ok"), run_id=handle.run_id, agent_id="mallory")
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            answer = await on_a.submit_decisions(resume("call-1", "ok"), run_id=handle.run_id, agent_id="alice")
            assert answer.applied_decision_ids
            run = await on_a.wait(handle.run_id)
        assert run.status == SUCCEEDED and run.result.single.output.answer == "deployed: ok"
    finally:
        await pool.stop_all()


async def test_agents_on_workers_at_different_replicas_exchange_mailbox_messages(replicas: list[Sidecar]) -> None:
    """A swarm on b whose two agents' workers sit on a and on b: each one's
    message reaches the other through the run's mailbox on b."""
    a, b = replicas
    pools = [Workers(a.address), Workers(b.address)]
    arrived: set[str] = set()
    both = asyncio.Event()

    async def talker(ctx: AgentContext) -> str:
        arrived.add(ctx.name)
        if len(arrived) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 10)
        await ctx.send("b" if ctx.name == "a" else "a", f"hello from {ctx.name}")
        message = await ctx.recv(timeout=10)
        return f"{ctx.name} heard {message.payload.string_value}"

    await pools[0].start({"a": talker})
    await pools[1].start({"b": talker})
    try:
        await until_peers_see(replicas, "a")
        async with Client(b.address) as client:
            run = await client.run(swarm([agent("a"), agent("b")], "talk"))
        assert run.status == SUCCEEDED, run.termination_detail
        answers = sorted(o.answer for o in run.result.swarm.outputs)
        assert answers == ["a heard hello from b", "b heard hello from a"]
    finally:
        for pool in pools:
            await pool.stop_all()


@pytest.mark.parametrize("retention", [3])
async def test_ended_runs_beyond_retention_leave_redis(redis_url: str, retention: int) -> None:
    """finished_run_retention holds across the cluster: the oldest ended runs go
    from Redis too, with their events, whichever replica ran them."""
    settings = dataclasses.replace(TEST_SETTINGS, backend=redis_url, finished_run_retention=retention)
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        pool = Workers(sidecar.address)
        await pool.start({"echo": lambda ctx: asyncio.sleep(0, "ok")})
        async with Client(sidecar.address) as client:
            ids = [(await client.run(single(agent("echo"), str(i)))).run_id for i in range(8)]
        await pool.stop_all()
        with redis.Redis.from_url(redis_url) as r:
            async with asyncio.timeout(10):
                while r.zcard(keys.RUNS) > retention:
                    await asyncio.sleep(0.05)
            kept = {m.decode() for m in r.zrange(keys.RUNS, 0, -1)}
            assert kept == set(ids[-retention:])
            assert not r.exists(keys.run(ids[0]), keys.events(ids[0]))
    finally:
        await sidecar.stop(grace=0.5)


async def test_a_thread_let_go_on_a_replica_is_taken_at_once_by_its_next_start(replicas: list[Sidecar]) -> None:
    """The release of a thread is queued with the run's end; a start on the same
    thread right after waits for that release, not for a timeout."""
    a, _ = replicas
    async with Client(a.address) as client:
        for i in range(20):
            handle = await client.start_run(single(agent("nobody"), str(i)), thread_id="busy", agent_id="me")
            await client.cancel(handle.run_id, agent_id="me", wait=True)
        assert (await client.get_run(thread_id="busy")).run_id == handle.run_id
