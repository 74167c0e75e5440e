"""A run with more events than the sidecar retains: a watch from the start gets
what is retained, a watch resuming from a dropped seq is told so, and
Client.wait() works either way."""

from __future__ import annotations

import grpc
import pytest

from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

RETAINED = 20


@pytest.fixture
def settings() -> Settings:
    return TEST_SETTINGS.replace(event_retention=RETAINED)


async def echo(ctx: AgentContext) -> str:
    return ctx.task


async def test_watch_from_zero_replays_what_is_retained(client: Client, workers: Workers) -> None:
    await workers.start({"m": echo, "r": echo}, max_in_flight=8)
    items = [str(i) for i in range(30)]  # ~3 events per mapper: far more than RETAINED
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", items))
    assert len(run.result.map_reduce.map_outputs) == len(items)
    assert run.last_seq > 3 * RETAINED

    events = [e async for e in client.watch(run.run_id)]
    assert [e.seq for e in events] == list(range(run.last_seq - RETAINED + 1, run.last_seq + 1))
    assert events[-1].HasField("run_finished")

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in client.watch(run.run_id, after_seq=1):
            pass
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "after_seq" in (refused.value.details() or "")
    assert (await client.wait(run.run_id)).status == run.status
