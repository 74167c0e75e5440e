"""The worker protocol never drops a frame silently (issue 12, sections 1, 4 and 7).

Raw worker frames against a live sidecar: a result with a wrong, superseded or
duplicate attempt, a call that needs an answer but has no call_id, an output
or a call argument too large or nested too deep — each gets a FrameError (or
CallError) naming the field; runs go on and end; the cancel reason the client
gave reaches the worker; finished assignment ids are remembered within bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from carsvc.client import Client, agent, map_reduce, single
from carsvc.config import Settings
from carsvc.domain import workers as workers_module
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]


class RawWorker:
    """A hand-driven worker stream, for frames the SDK would never send."""

    def __init__(self, client: Client) -> None:
        self.outgoing: asyncio.Queue[worker_pb2.ConnectRequest | None] = asyncio.Queue()
        self.stream = worker_pb2_grpc.WorkerServiceStub(client.channel).Connect(self._frames())
        self.assignments: list[worker_pb2.Assignment] = []

    async def _frames(self) -> AsyncIterator[worker_pb2.ConnectRequest]:
        while (frame := await self.outgoing.get()) is not None:
            yield frame

    async def hello(self, agents: list[str], worker_id: str = "raw") -> None:
        await self.send(hello=worker_pb2.WorkerHello(worker_id=worker_id, agents=agents, max_in_flight=4))
        assert (await self.read()).welcome.session_id

    async def send(self, **fields: object) -> None:
        await self.outgoing.put(worker_pb2.ConnectRequest(**fields))  # type: ignore[arg-type]

    async def read(self) -> worker_pb2.ConnectResponse:
        frame = await asyncio.wait_for(self.stream.read(), 5)
        assert isinstance(frame, worker_pb2.ConnectResponse), frame
        self.assignments.extend(frame.assignments)
        return frame

    async def assignment(self) -> worker_pb2.Assignment:
        while not self.assignments:
            await self.read()
        return self.assignments.pop(0)

    async def errors(self, count: int = 1) -> list[worker_pb2.FrameError]:
        got: list[worker_pb2.FrameError] = []
        while len(got) < count:
            got.extend((await self.read()).errors)
        return got

    async def answers(self, count: int) -> dict[str, worker_pb2.CallResult]:
        got: dict[str, worker_pb2.CallResult] = {}
        while len(got) < count:
            for r in (await self.read()).call_results:
                got[r.call_id] = r
        return got

    async def result(self, a: worker_pb2.Assignment, output: types_pb2.AgentOutput, attempt: int = 0) -> None:
        await self.send(results=[worker_pb2.AssignmentResult(
            assignment_id=a.assignment_id, attempt=attempt or a.attempt, output=output)])

    async def close(self) -> None:
        await self.outgoing.put(None)
        self.stream.cancel()


def nested_list(depth: int) -> struct_pb2.Value:
    """A JSON list nested `depth` levels deep: [[[...[1]...]]]."""
    value = struct_pb2.Value(number_value=1)
    for _ in range(depth):
        outer = struct_pb2.Value()
        outer.list_value.values.add().CopyFrom(value)
        value = outer
    return value


@pytest.fixture
async def raw(client: Client) -> AsyncIterator[RawWorker]:
    worker = RawWorker(client)
    await worker.hello(["raw"])
    try:
        yield worker
    finally:
        await worker.close()


# -- section 7: results that are not taken are answered --------------------------------------------


async def test_a_result_with_a_wrong_attempt_is_answered_and_the_right_one_still_counts(
    client: Client, raw: RawWorker
) -> None:
    handle = await client.start_run(single(agent("raw"), "t"))
    a = await raw.assignment()
    assert a.attempt == 1
    await raw.result(a, types_pb2.AgentOutput(answer="wrong"), attempt=2)
    (error,) = await raw.errors()
    assert (error.code, error.field) == (INVALID, "results[0].attempt")
    assert error.message == (
        f"is 2, but assignment '{a.assignment_id}' was only handed out up to attempt 1: "
        "echo the attempt of the Assignment; this result was ignored"
    )
    # Nothing was taken: the run waits for the right attempt, and takes it.
    assert (await client.get_run(handle.run_id)).status == types_pb2.RUN_STATUS_RUNNING
    await raw.result(a, types_pb2.AgentOutput(answer="right"))
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED and run.result.single.output.answer == "right"


async def test_a_second_result_for_a_finished_assignment_is_answered(client: Client, raw: RawWorker) -> None:
    handle = await client.start_run(single(agent("raw"), "t"))
    a = await raw.assignment()
    # Twice in one frame: the first is taken, the second is a duplicate.
    result = worker_pb2.AssignmentResult(
        assignment_id=a.assignment_id, attempt=1, output=types_pb2.AgentOutput(answer="first")
    )
    await raw.send(results=[result, result])
    (error,) = await raw.errors()
    assert (error.code, error.field) == (PRECONDITION, "results[1].assignment_id")
    assert error.message == (
        f"assignment '{a.assignment_id}' attempt 1 has already finished (its result was accepted); "
        "this result (a duplicate, or sent too late) was ignored"
    )
    run = await client.wait(handle.run_id)
    assert run.result.single.output.answer == "first"
    # And again after the run ended (its ids are still remembered).
    await raw.result(a, types_pb2.AgentOutput(answer="again"))
    (error,) = await raw.errors()
    assert (error.code, error.field) == (PRECONDITION, "results[0].assignment_id")
    assert "has already finished" in error.message
    assert (await client.get_run(handle.run_id)).result.single.output.answer == "first"


async def test_a_late_result_of_a_superseded_attempt_is_answered_not_an_error_of_the_run(
    client: Client,
) -> None:
    first = RawWorker(client)
    await first.hello(["raw"], worker_id="first")
    handle = await client.start_run(single(agent("raw"), "t"))
    a1 = await first.assignment()
    second = RawWorker(client)
    await second.hello(["raw"], worker_id="second")
    await first.close()  # the lease ends: attempt 2 goes to the second worker
    a2 = await second.assignment()
    assert (a2.assignment_id, a2.attempt) == (a1.assignment_id, 2)
    await second.result(a1, types_pb2.AgentOutput(answer="late"), attempt=1)
    (error,) = await second.errors()
    assert (error.code, error.field) == (PRECONDITION, "results[0].attempt")
    assert error.message == (
        f"attempt 1 of assignment '{a1.assignment_id}' was superseded by attempt 2 "
        "(its lease ended and it was handed out again); this result was ignored"
    )
    await second.result(a2, types_pb2.AgentOutput(answer="from attempt 2"))
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED and run.result.single.output.answer == "from attempt 2"
    await second.result(a1, types_pb2.AgentOutput(answer="later still"), attempt=1)
    (error,) = await second.errors()
    assert error.field == "results[0].attempt"
    assert error.message.endswith(
        "; the assignment has since finished (its result was accepted); this result was ignored"
    )
    await second.close()


@pytest.mark.parametrize(
    "call",
    [
        worker_pb2.RuntimeCall(state_get=worker_pb2.StateGetCall(key="k")),
        worker_pb2.RuntimeCall(state_keys=worker_pb2.StateKeysCall()),
        worker_pb2.RuntimeCall(mailbox_recv=worker_pb2.MailboxRecvCall(timeout_ms=1)),
        worker_pb2.RuntimeCall(
            suspend_tool_call=worker_pb2.SuspendToolCall(tool_call_id="c", tool_name="raw", timeout_ms=1)
        ),
        worker_pb2.RuntimeCall(delegate=worker_pb2.DelegateCall(specialist="x", subtask="y")),
    ],
    ids=["state_get", "state_keys", "mailbox_recv", "suspend_tool_call", "delegate"],
)
async def test_a_call_that_needs_an_answer_needs_a_call_id(
    client: Client, raw: RawWorker, call: worker_pb2.RuntimeCall
) -> None:
    handle = await client.start_run(single(agent("raw", tools=["raw"]), "t"))
    a = await raw.assignment()
    call.assignment_id = a.assignment_id
    op = call.WhichOneof("op")
    # A fire-and-forget emit next to it is fine: it gets no answer, and is made.
    emit = worker_pb2.RuntimeCall(assignment_id=a.assignment_id, emit=worker_pb2.EmitEventCall(kind="k"))
    await raw.send(calls=[call, emit])
    (error,) = await raw.errors()
    assert (error.code, error.field) == (INVALID, "calls[0].call_id")
    assert error.message == f"is required for {op} (its answer is the call's result); the call was not made"
    await raw.result(a, types_pb2.AgentOutput(answer="done"))
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED
    kinds = [e.WhichOneof("kind") async for e in client.watch(handle.run_id)]
    assert "custom" in kinds and "tool_call_suspended" not in kinds


# -- AssignmentCancel.reason is the client's -------------------------------------------------------


async def test_the_cancel_reason_the_client_gave_reaches_the_worker(client: Client, raw: RawWorker) -> None:
    handle = await client.start_run(single(agent("raw"), "t"), agent_id="alice", thread_id="t-cancel")
    a = await raw.assignment()
    await client.cancel(handle.run_id, agent_id="alice", reason="the user closed the tab")
    frame = await raw.read()
    while not frame.cancels:
        frame = await raw.read()
    assert [(c.assignment_id, c.reason) for c in frame.cancels] == [(a.assignment_id, "the user closed the tab")]
    await raw.result(a, types_pb2.AgentOutput(error="cancelled"))

    # An interrupting run: the reason names it.
    held = await client.start_run(single(agent("raw"), "t"), agent_id="alice", thread_id="t-cancel")
    b = await raw.assignment()
    nxt = await client.start_run(
        single(agent("raw"), "next"), agent_id="alice", thread_id="t-cancel", on_busy="interrupt"
    )
    frame = await raw.read()
    while not frame.cancels:
        frame = await raw.read()
    assert [(c.assignment_id, c.reason) for c in frame.cancels] == [
        (b.assignment_id, f"interrupted by run '{nxt.run_id}'")
    ]
    await raw.result(b, types_pb2.AgentOutput(error="cancelled"))
    assert (await client.wait(held.run_id)).status == types_pb2.RUN_STATUS_CANCELLED
    c = await raw.assignment()
    await raw.result(c, types_pb2.AgentOutput(answer="ok"))
    assert (await client.wait(nxt.run_id)).status == SUCCEEDED


async def test_a_session_cancel_reason_reaches_the_worker(client: Client, raw: RawWorker) -> None:
    session = await client.session(single(agent("raw"), "t"))
    a = await raw.assignment()
    await session.cancel("stopped from the session")
    frame = await raw.read()
    while not frame.cancels:
        frame = await raw.read()
    assert frame.cancels[0].reason == "stopped from the session"
    await raw.result(a, types_pb2.AgentOutput(error="cancelled"))
    await session.close()


async def test_a_run_timeout_reaches_the_worker_as_the_reason(client: Client, raw: RawWorker) -> None:
    handle = await client.start_run(single(agent("raw"), "t"), timeout=0.3)
    a = await raw.assignment()
    frame = await raw.read()
    while not frame.cancels:
        frame = await raw.read()
    assert [(c.assignment_id, c.reason) for c in frame.cancels] == [
        (a.assignment_id, "the run did not finish within 0.3s")
    ]
    await raw.result(a, types_pb2.AgentOutput(error="cancelled"))
    run = await client.wait(handle.run_id)
    assert (run.status, run.termination_reason) == (types_pb2.RUN_STATUS_FAILED, "timeout")
    assert run.termination_detail == "the run did not finish within 0.3s"


# -- section 1: what a worker sends is bounded at the boundary ---------------------------------------


async def test_an_output_nested_too_deep_is_refused_and_the_run_ends_readable(
    client: Client, raw: RawWorker, sidecar: Sidecar
) -> None:
    """The issue's repro: outcome.evidence[].data a list nested 47 deep."""
    handle = await client.start_run(single(agent("raw"), "t"))
    a = await raw.assignment()
    output = types_pb2.AgentOutput(answer="poisoned")
    for i in range(3):
        evidence = output.outcome.evidence.add(description=f"e{i}")
        evidence.data.CopyFrom(nested_list(47 if i == 2 else 2))
    await raw.result(a, output)
    (error,) = await raw.errors()
    field = "results[0].output.outcome.evidence[2].data"
    limit = sidecar.settings.max_value_depth
    assert (error.code, error.field) == (INVALID, field)
    assert error.message == (
        f"is nested 47 levels deep; the limit is {limit} (max_value_depth); "
        "the agent's output is an error saying so"
    )
    run = await client.wait(handle.run_id)
    assert run.status == FAILED
    out = run.result.single.output
    assert out.error == (
        f"the worker's output was refused: {field}: is nested 47 levels deep; the limit is {limit} (max_value_depth)"
    )
    assert out.name == "raw" and not out.answer and not out.HasField("outcome")
    # GetRun and WatchRun decode; the event stream ends with the run.
    events = [e async for e in client.watch(handle.run_id)]
    assert events[-1].run_finished.result.single.output.error == out.error
    assert (await client.get_run(handle.run_id)).result.single.output.error == out.error


