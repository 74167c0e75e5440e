"""The Python worker survives a frame it cannot decode: it says so and reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from carsvc._proto.car.v1 import types_pb2, worker_pb2
from carsvc.client import Client, agent, single
from carsvc.values import to_value
from carsvc.worker import AgentContext, Worker
from tests.conftest import Workers

CONNECT = "/car.v1.WorkerService/Connect"


def _deep_list(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def _welcome(session: int) -> bytes:
    return worker_pb2.ConnectResponse(
        welcome=worker_pb2.WorkerWelcome(session_id=f"s{session}", heartbeat_interval_ms=1000)
    ).SerializeToString()


def _assignment(n: int) -> bytes:
    return worker_pb2.ConnectResponse(
        assignments=[
            worker_pb2.Assignment(
                assignment_id=f"a{n}", attempt=1, run_id="r", spec=types_pb2.AgentSpec(name="echo"), task=f"t{n}"
            )
        ]
    ).SerializeToString()


def _poisoned_call_result() -> bytes:
    """A state_get answer whose value parses on its own but not inside its frame
    (over protobuf's 100-level limit): what an older sidecar could send."""
    value = to_value(_deep_list(49))
    result = worker_pb2.CallResult(call_id="1", state_get=worker_pb2.StateGetResult(found=True, value=value))
    return worker_pb2.ConnectResponse(call_results=[result]).SerializeToString()


class _ScriptedSidecar:
    """A WorkerService speaking raw bytes: the first session gets a welcome, an
    assignment and then an undecodable frame; later sessions an assignment each."""

    def __init__(self, poison: bytes) -> None:
        self.poison = poison
        self.sessions = 0
        self.results: list[worker_pb2.AssignmentResult] = []
        self.second_result = asyncio.Event()

    async def connect(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        self.sessions += 1
        session = self.sessions
        frames = aiter(requests)
        hello = worker_pb2.ConnectRequest.FromString(await anext(frames))
        assert hello.HasField("hello")
        yield _welcome(session)
        yield _assignment(session)
        if session == 1:
            yield self.poison
        async for raw in frames:
            frame = worker_pb2.ConnectRequest.FromString(raw)
            self.results.extend(frame.results)
            if session > 1 and frame.results:
                self.second_result.set()

    def handler(self) -> grpc.GenericRpcHandler:
        method = grpc.stream_stream_rpc_method_handler(self.connect)  # bytes in, bytes out
        return grpc.method_handlers_generic_handler("car.v1.WorkerService", {"Connect": method})


@contextlib.asynccontextmanager
async def _serving(sidecar: _ScriptedSidecar) -> AsyncIterator[str]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((sidecar.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _echo(ctx: AgentContext) -> str:
    return f"echo {ctx.task}"


@pytest.mark.parametrize(
    "poison",
    [pytest.param(b"\xff\xff\xff\xff", id="garbage"), pytest.param(_poisoned_call_result(), id="too-deep")],
)
async def test_an_undecodable_frame_ends_the_session_clearly_and_the_worker_reconnects(
    poison: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar = _ScriptedSidecar(poison)
    async with _serving(sidecar) as address:
        worker = Worker(address, reconnect_max_delay=0.2)
        worker.add_agent("echo", _echo)
        with caplog.at_level(logging.WARNING, logger="carsvc.worker"):
            serving = asyncio.create_task(worker.run())
            await asyncio.wait_for(sidecar.second_result.wait(), 20)
            assert not serving.done()
            await worker.stop()
            await asyncio.wait_for(serving, 5)
    assert sidecar.sessions >= 2
    answered = {r.assignment_id: r.output.answer for r in sidecar.results}
    assert answered["a2"] == "echo t2"
    assert "could not decode a frame from the sidecar" in caplog.text
    assert "AttributeError" not in caplog.text


async def test_a_handler_sees_why_it_was_cancelled(sidecar: object, client: Client, workers: Workers) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()
    started = asyncio.Event()

    async def waits(ctx: AgentContext) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.put_nowait(ctx.cancel_reason)
            raise
        return "never"

    await workers.start({"waits": waits})
    handle = await client.start_run(single(agent("waits"), "t"))
    await asyncio.wait_for(started.wait(), 10)
    await client.cancel(handle.run_id, reason="the user closed the tab")
    assert await asyncio.wait_for(seen.get(), 10) == "the user closed the tab"
