"""Several sidecar addresses (issue 14): a Worker or Client given replicas' addresses
connects to the first that answers and, when its connection breaks, moves on to the
next, with one backoff across them all. Real sidecar processes, killed with SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from carsvc._proto.car.v1 import runs_pb2, types_pb2
from carsvc.client import Client, agent, single
from carsvc.security.channel import addresses
from carsvc.worker import AgentContext, Worker
from tests.procs import free_port, sidecar_process


def _dead_address() -> str:
    """A loopback address nothing listens on: connecting is refused."""
    return f"127.0.0.1:{free_port()}"


@contextlib.asynccontextmanager
async def _serving(worker: Worker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        await worker.stop()
        await asyncio.wait_for(task, 10)


async def _wait_connected_to(worker: Worker, address: str, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not (worker.connected.is_set() and worker.target == address):
            await asyncio.sleep(0.02)


async def test_addresses_are_one_a_comma_separated_list_or_a_list() -> None:
    assert addresses("h1:1") == ["h1:1"]
    assert addresses("h1:1,h2:2") == ["h1:1", "h2:2"]
    assert addresses(" h1:1 , h2:2, ") == ["h1:1", "h2:2"]
    assert addresses(["h1:1", "h2:2"]) == ["h1:1", "h2:2"]
    empty: str | list[str]
    for empty in ("", " , ", []):
        with pytest.raises(ValueError, match="no sidecar address"):
            addresses(empty)
    assert Worker("a:1, b:2").targets == ["a:1", "b:2"]
    client = Client(["a:1", "b:2"])
    try:
        assert client.targets == ["a:1", "b:2"]
    finally:
        await client.close()


async def test_a_worker_given_a_dead_address_first_connects_to_the_live_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead, port = _dead_address(), free_port()
    live = f"127.0.0.1:{port}"
    worker = Worker([dead, live], worker_id="two-addresses")

    @worker.agent("a")
    async def answer(ctx: AgentContext) -> str:
        return f"answered {ctx.task}"

    async with sidecar_process(port, tmp_path / "live"):
        with caplog.at_level(logging.INFO, logger="carsvc.worker"):
            async with _serving(worker):
                await _wait_connected_to(worker, live)
                async with Client(live) as client:
                    run = await client.run(single(agent("a"), "hello"))
    assert run.result.single.output.answer == "answered hello"
    lines = [r.getMessage() for r in caplog.records if r.name == "carsvc.worker"]
    assert lines[0].startswith("worker two-addresses: session ended: UNAVAILABLE ")
    assert lines[0].endswith(f"(at {dead}); reconnecting in 0.1 s (attempt 1)")
    assert lines[1] == (
        f"worker two-addresses: connected to {live} (session {worker.session_id}), serving a"
    )


async def test_a_worker_whose_sidecar_is_killed_reconnects_to_the_other_and_serves_there(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    worker = Worker(f"{a},{b}", worker_id="fails-over", reconnect_max_delay=0.5)
    sessions: list[tuple[str, str]] = []  # (address, session id) of each welcome
    worker.on_connect = lambda session: sessions.append((worker.target, session))

    @worker.agent("a")
    async def answer(ctx: AgentContext) -> str:
        return f"{ctx.task} served via {worker.target}"

    async with (
        sidecar_process(port_b, tmp_path / "b"),
        sidecar_process(port_a, tmp_path / "a") as sidecar_a,
        _serving(worker),
    ):
        await _wait_connected_to(worker, a)
        async with Client(a) as client:
            assert [w.worker_id for w in await client.list_workers()] == ["fails-over"]
        sidecar_a.send_signal(signal.SIGKILL)
        await sidecar_a.wait()
        await _wait_connected_to(worker, b)
        async with Client(b) as client:
            assert [w.worker_id for w in await client.list_workers()] == ["fails-over"]
            run = await client.run(single(agent("a"), "started on b"))
    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
    assert run.result.single.output.answer == f"started on b served via {b}"
    assert [address for address, _ in sessions] == [a, b]


async def test_one_backoff_across_all_addresses_capped_at_reconnect_max_delay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = [_dead_address(), _dead_address()]
    worker = Worker(dead, worker_id="nobody-home", reconnect_max_delay=0.4)
    worker.add_agent("a", lambda ctx: asyncio.sleep(0, "never"))
    with caplog.at_level(logging.INFO, logger="carsvc.worker"):
        async with _serving(worker):
            async with asyncio.timeout(20):
                while sum("; reconnecting in " in r.getMessage() for r in caplog.records) < 6:
                    await asyncio.sleep(0.05)
    line = r"worker nobody-home: session ended: .* \(at (\S+)\); reconnecting in (\S+) s \(attempt (\d+)\)"
    attempts = [re.fullmatch(line, r.getMessage()) for r in caplog.records if r.name == "carsvc.worker"]
    assert all(attempts), [r.getMessage() for r in caplog.records]
    found = [(m[1], float(m[2]), int(m[3])) for m in attempts if m]
    assert [n for _, _, n in found] == list(range(1, len(found) + 1))  # one line per attempt
    assert [d for _, d, _ in found[:4]] == [0.1, 0.2, 0.4, 0.4]  # doubling, capped
    assert [at for at, _, _ in found] == [dead[i % 2] for i in range(len(found))]  # in turn
    assert not [r for r in caplog.records if r.exc_info]  # no traceback


# -- clients ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _unavailable_replica() -> AsyncIterator[tuple[str, list[str]]]:
    """A RunService that answers but fails StartRun, GetRun and WatchRun with
    UNAVAILABLE, as a replica going away mid-call does; yields its address and the
    calls it got."""
    calls: list[str] = []

    async def fail(name: str, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        calls.append(name)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this replica is going away")

    async def start_run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await fail("StartRun", context)

    async def get_run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await fail("GetRun", context)

    async def watch_run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await fail("WatchRun", context)
        yield runs_pb2.WatchRunResponse()  # never reached: abort raises

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([
        grpc.method_handlers_generic_handler("car.v1.RunService", {
            "StartRun": grpc.unary_unary_rpc_method_handler(
                start_run, runs_pb2.StartRunRequest.FromString, runs_pb2.StartRunResponse.SerializeToString
            ),
            "GetRun": grpc.unary_unary_rpc_method_handler(
                get_run, runs_pb2.GetRunRequest.FromString, runs_pb2.GetRunResponse.SerializeToString
            ),
            "WatchRun": grpc.unary_stream_rpc_method_handler(
                watch_run, runs_pb2.WatchRunRequest.FromString, runs_pb2.WatchRunResponse.SerializeToString
            ),
        })
    ])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", calls
    finally:
        await server.stop(None)


async def test_a_client_retries_reads_on_the_next_address_but_not_writes(tmp_path: Path) -> None:
    port = free_port()
    live = f"127.0.0.1:{port}"
    worker = Worker(live)
    worker.add_agent("a", lambda ctx: asyncio.sleep(0, "done"))
    async with sidecar_process(port, tmp_path / "live"), _serving(worker), _unavailable_replica() as (bad, replica):
        await _wait_connected_to(worker, live)
        async with Client(live) as direct:
            finished = await direct.run(single(agent("a"), "x"))

        # A read fails on the first address and is answered by the next.
        async with Client([bad, live]) as client:
            assert (await client.get_run(finished.run_id)).status == types_pb2.RUN_STATUS_SUCCEEDED
            assert client.target == live
        # A watch resumes at the next address.
        async with Client([bad, live]) as client:
            events = [e async for e in client.watch(finished.run_id)]
            assert events[-1].WhichOneof("kind") == "run_finished"
            assert [e.seq for e in events] == sorted({e.seq for e in events})
        # A write that failed may have been acted on: it is raised, and the next call
        # goes to the next address.
        async with Client(f"{bad},{live}") as client:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await client.start_run(single(agent("a"), "y"))
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            handle = await client.start_run(single(agent("a"), "y"))
            assert (await client.wait(handle.run_id)).status == types_pb2.RUN_STATUS_SUCCEEDED
    assert replica == ["GetRun", "WatchRun", "StartRun"]


async def test_a_client_given_a_dead_address_first_runs_on_the_live_one(tmp_path: Path) -> None:
    port = free_port()
    live = f"127.0.0.1:{port}"
    worker = Worker(live)
    worker.add_agent("a", lambda ctx: asyncio.sleep(0, f"done {ctx.task}"))
    async with sidecar_process(port, tmp_path / "live"), _serving(worker):
        await _wait_connected_to(worker, live)
        async with Client([_dead_address(), live]) as client:
            handle = await client.start_run(single(agent("a"), "write"))  # a write: not retried, yet it lands
            run = await client.wait(handle.run_id)
            assert client.target == live
        async with Client([_dead_address(), live]) as client, client.run_stream() as stream:
            finished = await stream.run(single(agent("a"), "streamed"))
    assert run.result.single.output.answer == "done write"
    assert finished.result.single.output.answer == "done streamed"


async def test_a_watch_follows_a_run_taken_over_by_another_replica(tmp_path: Path) -> None:
    """Replica A dies mid-run; B takes the run over (here: B starts on A's data
    directory, as a replica of a shared store resumes a dead one's runs). The worker and
    the watch, both given [A, B], carry on at B: every event once, in order."""
    port_a, port_b = free_port(), free_port()
    a, b = f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"
    data = tmp_path / "shared"
    worker = Worker([a, b], worker_id="follows", reconnect_max_delay=0.5)
    release = asyncio.Event()

    @worker.agent("slow")
    async def slow(ctx: AgentContext) -> str:
        if worker.target == a:
            await release.wait()  # held until A is killed
        return f"finished at {worker.target}"

    async with contextlib.AsyncExitStack() as stack:
        sidecar_a = await stack.enter_async_context(sidecar_process(port_a, data))
        await stack.enter_async_context(_serving(worker))
        await _wait_connected_to(worker, a)
        client = await stack.enter_async_context(Client([a, b]))
        handle = await client.start_run(single(agent("slow"), "task"))
        events: list[Any] = []

        async def watch() -> None:
            async for event in client.watch(handle.run_id):
                events.append(event)

        watching = asyncio.create_task(watch())
        async with asyncio.timeout(20):
            while not any(e.WhichOneof("kind") == "agent_started" for e in events):
                await asyncio.sleep(0.02)
        sidecar_a.send_signal(signal.SIGKILL)
        await sidecar_a.wait()
        await stack.enter_async_context(sidecar_process(port_b, data))
        await asyncio.wait_for(watching, 30)
        assert client.target == b
        run = await client.get_run(handle.run_id)
    assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
    assert run.result.single.output.answer == f"finished at {b}"
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), seqs  # no gap filled twice, no duplicate
    assert events[-1].WhichOneof("kind") == "run_finished"