async def test_deep_metrics_are_refused_too(client: Client, raw: RawWorker) -> None:
    handle = await client.start_run(single(agent("raw"), "t"))
    a = await raw.assignment()
    output = types_pb2.AgentOutput(answer="x")
    output.outcome.metrics.fields["m"].CopyFrom(nested_list(30))
    await raw.result(a, output)
    (error,) = await raw.errors()
    assert error.field == "results[0].output.outcome.metrics"
    assert (await client.wait(handle.run_id)).status == FAILED


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(max_output_bytes=64 * 1024)])
async def test_an_output_over_max_output_bytes_is_refused(
    client: Client, raw: RawWorker, settings: Settings
) -> None:
    handle = await client.start_run(single(agent("raw"), "t"))
    a = await raw.assignment()
    output = types_pb2.AgentOutput(answer="x" * 100_000, tokens=types_pb2.TokenAccounting(input_tokens=7))
    size = output.ByteSize()
    await raw.result(a, output)
    (error,) = await raw.errors()
    assert (error.code, error.field) == (INVALID, "results[0].output")
    assert error.message.startswith(f"is {size} bytes; the limit is 65536 (max_output_bytes)")
    run = await client.wait(handle.run_id)
    assert run.status == FAILED
    assert run.result.single.output.error == (
        f"the worker's output was refused: results[0].output: is {size} bytes; the limit is 65536 (max_output_bytes)"
    )
    # The spend the worker reported still counts.
    assert run.budget.input_tokens == 7


