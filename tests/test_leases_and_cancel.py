"""Leases, re-dispatch, flow control and cancellation over real streams and
real worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from carsvc._proto.car.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from carsvc.client import Client, agent, map_reduce, single
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.asynccontextmanager
async def worker_process(address: str, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A scripted worker in its own process; yields once it has connected."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.programs.scripted_worker", address, *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"ready", line
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def echo(ctx: AgentContext) -> str:
    return f"{ctx.name}: {ctx.task}"


async def test_killed_worker_process_work_is_redispatched(client: Client, workers: Workers, sidecar: Sidecar) -> None:
    items = [f"item-{i}" for i in range(4)]
    async with worker_process(
        sidecar.address, "--agent", "mapper", "--sleep", "30", "--worker-id", "doomed", "--max-in-flight", "4"
    ) as doomed:
        handle = await client.start_run(map_reduce(agent("mapper"), agent("reducer"), "t", items, max_concurrent=4))
        assert doomed.stdout is not None
        for _ in items:  # the doomed worker holds all four assignments
            line = await asyncio.wait_for(doomed.stdout.readline(), 10)
            assert line.startswith(b"started ")
        # The survivor connects only now, so nothing could have gone to it before.
        await workers.start({"mapper": echo, "reducer": echo}, worker_id="survivor", max_in_flight=4)
        doomed.send_signal(signal.SIGKILL)
        events = [e async for e in client.watch(handle.run_id)]
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED
    outputs = run.result.map_reduce.map_outputs
    assert [o.name for o in outputs] == [f"mapper_{i}" for i in range(4)]
    assert all(o.answer == f"mapper_{i}: t\n\nProcess this item: item-{i}" for i, o in enumerate(outputs))
    redispatched = [e.agent_redispatched for e in events if e.WhichOneof("kind") == "agent_redispatched"]
    assert sorted(r.agent for r in redispatched) == [f"mapper_{i}" for i in range(4)]
    assert all(r.attempt == 2 and r.previous_worker_id == "doomed" for r in redispatched)
    finished = [e.agent_finished for e in events if e.WhichOneof("kind") == "agent_finished"]
    per_agent = Counter(f.output.name for f in finished)
    assert all(per_agent[f"mapper_{i}"] == 1 for i in range(4)), per_agent
    assert all(f.worker_id == "survivor" for f in finished)
    assert sidecar.dispatcher.redispatched == 4


async def test_worker_that_stops_heartbeating_loses_its_lease(
    client: Client, workers: Workers, sidecar: Sidecar
) -> None:
    """A stream that stays open but sends nothing: after 3 heartbeat intervals
    (0.6 s here) its assignment goes to a live worker, and its late result is ignored."""
    stub = worker_pb2_grpc.WorkerServiceStub(client.channel)
    outgoing: asyncio.Queue[worker_pb2.ConnectRequest] = asyncio.Queue()

    async def frames() -> AsyncIterator[worker_pb2.ConnectRequest]:
        while True:
            yield await outgoing.get()

    await outgoing.put(worker_pb2.ConnectRequest(hello=worker_pb2.WorkerHello(worker_id="silent", agents=["a"])))
    stream = stub.Connect(frames())
    welcome = await stream.read()
    assert welcome.welcome.session_id
    handle = await client.start_run(single(agent("a"), "task"))
    frame = await stream.read()
    (assignment,) = frame.assignments
    await workers.start({"a": echo}, worker_id="live")
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED
    assert run.result.single.output.answer == "a: task"
    with pytest.raises(Exception) as ended:  # the silent session was closed by the sidecar
        while True:
            if await stream.read() is None:  # grpc.aio.EOF
                break
    assert "heartbeat lapsed" in str(ended.value)
    # A late result for the superseded attempt changes nothing.
    accepted = sidecar.dispatcher.accepted
    assert sidecar.dispatcher.complete(
        next(iter(sidecar.dispatcher.sessions.values())), assignment.assignment_id, 1,
        types_pb2.AgentOutput(answer="late"),
    ).value == "superseded"
    assert sidecar.dispatcher.accepted == accepted
    stream.cancel()


async def test_max_in_flight_is_never_exceeded_and_load_is_spread(client: Client, workers: Workers) -> None:
    load: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    served: Counter[str] = Counter()

    def handler(worker_id: str):  # type: ignore[no-untyped-def]
        async def run(ctx: AgentContext) -> str:
            load[worker_id] += 1
            peak[worker_id] = max(peak[worker_id], load[worker_id])
            served[worker_id] += 1
            await asyncio.sleep(0.01)
            load[worker_id] -= 1
            return "ok"

        return run

    await workers.start({"m": handler("w1"), "r": echo}, worker_id="w1", max_in_flight=2)
    await workers.start({"m": handler("w2")}, worker_id="w2", max_in_flight=3)
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(40)], max_concurrent=20))
    assert run.status == SUCCEEDED
    assert peak["w1"] <= 2 and peak["w2"] <= 3
    assert peak["w1"] == 2 and peak["w2"] == 3  # both were saturated: the queue waited for slots
    assert served["w1"] + served["w2"] == 40
    assert served["w1"] >= 8 and served["w2"] >= 8


async def test_cancel_reaches_every_in_flight_mapper(client: Client, workers: Workers) -> None:
    """Seed: dropping_map_reduce_run_aborts_mapper_tasks, across the process boundary."""
    started: set[str] = set()
    cancelled: set[str] = set()
    both_started = asyncio.Event()

    async def mapper(ctx: AgentContext) -> str:
        started.add(ctx.name)
        if len(started) == 2:
            both_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.add(ctx.name)
            raise
        return "never"

    await workers.start({"worker": mapper, "reducer": echo}, max_in_flight=2)
    handle = await client.start_run(
        map_reduce(agent("worker"), agent("reducer"), "parallel goal", ["one", "two", "three"], max_concurrent=2)
    )
    await asyncio.wait_for(both_started.wait(), 10)
    response = await client.cancel(handle.run_id, reason="user changed their mind", wait=True)
    assert not response.already_finished
    run = await client.get_run(handle.run_id)
    assert run.status == CANCELLED
    assert run.termination_detail == "user changed their mind"
    for _ in range(100):
        if cancelled == {"worker_0", "worker_1"}:
            break
        await asyncio.sleep(0.02)
    assert cancelled == {"worker_0", "worker_1"}
    assert started == {"worker_0", "worker_1"}  # the third item never started
    again = await client.cancel(handle.run_id)
    assert again.already_finished


async def test_agent_timeout_from_spec_metadata(client: Client, workers: Workers) -> None:
    cancelled = asyncio.Event()

    async def slow(ctx: AgentContext) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "late"

    await workers.start({"slow": slow})
    run = await client.run(single(agent("slow", metadata={"timeout_secs": 0.2}), "t"))
    output = run.result.single.output
    assert output.error == "timed out after 0.2s"
    assert output.outcome.status == types_pb2.OUTCOME_STATUS_TIMEOUT
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_agent_with_no_worker_fails_after_the_unplaced_timeout(client: Client, sidecar: Sidecar) -> None:
    sidecar.dispatcher.unplaced_timeout = 0.2
    run = await client.run(single(agent("nobody-serves-this"), "t"))
    assert run.status == types_pb2.RUN_STATUS_FAILED
    assert run.result.single.output.error == "no connected worker serves agent 'nobody-serves-this' (waited 0.2s)"


async def test_glob_served_agents(client: Client, workers: Workers) -> None:
    await workers.start({"map*": echo, "reduce*": echo}, max_in_flight=4)
    run = await client.run(map_reduce(agent("mapper"), agent("reducer-v2"), "t", ["x"]))
    assert run.status == SUCCEEDED
    assert run.result.map_reduce.map_outputs[0].answer == "mapper_0: t\n\nProcess this item: x"
