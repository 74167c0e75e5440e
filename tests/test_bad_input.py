"""Bad input gets the right status and a message naming the field; the sidecar,
its workers and other runs carry on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from carsvc._proto.car.v1 import (
    patterns_pb2,
    registry_pb2,
    runs_pb2,
    state_pb2,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.values import to_value
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED


async def echo(ctx: AgentContext) -> str:
    return f"{ctx.name}: {ctx.task}"


async def start_error(client: Client, request: runs_pb2.StartRunRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.runs.StartRun(request)
    return err.value


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (runs_pb2.StartRunRequest(), grpc.StatusCode.INVALID_ARGUMENT, "pattern"),
        (
            runs_pb2.StartRunRequest(single=patterns_pb2.SingleRun(agent=agent(""), task="t")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "single.agent.spec.name",
        ),
        (
            runs_pb2.StartRunRequest(single=patterns_pb2.SingleRun(agent=agent("two words"), task="t")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "single.agent.spec.name",
        ),
        (
            runs_pb2.StartRunRequest(single=patterns_pb2.SingleRun(task="t")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "single.agent",
        ),
        (
            runs_pb2.StartRunRequest(map_reduce=map_reduce(agent("m"), agent("r"), "t", ["a"], max_concurrent=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "map_reduce.max_concurrent",
        ),
        (
            runs_pb2.StartRunRequest(
                map_reduce=patterns_pb2.MapReduceRun(mapper=agent("m"), task="t", items=["a"])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "map_reduce.reducer",
        ),
        (
            runs_pb2.StartRunRequest(
                single=patterns_pb2.SingleRun(agent=patterns_pb2.AgentRef(registered_name="ghost"), task="t")
            ),
            grpc.StatusCode.NOT_FOUND,
            "single.agent.registered_name",
        ),
        (
            runs_pb2.StartRunRequest(
                single=single(agent("a"), "t"), budget=types_pb2.BudgetLimits(max_cost_usd=-1)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "budget.max_cost_usd",
        ),
        (
            runs_pb2.StartRunRequest(single=single(agent("a"), "t"), budget_id="no-such-budget"),
            grpc.StatusCode.NOT_FOUND,
            "budget_id",
        ),
        (
            runs_pb2.StartRunRequest(single=single(agent("a"), "t"), thread_id="x" * 300),
            grpc.StatusCode.INVALID_ARGUMENT,
            "thread_id",
        ),
    ],
    ids=[
        "missing-pattern", "empty-agent-name", "whitespace-name", "missing-agent", "max-concurrent-0",
        "missing-reducer", "unknown-registered-agent", "negative-cost", "unknown-budget",
        "long-thread-id",
    ],
)
async def test_start_run_rejects_bad_requests(
    client: Client, request_: runs_pb2.StartRunRequest, code: grpc.StatusCode, field: str
) -> None:
    err = await start_error(client, request_)
    assert err.code() == code
    assert (err.details() or "").startswith(f"{field}:"), err.details()
    assert await client.list_runs() == []  # nothing was started


async def test_oversized_field_names_the_field(client: Client, sidecar: Sidecar) -> None:
    limit = sidecar.settings.max_field_bytes
    request = runs_pb2.StartRunRequest(map_reduce=map_reduce(agent("m"), agent("r"), "t", ["ok", "x" * (limit + 1)]))
    err = await start_error(client, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        f"map_reduce.items[1]: is {limit + 1} bytes; the limit is {limit} (max_field_bytes)"
    )


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(max_message_bytes=64 * 1024, max_field_bytes=1024)])
async def test_message_over_the_transport_limit_is_refused(client: Client, settings: Settings) -> None:
    err = await start_error(client, runs_pb2.StartRunRequest(single=single(agent("a"), "x" * 100_000)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (err.details() or "")


async def test_unknown_ids_are_not_found(client: Client) -> None:
    for call in (
        client.get_run("nope"),
        client.cancel("nope"),
        client.get_run(thread_id="no-thread"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.cancel("a", thread_id="b")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("run_id: give run_id or thread_id, not both")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.registry.GetAgent(registry_pb2.GetAgentRequest(name="ghost"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_busy_thread_is_rejected_naming_the_active_run(client: Client, workers: Workers) -> None:
    release = asyncio.Event()

    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "done"

    await workers.start({"a": slow})
    first = await client.start_run(single(agent("a"), "t"), thread_id="busy")
    err = await start_error(
        client, runs_pb2.StartRunRequest(thread_id="busy", single=single(agent("a"), "again"))
    )
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"active run '{first.run_id}'" in (err.details() or "")
    release.set()
    assert (await client.wait(first.run_id)).status == SUCCEEDED


async def test_wrong_owner_cannot_cancel(client: Client, workers: Workers) -> None:
    release = asyncio.Event()

    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "done"

    await workers.start({"a": slow})
    handle = await client.start_run(single(agent("a"), "t"), agent_id="alice", thread_id="t-owned")
    for run_id, thread_id in ((handle.run_id, ""), ("", "t-owned")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.cancel(run_id, thread_id=thread_id, agent_id="mallory")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    release.set()
    assert (await client.wait(handle.run_id)).status == SUCCEEDED


class RawWorker:
    """A hand-driven worker stream, for frames the SDK would never send."""

    def __init__(self, client: Client) -> None:
        self.outgoing: asyncio.Queue[worker_pb2.ConnectRequest | None] = asyncio.Queue()
        self.stream = worker_pb2_grpc.WorkerServiceStub(client.channel).Connect(self._frames())

    async def _frames(self) -> AsyncIterator[worker_pb2.ConnectRequest]:
        while (frame := await self.outgoing.get()) is not None:
            yield frame

    async def send(self, **fields: object) -> None:
        await self.outgoing.put(worker_pb2.ConnectRequest(**fields))  # type: ignore[arg-type]

    async def read(self) -> worker_pb2.ConnectResponse:
        frame = await asyncio.wait_for(self.stream.read(), 5)
        assert isinstance(frame, worker_pb2.ConnectResponse)
        return frame


async def test_first_frame_without_hello_ends_the_stream(client: Client) -> None:
    raw = RawWorker(client)
    await raw.send(heartbeat=worker_pb2.Heartbeat())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("hello:")


async def test_hello_without_agents_is_refused(client: Client) -> None:
    raw = RawWorker(client)
    await raw.send(hello=worker_pb2.WorkerHello(worker_id="w"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("hello.agents:")


async def test_bad_worker_frames_get_errors_and_nothing_else_breaks(
    client: Client, workers: Workers, sidecar: Sidecar
) -> None:
    release = asyncio.Event()

    async def slow(ctx: AgentContext) -> str:
        await release.wait()
        return "fine"

    await workers.start({"good": slow}, worker_id="good-worker")
    other = await client.start_run(single(agent("good"), "unrelated"))

    raw = RawWorker(client)
    await raw.send(hello=worker_pb2.WorkerHello(worker_id="raw", agents=["bad"]))
    assert (await raw.read()).welcome.session_id
    # A result for an assignment nobody handed out.
    await raw.send(results=[worker_pb2.AssignmentResult(assignment_id="made-up", attempt=1)])
    (error,) = (await raw.read()).errors
    assert error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert error.field == "results[0].assignment_id"
    assert error.message == "unknown assignment 'made-up'"
    # A call from an assignment this session does not hold.
    await raw.send(calls=[worker_pb2.RuntimeCall(call_id="c1", assignment_id="made-up",
                                                 state_get=worker_pb2.StateGetCall(key="k"))])
    (result,) = (await raw.read()).call_results
    assert result.call_id == "c1"
    assert result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert result.error.message.startswith("calls[0].assignment_id: assignment 'made-up' is not running")
    # A call with no operation, fire-and-forget: reported as a frame error.
    await raw.send(calls=[worker_pb2.RuntimeCall(assignment_id="x")])
    (error,) = (await raw.read()).errors
    assert error.field == "calls[0].op"
    # A second hello.
    await raw.send(hello=worker_pb2.WorkerHello(worker_id="raw", agents=["bad"]))
    (error,) = (await raw.read()).errors
    assert error.field == "hello"

    # Runtime-call mistakes from a real running agent.
    got = asyncio.Event()
    held: list[worker_pb2.Assignment] = []
    run = await client.start_run(single(agent("bad"), "t"))
    frame = await raw.read()
    held.extend(frame.assignments)
    (assignment,) = held
    got.set()
    await raw.send(calls=[
        worker_pb2.RuntimeCall(call_id="k", assignment_id=assignment.assignment_id,
                               state_set=worker_pb2.StateSetCall(key="")),
        worker_pb2.RuntimeCall(call_id="v", assignment_id=assignment.assignment_id,
                               state_set=worker_pb2.StateSetCall(key="k")),
        worker_pb2.RuntimeCall(call_id="big", assignment_id=assignment.assignment_id,
                               state_set=worker_pb2.StateSetCall(
                                   key="k", value=to_value("x" * (sidecar.settings.max_field_bytes + 1)))),
        worker_pb2.RuntimeCall(call_id="m", assignment_id=assignment.assignment_id,
                               mailbox_send=worker_pb2.MailboxSendCall(message=types_pb2.Message(to_agent="ghost"))),
        worker_pb2.RuntimeCall(call_id="d", assignment_id=assignment.assignment_id,
                               delegate=worker_pb2.DelegateCall(specialist="x", subtask="y")),
    ])
    results: dict[str, worker_pb2.CallResult] = {}
    while len(results) < 5:
        for r in (await raw.read()).call_results:
            results[r.call_id] = r
    assert results["k"].error.message == "calls[0].state_set.key: must not be empty"
    assert results["v"].error.message == "calls[1].state_set.value: is required"
    assert results["big"].error.message.startswith("calls[2].state_set.value: is ")
    assert results["m"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no agent 'ghost'" in results["m"].error.message
    assert results["d"].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    # The raw worker finishes its run properly after all that.
    await raw.send(results=[worker_pb2.AssignmentResult(
        assignment_id=assignment.assignment_id, attempt=assignment.attempt,
        output=types_pb2.AgentOutput(answer="recovered"))])
    assert (await client.wait(run.run_id)).result.single.output.answer == "recovered"
    # The unrelated run and its worker were never disturbed.
    release.set()
    done = await client.wait(other.run_id)
    assert done.status == SUCCEEDED and done.result.single.output.answer == "fine"
    await raw.outgoing.put(None)


async def test_state_service_bad_input(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.state.Get(state_pb2.GetRequest(scope="", key="k"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith("scope:")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.state.Set(state_pb2.SetRequest(scope="s", key="k"))
    assert (err.value.details() or "").startswith("value:")
    assert await client.get_state("s", "k", "missing") == "missing"
    await client.set_state("s", "k", {"a": [1, 2]})
    assert await client.get_state("s", "k") == {"a": [1, 2]}


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(max_watchers_per_run=2)])
async def test_watchers_per_run_are_limited(client: Client, settings: Settings) -> None:
    handle = await client.start_run(single(agent("nobody"), "t"))
    watchers = [client.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=handle.run_id)) for _ in range(2)]
    for w in watchers:
        await w.read()  # both are subscribed
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in client.runs.WatchRun(runs_pb2.WatchRunRequest(run_id=handle.run_id)):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_watchers_per_run" in (err.value.details() or "")
    await client.cancel(handle.run_id, wait=True)
    for w in watchers:
        w.cancel()


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(agent_timeout_s=0.3)])
async def test_agents_get_the_default_deadline(client: Client, workers: Workers, settings: Settings) -> None:
    async def hangs(ctx: AgentContext) -> str:
        await asyncio.sleep(30)
        return "never"

    await workers.start({"a": hangs})
    run = await client.run(single(agent("a"), "t"))
    assert run.result.single.output.error == "timed out after 0.3s"
