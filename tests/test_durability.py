"""--data-dir: a sidecar killed with SIGKILL and started again recovers state,
finished runs and their events; runs that were active end `sidecar_restarted`;
workers and watchers reconnect by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from carsvc._proto.car.v1 import events_pb2, types_pb2
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.domain.journal import Journal
from carsvc.server import Sidecar
from carsvc.values import to_value
from carsvc.worker import AgentContext, Worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def sidecar_process(port: int, data_dir: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), "--data-dir", str(data_dir),
        "--heartbeat-interval-ms", "300", cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        while b"listening on" not in (line := await asyncio.wait_for(proc.stderr.readline(), 30)):
            assert line, "the sidecar exited before listening"
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_sigkill_and_restart_recovers_runs_state_and_reconnects(tmp_path: Path) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    worker = Worker(address, worker_id="survivor", reconnect_max_delay=0.2)
    release = asyncio.Event()

    @worker.agent("quick")
    async def quick(ctx: AgentContext) -> str:
        await ctx.state.set("note", {"written_by": ctx.name})
        return "quick answer"

    @worker.agent("slow")
    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "slow answer"

    async with sidecar_process(port, tmp_path) as first:
        serving = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.connected.wait(), 10)
        first_session = worker.session_id
        async with Client(address) as client:
            done = await client.run(single(agent("quick"), "q"), thread_id="t1", agent_id="alice")
            await client.set_state("t1", "from_client", [1, 2, 3])
            active = await client.start_run(single(agent("slow"), "s"), thread_id="t2")
            watcher = asyncio.create_task(_collect(client, active.run_id))
            while (await client.get_run(active.run_id)).last_seq < 3:  # started, budget, agent_started
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # > journal_flush_ms: everything so far is committed
            first.send_signal(signal.SIGKILL)
            await first.wait()

            async with sidecar_process(port, tmp_path):
                events = await asyncio.wait_for(watcher, 30)  # the watcher came back by itself
                recovered = await client.get_run(done.run_id)
                assert recovered.status == types_pb2.RUN_STATUS_SUCCEEDED
                assert recovered.result.single.output.answer == "quick answer"
                assert recovered.agent_id == "alice"
                replay = [e.WhichOneof("kind") async for e in client.watch(done.run_id)]
                assert replay[0] == "run_started" and replay[-1] == "run_finished"
                assert await client.get_state("t1", "note") == {"written_by": "quick"}
                assert await client.get_state("t1", "from_client") == [1, 2, 3]
                interrupted = await client.get_run(active.run_id)
                assert interrupted.status == types_pb2.RUN_STATUS_FAILED
                assert interrupted.termination_reason == "sidecar_restarted"
                assert events[-1].run_finished.reason == "sidecar_restarted"
                assert [e.seq for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
                # The worker reconnected on its own and serves new runs.
                await asyncio.wait_for(_until(lambda: worker.session_id != first_session), 10)
                again = await client.run(single(agent("quick"), "q2"), thread_id="t3")
                assert again.result.single.output.answer == "quick answer"
        release.set()
        await worker.stop()
        await asyncio.wait_for(serving, 10)


async def _collect(client: Client, run_id: str) -> list[events_pb2.RunEvent]:
    return [e async for e in client.watch(run_id, reconnect_for=30)]


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.05)


async def test_journal_compacts_state_and_forgets_dropped_runs(tmp_path: Path) -> None:
    settings = Settings(port=0, data_dir=str(tmp_path), finished_run_retention=1, journal_flush_ms=10)
    sidecar = Sidecar(settings)
    await sidecar.start()
    store = sidecar.runs.scope("s")
    for i in range(5):
        store.set("k", to_value(i), "w")
    store.set("gone", to_value("x"), "w")
    store.delete("gone", "w")
    async with Client(sidecar.address) as client:
        for task in ("a", "b"):
            handle = await client.start_run(single(agent("nobody"), task))
            await client.cancel(handle.run_id, wait=True)
    await sidecar.stop(grace=0.1)
    recovered = Journal(tmp_path).load()
    assert {k: v.number_value for k, (v, _) in recovered.state["s"].items()} == {"k": 4}
    assert len(recovered.runs) == 1  # retention 1: the older run was forgotten
    assert recovered.runs[0].status == types_pb2.RUN_STATUS_CANCELLED
    assert recovered.events[recovered.runs[0].run_id][-1].WhichOneof("kind") == "run_finished"
    # Compaction left one row per live key.
    again = Journal(tmp_path).load()
    assert list(again.state["s"]) == ["k"]
