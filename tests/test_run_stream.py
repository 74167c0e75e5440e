"""RunService.Submit through Client.run_stream(): many runs over one stream,
each answered when it ends; refusals name the field and leave the stream (and
the other runs) alone."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from carsvc._proto.car.v1 import runs_pb2, types_pb2
from carsvc.client import Client, RunRefused, agent, map_reduce, registered, single
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED


async def echo(ctx: AgentContext) -> str:
    if ctx.task == "slow":
        await asyncio.sleep(0.3)
    return f"echo: {ctx.task}"


async def test_many_runs_on_one_stream_each_get_their_own_answer(client: Client, workers: Workers) -> None:
    await workers.start({"echo": echo}, max_in_flight=16)
    async with client.run_stream() as stream:
        slow = asyncio.ensure_future(stream.run(single(agent("echo"), "slow")))
        answers = await asyncio.gather(*(stream.run(single(agent("echo"), f"t{i}")) for i in range(50)))
        assert not slow.done()  # answers come as runs end, not in request order
        assert [a.result.single.output.answer for a in answers] == [f"echo: t{i}" for i in range(50)]
        assert all(a.status == SUCCEEDED and a.reason == "completed" for a in answers)
        assert (await slow).result.single.output.answer == "echo: slow"
        mr = await stream.run(map_reduce(agent("echo"), agent("echo"), "t", ["a", "b"]), run_id="chosen-id")
        assert len(mr.result.map_reduce.map_outputs) == 2
    assert (await client.get_run("chosen-id")).status == SUCCEEDED


async def test_refused_runs_name_the_field_and_the_stream_goes_on(client: Client, workers: Workers) -> None:
    await workers.start({"echo": echo})
    async with client.run_stream() as stream:
        with pytest.raises(RunRefused) as unknown:
            await stream.run(single(registered("nobody"), "x"))
        assert unknown.value.code == grpc.StatusCode.NOT_FOUND
        assert unknown.value.field == "single.agent.registered_name" and "nobody" in unknown.value.message
        first = await stream.run(single(agent("echo"), "one"), run_id="dup")
        with pytest.raises(RunRefused) as duplicate:
            await stream.run(single(agent("echo"), "two"), run_id="dup")
        assert duplicate.value.field == "run_id"
        assert first.status == SUCCEEDED
        assert (await stream.run(single(agent("echo"), "three"))).result.single.output.answer == "echo: three"


async def test_a_request_without_run_id_is_refused_on_the_wire(client: Client) -> None:
    call = client.runs.Submit()
    no_id = runs_pb2.StartRunRequest(single=single(agent("echo"), "x"))
    unknown = runs_pb2.StartRunRequest(run_id="r1", single=single(registered("nobody"), "x"))
    await call.write(runs_pb2.SubmitRequest(starts=[no_id, unknown]))
    answers: list[runs_pb2.SubmitAnswer] = []
    while len(answers) < 2:
        answers.extend((await call.read()).answers)
    assert (answers[0].run_id, answers[0].error.field) == ("", "run_id")
    assert answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (answers[1].run_id, answers[1].error.code) == ("r1", grpc.StatusCode.NOT_FOUND.value[0])
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
