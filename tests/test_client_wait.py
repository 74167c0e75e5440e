"""Client.wait follows a run to its end however many events it had: it starts
from the newest event, not the first (which may no longer be retained)."""

from __future__ import annotations

import dataclasses

import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers


@pytest.mark.parametrize("settings", [dataclasses.replace(TEST_SETTINGS, event_retention=50)])
async def test_wait_returns_a_run_that_outgrew_event_retention(
    client: Client, workers: Workers, settings: Settings
) -> None:
    async def echo(ctx: AgentContext) -> str:
        return "ok"

    await workers.start({"m": echo, "r": echo}, max_in_flight=16)
    handle = await client.start_run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(200)]))
    run = await client.wait(handle.run_id)
    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
    assert run.last_seq > 3 * settings.event_retention
    assert (await client.wait(handle.run_id)).run_id == handle.run_id  # an ended run: at once
