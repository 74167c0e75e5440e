"""Budget gates in map-reduce, and watching a run's events."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, runs_pb2, runs_pb2_grpc, types_pb2
from carsvc.client import Client, agent, map_reduce, single
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Result
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED


async def echo(ctx: AgentContext) -> str:
    return f"{ctx.name} ok"


async def test_max_agents_three_over_five_items(client: Client, workers: Workers) -> None:
    ran: list[str] = []

    async def mapper(ctx: AgentContext) -> str:
        ran.append(ctx.name)
        return f"{ctx.name} ok"

    await workers.start({"m": mapper, "r": echo}, max_in_flight=5)
    handle = await client.start_run(
        map_reduce(agent("m"), agent("r"), "t", ["a", "b", "c", "d", "e"]),
        budget=types_pb2.BudgetLimits(max_agents=3),
    )
    events = [e async for e in client.watch(handle.run_id)]
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED
    result = run.result.map_reduce
    assert sorted(ran) == ["m_0", "m_1", "m_2"]
    assert [o.name for o in result.map_outputs] == ["m_0", "m_1", "m_2", "m_3", "m_4"]
    for skipped in result.map_outputs[3:]:
        assert skipped.answer == ""
        assert skipped.error.startswith("coordination budget exhausted: ")
        assert "max_agents" in skipped.error
    # The reducer was refused too: the mapper summaries stand in for it.
    assert result.reduced_answer == "- [m_0] m_0 ok\n- [m_1] m_1 ok\n- [m_2] m_2 ok"
    assert result.reducer_output.error.startswith("coordination budget exhausted: ")
    skipped_events = [e.agent_skipped for e in events if e.WhichOneof("kind") == "agent_skipped"]
    assert [(s.role, s.index) for s in skipped_events] == [("mapper", 3), ("mapper", 4), ("reducer", 0)]
    assert run.budget.agents_started == 3
    assert run.budget.agents_denied == 3
    assert not run.budget.exhausted  # max_agents alone never sets exhausted
    assert events[-1].run_finished.budget.agents_started == 3


async def test_a_budget_that_refuses_everything_fails_the_run(client: Client, workers: Workers) -> None:
    await workers.start({"m": echo, "r": echo})
    run = await client.run(
        map_reduce(agent("m"), agent("r"), "t", ["a", "b"]), budget=types_pb2.BudgetLimits(max_agents=0)
    )
    assert run.status == types_pb2.RUN_STATUS_FAILED
    assert run.termination_reason == "budget_exhausted"
    assert [o.name for o in run.result.map_reduce.map_outputs] == ["m_0", "m_1"]


async def test_token_limit_stops_later_mappers(client: Client, workers: Workers) -> None:
    async def spender(ctx: AgentContext) -> Result:
        return Result(answer="ok", input_tokens=60, output_tokens=40)

    await workers.start({"m": spender, "r": echo})
    run = await client.run(
        map_reduce(agent("m"), agent("r"), "t", ["a", "b", "c", "d"], max_concurrent=1),
        budget=types_pb2.BudgetLimits(max_total_tokens=200),
    )
    outputs = run.result.map_reduce.map_outputs
    assert [o.answer for o in outputs] == ["ok", "ok", "", ""]
    assert "max_total_tokens" in outputs[2].error
    assert run.budget.total_tokens == 200 and run.budget.exhausted


async def test_shared_budget_is_drawn_down_by_two_runs(client: Client, workers: Workers) -> None:
    await workers.start({"w": echo})
    budgets = budget_pb2_grpc.BudgetServiceStub(client.channel)
    created = await budgets.CreateBudget(
        budget_pb2.CreateBudgetRequest(budget_id="team", limits=types_pb2.BudgetLimits(max_agents=1))
    )
    assert created.budget.budget_id == "team"
    first = await client.run(single(agent("w"), "1"), budget_id="team")
    second = await client.run(single(agent("w"), "2"), budget_id="team")
    assert first.status == SUCCEEDED
    assert second.status == types_pb2.RUN_STATUS_FAILED
    assert second.termination_reason == "budget_exhausted"
    snapshot = (await budgets.GetBudget(budget_pb2.GetBudgetRequest(budget_id="team"))).budget
    assert snapshot.agents_started == 1 and snapshot.agents_denied == 1


async def test_late_watcher_with_after_seq_sees_each_event_once_in_order(client: Client, workers: Workers) -> None:
    gate = asyncio.Event()

    async def mapper(ctx: AgentContext) -> str:
        await gate.wait()
        return "ok"

    await workers.start({"m": mapper, "r": echo}, max_in_flight=8)
    handle = await client.start_run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(8)]))

    async def watch_all() -> list[int]:
        return [e.seq async for e in client.watch(handle.run_id)]

    first_watcher = asyncio.create_task(watch_all())
    # Read a few events, then join late from the middle.
    seen = []
    async for event in client.watch(handle.run_id):
        seen.append(event.seq)
        if len(seen) == 3:
            break
    gate.set()
    late = [e.seq async for e in client.watch(handle.run_id, after_seq=seen[-1])]
    full = await first_watcher
    assert full == list(range(1, len(full) + 1))
    assert late == full[3:]
    assert seen == full[:3]


async def test_watch_unknown_run_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.runs.WatchRun(runs_pb2.WatchRunRequest(run_id="nope")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "run_id" in (err.value.details() or "")


async def test_stalled_watcher_is_dropped_without_slowing_the_run(
    client: Client, workers: Workers, sidecar: Sidecar
) -> None:
    sidecar.run_service.watcher_buffer = 16

    async def chatty(ctx: AgentContext) -> str:
        ctx.emit("blob", "x" * 2048)
        return "ok"

    await workers.start({"m": chatty, "r": echo}, max_in_flight=8)
    # No BDP probing: the stalled watcher's receive window stays at 64 KiB, far
    # less than the ~400 KiB of events this run produces.
    async with grpc.aio.insecure_channel(sidecar.address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        handle = await client.start_run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(200)]))
        stalled = runs_pb2_grpc.RunServiceStub(channel).WatchRun(runs_pb2.WatchRunRequest(run_id=handle.run_id))
        for _ in range(2000):  # the run is not held back by the stalled watcher
            run = await client.get_run(handle.run_id)
            if run.status == SUCCEEDED:
                break
            await asyncio.sleep(0.01)
        assert run.status == SUCCEEDED
        last_seq = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for batch in stalled:
                last_seq = batch.events[-1].seq
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"resume with after_seq={last_seq}" in (err.value.details() or "")
        # Resuming from there delivers the rest, ending with run_finished.
        rest = [e async for e in client.watch(handle.run_id, after_seq=last_seq)]
        assert rest[0].seq == last_seq + 1 and rest[-1].WhichOneof("kind") == "run_finished"
