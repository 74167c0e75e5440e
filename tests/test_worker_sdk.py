"""The Python worker SDK's connection lifecycle against real sidecars: a refused
credential is final (run() raises WorkerRefused at once, no retry), other failures
are retried, and a drain is followed by a reconnect unless stop_on_drain (or
reconnect=False) says otherwise — the same rules as the Go, TypeScript and Rust
helpers (docs/worker-protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from carsvc._proto.car.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Worker, WorkerRefused
from tests.conftest import TEST_SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_TOKEN = "w-3f9a61c0b7d24e85a1c6"
CLIENT_TOKEN = "c-0d7e42b9a15f3c68e2b4"
AUTH_SETTINGS = TEST_SETTINGS.replace(worker_tokens=WORKER_TOKEN, client_tokens=CLIENT_TOKEN)
CONNECT = "/car.v1.WorkerService/Connect"


async def _echo(ctx: AgentContext) -> str:
    return f"echo {ctx.task}"


# -- credentials --------------------------------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    return AUTH_SETTINGS


def _connect_refusals(caplog: pytest.LogCaptureFixture) -> int:
    """How many Connect attempts the sidecar refused (it logs every refusal)."""
    return sum(
        1 for r in caplog.records if r.name == "carsvc.security" and r.getMessage().startswith(f"refused {CONNECT} ")
    )


@pytest.mark.parametrize(
    ("token", "details"),
    [
        (None, f"{CONNECT} needs 'authorization: Bearer <token>' metadata with a worker token"),
        ("w-3f9a61c0b7d24e85a1c7", f"the bearer token is not a worker token of this sidecar ({CONNECT} needs one)"),
        (CLIENT_TOKEN, f"the bearer token is not a worker token of this sidecar ({CONNECT} needs one)"),
    ],
    ids=["missing", "wrong", "client-token"],
)
@pytest.mark.parametrize("reconnect", [True, False], ids=["reconnect", "no-reconnect"])
async def test_a_refused_token_raises_at_once_without_retrying(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture, token: str | None, details: str, reconnect: bool
) -> None:
    worker = Worker(sidecar.address, token=token, reconnect=reconnect)  # backoff cap: the default 5 s
    worker.add_agent("a", _echo)
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(WorkerRefused) as caught:
        await asyncio.wait_for(worker.run(), 10)
    took = time.monotonic() - started
    assert took < 2.0, f"run() took {took:.1f}s to give up on a refused token"
    assert _connect_refusals(caplog) == 1, "the worker retried a refused credential"
    refused = caught.value
    assert refused.code == grpc.StatusCode.UNAUTHENTICATED
    assert refused.details == details
    assert str(refused) == (
        f"the sidecar at {sidecar.address} refused the worker's credentials (UNAUTHENTICATED: {details}); "
        "check the worker token"
    )
    assert isinstance(refused.__cause__, grpc.aio.AioRpcError)
    errors = [r for r in caplog.records if r.name == "carsvc.worker" and r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"worker {worker.worker_id}: {refused}; not reconnecting"]
    assert not worker.connected.is_set()
    async with Client(sidecar.address, token=CLIENT_TOKEN) as client:
        assert await client.list_workers() == []


async def test_the_right_token_serves_runs(sidecar: Sidecar) -> None:
    worker = Worker(sidecar.address, worker_id="trusted", token=WORKER_TOKEN)
    worker.add_agent("a", _echo)
    serving = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), 10)
        async with Client(sidecar.address, token=CLIENT_TOKEN) as client:
            run = await client.run(single(agent("a"), "hello"))
            assert [w.worker_id for w in await client.list_workers()] == ["trusted"]
        assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
        assert run.result.single.output.answer == "echo hello"
    finally:
        await worker.stop()
        await asyncio.wait_for(serving, 5)


class _Refusing(worker_pb2_grpc.WorkerServiceServicer):
    """A WorkerService that ends every Connect with one status, after reading the hello."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.calls = 0

    async def Connect(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.ConnectResponse]:
        self.calls += 1
        async for _ in request_iterator:
            break
        await context.abort(self.code, f"refused by a test server ({self.code.name})")
        yield worker_pb2.ConnectResponse()  # never reached: abort raises


@contextlib.asynccontextmanager
async def _refusing_server(code: grpc.StatusCode) -> AsyncIterator[tuple[str, _Refusing]]:
    server = grpc.aio.server()
    servicer = _Refusing(code)
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