async def test_call_arguments_nested_too_deep_are_refused_naming_the_field(
    client: Client, raw: RawWorker, sidecar: Sidecar
) -> None:
    handle = await client.start_run(single(agent("raw", tools=["tool"]), "t"))
    a = await raw.assignment()
    aid = a.assignment_id
    deep = nested_list(30)
    await raw.send(calls=[
        worker_pb2.RuntimeCall(call_id="set", assignment_id=aid,
                               state_set=worker_pb2.StateSetCall(key="k", value=deep)),
        worker_pb2.RuntimeCall(call_id="send", assignment_id=aid, mailbox_send=worker_pb2.MailboxSendCall(
            message=types_pb2.Message(to_agent="raw", payload=deep))),
        worker_pb2.RuntimeCall(call_id="suspend", assignment_id=aid, suspend_tool_call=worker_pb2.SuspendToolCall(
            tool_call_id="c", tool_name="tool", arguments=deep)),
        worker_pb2.RuntimeCall(call_id="get", assignment_id=aid, state_get=worker_pb2.StateGetCall(key="k")),
    ])
    answers = await raw.answers(4)
    tail = f"is nested 30 levels deep; the limit is {sidecar.settings.max_value_depth} (max_value_depth)"
    assert answers["set"].error.code == INVALID
    assert answers["set"].error.message == f"calls[0].state_set.value: {tail}"
    assert answers["send"].error.message == f"calls[1].mailbox_send.message.payload: {tail}"
    assert answers["suspend"].error.message == f"calls[2].suspend_tool_call.arguments: {tail}"
    assert not answers["get"].state_get.found  # nothing was stored
    # Fire and forget: a FrameError naming the field.
    await raw.send(calls=[worker_pb2.RuntimeCall(
        assignment_id=aid, emit=worker_pb2.EmitEventCall(kind="k", payload=deep))])
    (error,) = await raw.errors()
    assert (error.code, error.field, error.message) == (INVALID, "calls[0].emit.payload", tail)
    await raw.result(a, types_pb2.AgentOutput(answer="fine"))
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED
    kinds = [e.WhichOneof("kind") async for e in client.watch(handle.run_id)]
    assert "custom" not in kinds and "tool_call_suspended" not in kinds


