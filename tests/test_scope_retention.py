"""State scopes are kept while someone can use them, and no longer: the scope of
a thread the sidecar named goes with the last retained run on it, an empty scope
goes when no run or watcher uses it, and a named scope with keys stays."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from carsvc._proto.car.v1 import state_pb2, types_pb2
from carsvc.client import Client, agent, single
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
RETAINED = 5


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    server = Sidecar(TEST_SETTINGS.replace(finished_run_retention=RETAINED, max_state_scopes=40))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def writer(ctx: AgentContext) -> str:
    await ctx.state.set("seen", ctx.task)
    return "wrote"


async def silent(ctx: AgentContext) -> str:
    return "nothing written"


async def test_generated_threads_leave_with_their_runs(sidecar: Sidecar, client: Client, workers: Workers) -> None:
    await workers.start({"writer": writer, "silent": silent})
    for i in range(20):
        run = await client.run(single(agent("writer"), f"t{i}"))
        assert run.status == SUCCEEDED
    # Only the scopes of the retained runs are left (each wrote a key).
    assert len(sidecar.runs.scopes) == RETAINED
    kept = {r.thread_id for r in await client.list_runs()}
    assert set(sidecar.runs.scopes) == kept
    assert await client.get_state(sorted(kept)[0], "seen") is not None
    # Runs that write nothing leave no scope behind at all.
    for i in range(10):
        await client.run(single(agent("silent"), f"q{i}"))
    assert set(sidecar.runs.scopes) <= kept


async def test_named_scopes_with_keys_stay_and_empty_ones_go(
    sidecar: Sidecar, client: Client, workers: Workers
) -> None:
    await workers.start({"writer": writer, "silent": silent})
    await client.run(single(agent("writer"), "keep me"), thread_id="conversation-1")
    await client.run(single(agent("silent"), "t"), thread_id="conversation-2")
    for i in range(2 * RETAINED):  # push both out of run retention
        await client.run(single(agent("silent"), f"t{i}"))
    assert "conversation-1" in sidecar.runs.scopes
    assert await client.get_state("conversation-1", "seen") == "keep me"
    assert "conversation-2" not in sidecar.runs.scopes


async def test_a_watched_scope_is_kept_even_empty(sidecar: Sidecar, client: Client, workers: Workers) -> None:
    await workers.start({"silent": silent})
    watch = client.state.Watch(state_pb2.WatchRequest(scope="watched"))
    reading = asyncio.ensure_future(watch.read())
    await asyncio.sleep(0.2)
    await client.run(single(agent("silent"), "t"), thread_id="watched")  # uses and releases the scope
    assert "watched" in sidecar.runs.scopes
    await client.set_state("watched", "k", 1)
    response = await asyncio.wait_for(reading, 5)
    assert [t.key for t in response.transitions] == ["k"]
    watch.cancel()
    await client.state.Delete(state_pb2.DeleteRequest(scope="watched", key="k"))
    assert "watched" in sidecar.runs.scopes  # emptied, but only freed when unused:
    await client.run(single(agent("silent"), "t"), thread_id="watched")
    assert "watched" not in sidecar.runs.scopes


async def test_scopes_are_bounded_in_number(sidecar: Sidecar, client: Client) -> None:
    for i in range(40):
        await client.set_state(f"scope-{i}", "k", i)
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await client.set_state("one-more", "k", 1)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_state_scopes" in (full.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.start_run(single(agent("silent"), "t"), thread_id="new-thread")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (refused.value.details() or "").startswith("state_scope: ")
    await client.set_state("scope-0", "k", 2)  # existing scopes still take writes
