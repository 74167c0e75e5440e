"""Shared fixtures: a real sidecar on a loopback port 0, real worker streams."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import uvloop

from carsvc.client import Client
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, Worker

pytest_plugins = ["tests.conftest_impl", "tests.redis_server"]

# Fast heartbeats so lease tests finish quickly; everything else as shipped.
TEST_SETTINGS = Settings(port=0, heartbeat_interval_ms=200, shutdown_grace_s=2.0, unplaced_timeout_s=5.0)


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
