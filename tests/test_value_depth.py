"""One nesting limit for every JSON value a client sends (max_value_depth): state,
spec metadata (inline or registered), decisions. A value at the limit is accepted
and can be read back through every envelope; one level more is INVALID_ARGUMENT
naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import registry_pb2, runs_pb2, state_pb2, types_pb2
from carsvc.client import Client, agent, map_reduce, resume, single
from carsvc.domain.bounds import DEFAULT_MAX_VALUE_DEPTH, value_depth
from carsvc.server import Sidecar
from carsvc.values import to_value
from carsvc.worker import AgentContext
from tests.conftest import TEST_SETTINGS, Workers

LIMIT = DEFAULT_MAX_VALUE_DEPTH


def nested(depth: int, *, objects: bool) -> Any:
    """JSON nested `depth` levels: {"a": {"a": ... 1}} or [[...[1]]]."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value} if objects else [value]
    return value


def deep_value(depth: int, *, objects: bool = True) -> struct_pb2.Value:
    value = to_value(nested(depth, objects=objects))
    assert value_depth(value) == depth
    return value


def deep_struct(depth: int) -> struct_pb2.Struct:
    return deep_value(depth).struct_value


async def refused(call: Any, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert details.startswith(f"{field}: is nested {LIMIT + 1} levels deep; the limit is {LIMIT} (max_value_depth)")


@pytest.mark.parametrize("objects", [True, False], ids=["objects", "lists"])
async def test_state_values(sidecar: Sidecar, client: Client, objects: bool) -> None:
    await client.state.Set(state_pb2.SetRequest(scope="s", key="ok", value=deep_value(LIMIT, objects=objects)))
    assert await client.get_state("s", "ok") == nested(LIMIT, objects=objects)
    await refused(
        client.state.Set(state_pb2.SetRequest(scope="s", key="deep", value=deep_value(LIMIT + 1, objects=objects))),
        "value",
    )
    assert await client.get_state("s", "deep") is None


async def test_spec_metadata_inline_and_registered(sidecar: Sidecar, client: Client) -> None:
    spec = types_pb2.AgentSpec(name="a", metadata=deep_struct(LIMIT + 1))
    await refused(client.registry.RegisterAgent(registry_pb2.RegisterAgentRequest(agent=spec)), "agent.metadata")
    inline = runs_pb2.StartRunRequest(
        single=single(agent("a", metadata=nested(LIMIT, objects=True)), "t")
    )
    inline.single.agent.spec.metadata.CopyFrom(deep_struct(LIMIT + 1))
    await refused(client.runs.StartRun(inline), "single.agent.spec.metadata")
    ok = types_pb2.AgentSpec(name="b", metadata=deep_struct(LIMIT))
    await client.registry.RegisterAgent(registry_pb2.RegisterAgentRequest(agent=ok))


async def test_decisions(sidecar: Sidecar, client: Client) -> None:
    too_deep = resume("call-1")
    too_deep.result.CopyFrom(deep_value(LIMIT + 1))
    await refused(
        client.runs.StartRun(runs_pb2.StartRunRequest(single=single(agent("a"), "t"), initial_decisions=[too_deep])),
        "initial_decisions[0].result",
    )
    handle = await client.start_run(single(agent("nobody"), "t"))
    await refused(
        client.runs.SubmitDecisions(runs_pb2.SubmitDecisionsRequest(run_id=handle.run_id, decisions=[too_deep])),
        "decisions[0].result",
    )
    fine = resume("call-1", nested(LIMIT, objects=False))
    answer = await client.submit_decisions(fine, run_id=handle.run_id)
    assert list(answer.queued_decision_ids) == ["decision_call-1"]
    await client.cancel(handle.run_id)


async def test_a_value_at_the_limit_travels_every_envelope_and_the_journal(tmp_path: Path) -> None:
    """Evidence data nested max_value_depth deep (objects: 3 protobuf levels each)
    inside map-reduce's deepest envelope: Session, WatchRun and GetRun decode it, and
    a sidecar restarted on the journal reads it back."""
    evidence = types_pb2.Evidence(description="deep", data=deep_value(LIMIT))

    async def mapper(ctx: AgentContext) -> types_pb2.AgentOutput:
        out = types_pb2.AgentOutput(name=ctx.name, answer="found")
        out.outcome.evidence.append(evidence)
        return out

    async def reducer(ctx: AgentContext) -> str:
        return "done"

    settings = TEST_SETTINGS.replace(data_dir=str(tmp_path))
    first = Sidecar(settings)
    await first.start()
    pool = Workers(first.address)
    try:
        await pool.start({"mapper*": mapper, "reducer": reducer})
        async with Client(first.address) as client:
            run = await client.run(map_reduce(agent("mapper"), agent("reducer"), "t", ["a", "b"]))
            assert run.status == types_pb2.RUN_STATUS_SUCCEEDED
            assert run.result.map_reduce.map_outputs[1].outcome.evidence[0] == evidence
            events = [e async for e in client.watch(run.run_id)]
            assert events[-1].run_finished.result.map_reduce.map_outputs[0].outcome.evidence[0] == evidence
    finally:
        await pool.stop_all()
        await first.stop(grace=0.5)
    second = Sidecar(settings)
    await second.start()
    try:
        async with Client(second.address) as client:
            again = await client.get_run(run.run_id)
            assert again.result == run.result
            replayed = [e async for e in client.watch(run.run_id)]
            assert [e.seq for e in replayed] == [e.seq for e in events]
    finally:
        await second.stop(grace=0.5)
