"""The sidecar as operators see it: health, reflection, runtime calls between
agents, graceful shutdown, the CLI, and stubs that match the contract."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.domain.budget import LocalBudget
from carsvc.server import SERVICE_NAMES, Sidecar
from carsvc.worker import AgentContext, Worker
from tests.conftest import TEST_SETTINGS, Workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED


async def test_health_and_reflection(client: Client) -> None:
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "car.v1.RunService", "car.v1.WorkerService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    names: set[str] = set()
    async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names |= {s.name for s in reply.list_services_response.service}
    assert set(SERVICE_NAMES) <= names
    assert "grpc.health.v1.Health" in names


async def test_agents_talk_through_the_mailbox_and_share_state(client: Client, workers: Workers) -> None:
    """Mapper 0 waits for a message from mapper 1; both write shared state."""

    async def mapper(ctx: AgentContext) -> str:
        if ctx.name == "m_0":
            message = await ctx.recv(timeout=5)
            await ctx.state.set("heard", message.from_agent)
            return f"got {message.payload.string_value}"
        for _ in range(100):  # m_0 registers when its assignment starts
            try:
                await ctx.send("m_0", "hello")
                break
            except Exception:
                await asyncio.sleep(0.01)
        await ctx.state.set("counter", 1)
        assert "counter" in await ctx.state.keys()
        assert await ctx.state.delete("counter") is True
        assert await ctx.state.delete("counter") is False
        return "sent"

    async def reducer(ctx: AgentContext) -> str:
        return str(await ctx.state.get("heard", "nobody"))

    await workers.start({"m": mapper, "r": reducer}, max_in_flight=4)
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", ["a", "b"], max_concurrent=2), thread_id="mail")
    assert [o.answer for o in run.result.map_reduce.map_outputs] == ["got hello", "sent"]
    assert run.result.map_reduce.reduced_answer == "m_1"
    assert await client.get_state("mail", "counter") is None


async def test_mailbox_recv_timeout_is_a_clear_error(client: Client, workers: Workers) -> None:
    async def lonely(ctx: AgentContext) -> str:
        try:
            await ctx.recv(timeout=0.1)
        except Exception as err:
            return str(err)
        return "unexpected"

    await workers.start({"a": lonely})
    run = await client.run(single(agent("a"), "t"))
    assert run.result.single.output.answer == "mailbox recv timeout for agent 'a'"


async def test_graceful_shutdown_drains_workers_and_finishes_runs(settings: Settings) -> None:
    sidecar = Sidecar(settings)
    await sidecar.start()
    worker = Worker(sidecar.address, worker_id="w", reconnect=False)
    started = asyncio.Event()

    @worker.agent("a")
    async def slowish(ctx: AgentContext) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished in time"

    serving = asyncio.create_task(worker.run())
    await worker.connected.wait()
    async with Client(sidecar.address) as client:
        handle = await client.start_run(single(agent("a"), "t"))
        events = asyncio.create_task(_collect(client, handle.run_id))
        await started.wait()
        health = health_pb2_grpc.HealthStub(client.channel)
        stopping = asyncio.create_task(sidecar.stop(grace=5))
        await asyncio.sleep(0.05)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING
        )
        collected = await events
        await stopping
    # The worker got Drain, finished its assignment, and left on its own.
    await asyncio.wait_for(serving, 5)
    assert collected[-1].run_finished.status == SUCCEEDED
    assert collected[-1].run_finished.result.single.output.answer == "finished in time"


async def _collect(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
    return [e async for e in client.watch(run_id)]


async def test_shutdown_cancels_what_outlives_the_grace_period(settings: Settings) -> None:
    sidecar = Sidecar(settings)
    await sidecar.start()
    worker = Worker(sidecar.address, reconnect=False)

    @worker.agent("a")
    async def forever(ctx: AgentContext) -> str:
        await asyncio.sleep(60)
        return "never"

    serving = asyncio.create_task(worker.run())
    await worker.connected.wait()
    async with Client(sidecar.address) as client:
        handle = await client.start_run(single(agent("a"), "t"))
        events = asyncio.create_task(_collect(client, handle.run_id))
        await asyncio.sleep(0.1)
        await sidecar.stop(grace=0.2)
        collected = await events
    assert collected[-1].run_finished.status == types_pb2.RUN_STATUS_CANCELLED
    assert collected[-1].run_finished.detail == "the sidecar is shutting down"
    await worker.stop()
    await asyncio.wait_for(serving, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_cli_serve_runs_a_worker_and_stops_on_sigterm() -> None:
    port = _free_port()
    env = {**os.environ, "CARSVC_HEARTBEAT_INTERVAL_MS": "1000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), cwd=ROOT, env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        while b"listening on" not in (line := await asyncio.wait_for(proc.stderr.readline(), 30)):
            assert line, "the sidecar exited before listening"
        address = f"127.0.0.1:{port}"
        worker = Worker(address, reconnect=False)

        @worker.agent("a")
        async def answer(ctx: AgentContext) -> str:
            return "served by a real process"

        serving = asyncio.create_task(worker.run())
        await worker.connected.wait()
        async with Client(address) as client:
            run = await client.run(single(agent("a"), "t"))
        assert run.result.single.output.answer == "served by a real process"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await asyncio.wait_for(serving, 5)  # drained, then the stream ended
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_rejects_bad_settings() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "serve"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "CARSVC_PORT": "not-a-port"}, timeout=60,
    )
    assert done.returncode == 2
    assert "CARSVC_PORT='not-a-port' is not a valid int" in done.stderr


def test_demo_command_exits_zero() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "carsvc", "demo", "--items", "6"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "6/6" in done.stdout
    assert "reduced: 6 files reviewed" in done.stdout


def test_settings_from_environment() -> None:
    s = Settings.from_env({"CARSVC_PORT": "6000", "CARSVC_MAX_ATTEMPTS": "5"}, host="0.0.0.0")
    assert (s.host, s.port, s.max_attempts) == ("0.0.0.0", 6000, 5)
    with pytest.raises(ValueError, match="max_attempts must be positive"):
        Settings.from_env({"CARSVC_MAX_ATTEMPTS": "0"})


def test_generated_stubs_match_the_contract() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(port=0)])
async def test_port_zero_binds_a_free_port(sidecar: Sidecar) -> None:
    assert sidecar.port > 0
    with pytest.raises(OSError, match=f"127.0.0.1:{sidecar.port} is already in use"):
        other = Sidecar(TEST_SETTINGS.replace(port=sidecar.port))
        await other.start()
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 5)


@pytest.mark.skipif(
    os.environ.get("CARSVC_NO_EXTENSIONS", "") not in ("", "0"), reason="the compiled twins are switched off"
)
async def test_a_running_sidecar_uses_the_compiled_hot_paths(client: Client, sidecar: Sidecar) -> None:
    handle = await client.start_run(single(agent("nobody"), "t"), thread_id="compiled")
    record = sidecar.runs.get(handle.run_id)
    assert type(record.infra.state).__module__ == "carsvc.domain._overlay"
    budget = record.infra.budget
    assert isinstance(budget, LocalBudget) and type(budget.counters).__module__ == "carsvc.domain._budget"
    await client.cancel(handle.run_id, wait=True)


async def test_methods_are_served_under_their_wire_names(client: Client) -> None:
    """Clients in other languages call /car.v1.<Service>/<Method>, the names in the
    .proto files; the generated Python code must register exactly those."""
    from carsvc._proto.car.v1 import runs_pb2

    get_run = client.channel.unary_unary(
        "/car.v1.RunService/GetRun",
        request_serializer=runs_pb2.GetRunRequest.SerializeToString,
        response_deserializer=runs_pb2.GetRunResponse.FromString,
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get_run(runs_pb2.GetRunRequest(run_id="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # served, not UNIMPLEMENTED
