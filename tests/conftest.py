"""Shared fixtures: a real sidecar on a loopback port 0, real worker streams."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import uvloop
from grpc.aio import _channel as aio_channel
from grpc.aio import _server as aio_server

from carsvc.client import Client
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Worker

pytest_plugins = ["tests.conftest_impl", "tests.redis_server"]

# Fast heartbeats so lease tests finish quickly; everything else as shipped.
TEST_SETTINGS = Settings(port=0, heartbeat_interval_ms=200, shutdown_grace_s=2.0, unplaced_timeout_s=5.0)


# gRPC channels and servers the tests opened and have not closed (stopped), by id:
# what they are and the test that opened them. One left open keeps gRPC's core
# initialized at exit, where it waits for it and then prints
# `grpc_wait_for_shutdown_with_timeout() timed out`; the run fails instead, naming the test.
_OPEN_GRPC: dict[int, tuple[str, str]] = {}
_CURRENT_TEST = ["(collection)"]


def _track(cls: Any, kind: str, closers: tuple[str, ...]) -> None:
    opened = cls.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        opened(self, *args, **kwargs)
        _OPEN_GRPC[id(self)] = (kind, _CURRENT_TEST[0])

    cls.__init__ = init
    for name in closers:
        close = getattr(cls, name)

        async def closing(self: Any, *args: Any, _close: Any = close, **kwargs: Any) -> Any:
            _OPEN_GRPC.pop(id(self), None)
            return await _close(self, *args, **kwargs)

        setattr(cls, name, closing)


_track(aio_channel.Channel, "channel", ("_close",))  # close() and `async with` end in _close
_track(aio_server.Server, "server", ("stop",))


def pytest_runtest_setup(item: pytest.Item) -> None:
    _CURRENT_TEST[0] = item.nodeid


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()  # what finished tests dropped goes now, while the interpreter is whole
    if _OPEN_GRPC:
        left = sorted({f"{kind} opened by {test}" for kind, test in _OPEN_GRPC.values()})
        print("\ngRPC objects the tests never closed (gRPC waits for them at exit):\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The sidecar runs on uvloop in production, so the tests do too
    (CARSVC_TEST_LOOP=asyncio runs them on the stock loop)."""
    if os.environ.get("CARSVC_TEST_LOOP") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def settings() -> Settings:
    return TEST_SETTINGS


@pytest.fixture
async def sidecar(settings: Settings) -> AsyncIterator[Sidecar]:
    server = Sidecar(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
async def client(sidecar: Sidecar) -> AsyncIterator[Client]:
    async with Client(sidecar.address) as c:
        yield c


Handler = Callable[[AgentContext], Awaitable[Any]]


class Workers:
    """Starts in-process workers against the test sidecar and stops them after."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._running: list[tuple[Worker, asyncio.Task[None]]] = []

    async def start(self, handlers: dict[str, Handler], **options: Any) -> Worker:
        worker = Worker(self.address, **options)
        for name, handler in handlers.items():
            worker.add_agent(name, handler)
        task = asyncio.create_task(worker.run())
        self._running.append((worker, task))
        done, _ = await asyncio.wait(
            {task, asyncio.ensure_future(worker.connected.wait())}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()
        assert worker.connected.is_set(), "worker did not connect"
        return worker

    async def stop_all(self) -> None:
        for worker, task in self._running:
            await worker.stop()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await asyncio.wait_for(task, 5)


@pytest.fixture
async def workers(sidecar: Sidecar) -> AsyncIterator[Workers]:
    pool = Workers(sidecar.address)
    try:
        yield pool
    finally:
        await pool.stop_all()