async def test_permission_denied_is_final_too(caplog: pytest.LogCaptureFixture) -> None:
    """The sidecar answers UNAUTHENTICATED for every bad token, but a proxy in front of it (or
    a later sidecar) may answer PERMISSION_DENIED: no retry can fix either."""
    async with _refusing_server(grpc.StatusCode.PERMISSION_DENIED) as (address, servicer):
        worker = Worker(address, token=WORKER_TOKEN)
        worker.add_agent("a", _echo)
        with caplog.at_level(logging.INFO), pytest.raises(WorkerRefused) as caught:
            await asyncio.wait_for(worker.run(), 10)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details == "refused by a test server (PERMISSION_DENIED)"
    assert "refused the worker's credentials (PERMISSION_DENIED: refused by a test server" in str(caught.value)
    assert servicer.calls == 1
    assert sum(1 for r in caplog.records if r.name == "carsvc.worker" and r.levelno >= logging.ERROR) == 1


async def test_other_failures_are_still_retried(caplog: pytest.LogCaptureFixture) -> None:
    async with _refusing_server(grpc.StatusCode.UNAVAILABLE) as (address, servicer):
        worker = Worker(address, reconnect_max_delay=0.1)
        worker.add_agent("a", _echo)
        with caplog.at_level(logging.WARNING):
            serving = asyncio.create_task(worker.run())
            deadline = time.monotonic() + 10
            while servicer.calls < 3:
                assert not serving.done(), serving
                assert time.monotonic() < deadline, f"only {servicer.calls} attempts"
                await asyncio.sleep(0.02)
            await worker.stop()
            await asyncio.wait_for(serving, 5)  # stop() ends it without an exception
    assert "session ended: UNAVAILABLE refused by a test server" in caplog.text
    assert not [r for r in caplog.records if r.name == "carsvc.worker" and r.levelno >= logging.ERROR]


# -- drain and restart ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _start_sidecar(port: int) -> asyncio.subprocess.Process:
    """`python -m carsvc serve` on a fixed port, so a restart comes back at the same address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "carsvc", "serve", "--port", str(port), "--heartbeat-interval-ms", "300",
        "--shutdown-grace", "2", cwd=ROOT, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while b"listening on" not in (line := await asyncio.wait_for(proc.stderr.readline(), 30)):
        assert line, "the sidecar exited before listening"
    return proc


@contextlib.asynccontextmanager
async def _processes() -> AsyncIterator[list[asyncio.subprocess.Process]]:
    started: list[asyncio.subprocess.Process] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def test_drain_then_reconnect_by_default_or_return_with_stop_on_drain(caplog: pytest.LogCaptureFixture) -> None:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    survivor = Worker(address, worker_id="survivor", reconnect_max_delay=0.2)
    stopper = Worker(address, worker_id="stopper", stop_on_drain=True)
    one_shot = Worker(address, worker_id="one-shot", reconnect=False)
    for worker in (survivor, stopper, one_shot):
        worker.add_agent("a", _echo)

    async with _processes() as procs:
        procs.append(await _start_sidecar(port))
        with caplog.at_level(logging.INFO, logger="carsvc.worker"):
            serving = {w.worker_id: asyncio.create_task(w.run()) for w in (survivor, stopper, one_shot)}
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(w.connected.wait() for w in (survivor, stopper, one_shot))), 10
                )
                first_session = survivor.session_id

                procs[0].send_signal(signal.SIGTERM)  # a graceful restart: every session is drained
                # stop_on_drain, and reconnect=False, return from run() after the drain.
                await asyncio.wait_for(asyncio.gather(serving["stopper"], serving["one-shot"]), 10)
                assert await asyncio.wait_for(procs[0].wait(), 20) == 0
                await asyncio.sleep(0.5)  # the default worker is retrying against a closed port
                assert not serving["survivor"].done()

                procs.append(await _start_sidecar(port))
                deadline = time.monotonic() + 10
                while not (survivor.connected.is_set() and survivor.session_id != first_session):
                    assert not serving["survivor"].done(), serving["survivor"]
                    assert time.monotonic() < deadline, "the worker did not reconnect after the drain"
                    await asyncio.sleep(0.02)
                async with Client(address) as client:
                    assert [w.worker_id for w in await client.list_workers()] == ["survivor"]
                    run = await client.run(single(agent("a"), "after the restart"))
                assert run.result.single.output.answer == "echo after the restart"
            finally:
                await survivor.stop()
                await asyncio.wait_for(asyncio.gather(*serving.values(), return_exceptions=True), 5)
    drained = [r.getMessage() for r in caplog.records if "drained; reconnecting" in r.getMessage()]
    assert drained and all(m.startswith("worker survivor: ") for m in drained), drained
    assert not [r for r in caplog.records if r.name == "carsvc.worker" and r.levelno >= logging.ERROR]
