"""An agent no connected worker serves: the run's events say so at once (a
progress event naming the agents that are served and how long it waits), the
run really waits for such a worker, and fails with the reason after
unplaced_timeout_s (0: it waits as long as it takes)."""

from __future__ import annotations

import asyncio

from carsvc import types
from carsvc.client import Client, agent, map_reduce, single
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import Workers

FAILS_IN_5S = "the agent fails if none that serves it connects within 5s (unplaced_timeout_s)"


async def _first_progress(client: Client, run_id: str) -> types.RunEvent:
    async with asyncio.timeout(5):
        async for event in client.watch(run_id):
            if event.WhichOneof("kind") == "progress":
                found: types.RunEvent = event
                return found
    raise AssertionError("the run finished without a progress event")


async def _answer(ctx: AgentContext) -> str:
    return f"{ctx.name}: done"


async def test_the_run_says_at_once_that_no_worker_is_connected_then_runs_when_one_is(
    client: Client, workers: Workers
) -> None:
    handle = await client.start_run(single(agent("writer"), "a haiku"))
    event = await _first_progress(client, handle.run_id)
    assert event.progress.agent == "writer" and not event.progress.HasField("fraction")
    no_worker = "no connected worker serves agent 'writer' (no worker is connected)"
    assert event.progress.message == f"{no_worker}; {FAILS_IN_5S}"
    assert (await client.get_run(handle.run_id)).status == types.RUN_STATUS_RUNNING
    await workers.start({"writer": _answer})
    run = await client.wait(handle.run_id)
    assert run.status == types.RUN_STATUS_SUCCEEDED, run.termination_detail
    assert run.result.single.output.answer == "writer: done"


async def test_the_notice_names_the_agents_that_are_served(client: Client, workers: Workers) -> None:
    await workers.start({"summarizer": _answer, "deployer": _answer, "map*": _answer})
    handle = await client.start_run(map_reduce(agent("summarizer"), agent("combiner"), "Summarize", ["a.py"]))
    event = await _first_progress(client, handle.run_id)
    assert (event.progress.agent, event.progress.message) == (
        "combiner",
        "no connected worker serves agent 'combiner' (connected workers serve 'deployer', 'map*', 'summarizer'); "
        + FAILS_IN_5S,
    )
    await client.cancel(handle.run_id, wait=True)


async def test_past_the_timeout_the_run_fails_with_the_reason(client: Client, sidecar: Sidecar) -> None:
    sidecar.dispatcher.unplaced_timeout = 0.2
    run = await client.run(single(agent("writer"), "a haiku"))
    assert run.status == types.RUN_STATUS_FAILED
    assert "no connected worker serves agent 'writer' (waited 0.2s)" in run.termination_detail
    assert run.result.single.output.error == "no connected worker serves agent 'writer' (waited 0.2s)"


async def test_with_no_timeout_the_notice_says_it_waits(client: Client, sidecar: Sidecar, workers: Workers) -> None:
    sidecar.dispatcher.unplaced_timeout = 0
    handle = await client.start_run(single(agent("writer"), "t"))
    event = await _first_progress(client, handle.run_id)
    assert event.progress.message == (
        "no connected worker serves agent 'writer' (no worker is connected); "
        "the agent waits until one that serves it connects"
    )
    await workers.start({"w*": _answer})
    assert (await client.wait(handle.run_id)).status == types.RUN_STATUS_SUCCEEDED


async def test_many_served_agents_are_counted_not_listed(client: Client, workers: Workers) -> None:
    await workers.start({f"agent-{i:02}": _answer for i in range(14)})
    handle = await client.start_run(single(agent("writer"), "t"))
    event = await _first_progress(client, handle.run_id)
    listed = ", ".join(f"'agent-{i:02}'" for i in range(10))
    assert f"(connected workers serve {listed} and 4 more)" in event.progress.message
    await client.cancel(handle.run_id, wait=True)
