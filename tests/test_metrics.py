"""Prometheus metrics over HTTP, as an operator scrapes them."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(metrics_port=_free_port())])
async def test_metrics_count_runs_agents_workers_and_denials(
    settings: Settings, sidecar: Sidecar, client: Client, workers: Workers
) -> None:
    async def echo(ctx: AgentContext) -> str:
        return "ok"

    await workers.start({"m": echo, "r": echo}, max_in_flight=2)
    await client.run(
        map_reduce(agent("m"), agent("r"), "t", ["a", "b", "c"]), budget=types_pb2.BudgetLimits(max_agents=2)
    )
    await client.run(single(agent("nobody"), "t"), timeout=0.2)
    values = await asyncio.to_thread(_scrape, sidecar.metrics_port)
    assert values['carsvc_runs_finished_total{status="succeeded"}'] == 1
    assert values['carsvc_runs_finished_total{status="failed"}'] == 1
    assert values["carsvc_agents_dispatched_total"] == 2
    assert values["carsvc_results_accepted_total"] == 2
    assert values["carsvc_budget_denials_total"] == 2  # m_2 and the reducer
    assert values["carsvc_workers_connected"] == 1
    assert values["carsvc_assignments_in_flight"] == 0
    # Client.run() starts on a Session stream (not timed) and reads the run back with GetRun.
    assert values['carsvc_rpc_seconds_count{code="OK",method="/car.v1.RunService/GetRun"}'] == 2
    assert 'carsvc_rpc_seconds_count{code="OK",method="/car.v1.RunService/StartRun"}' not in values


def test_metrics_port_is_validated() -> None:
    with pytest.raises(ValueError, match="metrics_port must be within"):
        Settings(metrics_port=70000).validate()