# -- section 4: finished assignment ids are remembered within bounds ----------------------------------


async def echo(ctx: AgentContext) -> str:
    return f"{ctx.name}: {ctx.task}"


async def test_finished_assignments_are_remembered_while_their_run_is_active_and_a_few_after(
    client: Client, workers: Workers, sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(workers_module, "FINISHED_MEMORY", 3)
    dispatcher = sidecar.dispatcher
    release = asyncio.Event()

    async def reducer(ctx: AgentContext) -> str:
        await release.wait()
        return "reduced"

    await workers.start({"m": echo, "r": reducer, "s": echo})
    handle = await client.start_run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(8)]))
    mapper_ids: list[str] = []
    async for event in client.watch(handle.run_id):
        if event.WhichOneof("kind") == "agent_started" and event.agent_started.role == "reducer":
            break
        if event.WhichOneof("kind") == "agent_finished":
            mapper_ids.append(event.agent_finished.assignment_id)
    # While the run is active every finished assignment of it is remembered...
    assert len(mapper_ids) == 8
    assert all(dispatcher.finished(i) is not None for i in mapper_ids)
    release.set()
    assert (await client.wait(handle.run_id)).status == SUCCEEDED
    # ...once it ended only the latest FINISHED_MEMORY are.
    singles = [await client.run(single(agent("s"), f"t{i}")) for i in range(4)]
    assert dispatcher.remembered == 3
    assert all(dispatcher.finished(i) is None for i in mapper_ids)
    last = [e async for e in client.watch(singles[-1].run_id) if e.WhichOneof("kind") == "agent_finished"]
    newest = last[0].agent_finished.assignment_id
    assert dispatcher.finished(newest) is not None
    # A result for a forgotten one is unknown; for a remembered one, a duplicate.
    raw = RawWorker(client)
    await raw.hello(["nobody"])
    await raw.send(results=[
        worker_pb2.AssignmentResult(assignment_id=mapper_ids[0], attempt=1),
        worker_pb2.AssignmentResult(assignment_id=newest, attempt=1),
    ])
    first, second = await raw.errors(2)
    assert (first.code, first.field) == (NOT_FOUND, "results[0].assignment_id")
    assert (second.code, second.field) == (PRECONDITION, "results[1].assignment_id")
    await raw.close()
