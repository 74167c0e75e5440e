"""Sizes that fit together: every answer a client gets fits gRPC's default 4 MiB
receive limit, a result too large for one message is read in pieces, and keys,
scopes, labels and the registry are bounded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import (
    patterns_pb2,
    registry_pb2,
    registry_pb2_grpc,
    runs_pb2,
    runs_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)
from carsvc.client import Client, agent, map_reduce, single
from carsvc.domain.bounds import MAX_KEY_BYTES, MAX_SCOPE_CHARS
from carsvc.domain.registry import MAX_TOTAL_BYTES
from carsvc.server import Sidecar
from carsvc.worker import AgentContext, RuntimeCallError
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
KIB = 1024
MIB = 1024 * KIB


@pytest.fixture
async def plain(sidecar: Sidecar) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with gRPC's default options (4 MiB receive), as a raw-stub user has."""
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        yield channel


async def big_mapper(ctx: AgentContext) -> str:
    return ctx.name + ":" + "x" * (512 * KIB)


async def reducer(ctx: AgentContext) -> str:
    return f"combined {len(ctx.task)} bytes"


async def test_a_result_larger_than_any_message_is_read_in_pieces(
    sidecar: Sidecar, client: Client, workers: Workers, plain: grpc.aio.Channel
) -> None:
    """40 mappers answering 512 KiB each: a 20 MB result, more than the sidecar's
    own 16 MiB message limit. GetRun, ListRuns with results, WatchRun and
    Submit all answer within 4 MiB, and the result reads back whole."""
    await workers.start({"mapper*": big_mapper, "reducer": reducer}, max_in_flight=8)
    handle = await client.start_run(
        map_reduce(agent("mapper"), agent("reducer"), "t", [str(i) for i in range(40)], max_concurrent=8)
    )
    runs = runs_pb2_grpc.RunServiceStub(plain)
    events = [e async for batch in runs.WatchRun(runs_pb2.WatchRunRequest(run_id=handle.run_id)) for e in batch.events]
    finished = events[-1].run_finished
    assert finished.status == SUCCEEDED
    assert finished.result_omitted and not finished.HasField("result")
    assert finished.result_bytes > 20 * MIB

    got = (await runs.GetRun(runs_pb2.GetRunRequest(run_id=handle.run_id))).run
    assert got.result_omitted and got.result_bytes == finished.result_bytes and not got.HasField("result")
    listed = await runs.ListRuns(runs_pb2.ListRunsRequest(include_results=True))
    assert [r.run_id for r in listed.runs] == [handle.run_id]
    assert listed.runs[0].result_omitted

    pieces = [r async for r in runs.ReadRunResult(runs_pb2.ReadRunResultRequest(run_id=handle.run_id))]
    assert len(pieces) > 1 and all(p.total_bytes == finished.result_bytes for p in pieces)
    assert [p.offset for p in pieces] == [sum(len(q.chunk) for q in pieces[:i]) for i in range(len(pieces))]
    result = patterns_pb2.RunResult.FromString(b"".join(p.chunk for p in pieces))
    outputs = result.map_reduce.map_outputs
    assert [o.name for o in outputs] == [f"mapper_{i}" for i in range(40)]
    assert all(len(o.answer) > 512 * KIB for o in outputs)

    # Resuming a broken read from an offset.
    tail = [r async for r in runs.ReadRunResult(runs_pb2.ReadRunResultRequest(run_id=handle.run_id, offset=5))]
    assert b"".join(p.chunk for p in tail) == b"".join(p.chunk for p in pieces)[5:]
    with pytest.raises(grpc.aio.AioRpcError) as beyond:
        async for _ in runs.ReadRunResult(
            runs_pb2.ReadRunResultRequest(run_id=handle.run_id, offset=finished.result_bytes + 1)
        ):
            pass
    assert beyond.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "offset" in (beyond.value.details() or "")

    # The SDK fills the result in by itself.
    whole = await client.get_run(handle.run_id)
    assert whole.result == result
    async with client.run_stream() as stream:
        answered = await stream.run(
            map_reduce(agent("mapper"), agent("reducer"), "t", [str(i) for i in range(8)], max_concurrent=8),
        )
    assert answered.result_omitted and len(answered.result.map_reduce.map_outputs) == 8


async def test_read_run_result_of_an_active_or_unknown_run_is_refused(
    sidecar: Sidecar, client: Client, plain: grpc.aio.Channel
) -> None:
    runs = runs_pb2_grpc.RunServiceStub(plain)
    handle = await client.start_run(single(agent("nobody-serves-this"), "t"))
    for run_id, code in ((handle.run_id, grpc.StatusCode.FAILED_PRECONDITION), ("nope", grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in runs.ReadRunResult(runs_pb2.ReadRunResultRequest(run_id=run_id)):
                pass
        assert refused.value.code() == code
        assert "run_id" in (refused.value.details() or "")
    await client.cancel(handle.run_id)


async def test_a_small_result_stays_inline(sidecar: Sidecar, client: Client, workers: Workers) -> None:
    await workers.start({"echo": reducer})
    run = await client.run(single(agent("echo"), "hi"))
    assert not run.result_omitted and run.result_bytes == run.result.ByteSize() > 0


async def test_list_runs_pages_end_before_a_client_could_not_receive_them(
    sidecar: Sidecar, client: Client, workers: Workers, plain: grpc.aio.Channel
) -> None:
    """Ten runs of ~900 KiB results each (inline, under max_inline_result_bytes):
    with include_results a page stops before 4 MiB and the rest follow."""

    async def large(ctx: AgentContext) -> str:
        return "y" * (900 * KIB)

    await workers.start({"large": large})
    stream = client.run_stream()
    for _ in range(10):
        finished = await stream.run(single(agent("large"), "t"))
        assert not finished.result_omitted
    await stream.close()
    runs = runs_pb2_grpc.RunServiceStub(plain)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await runs.ListRuns(runs_pb2.ListRunsRequest(include_results=True, page_token=token))
        assert page.ByteSize() < 4 * MIB
        seen.extend(r.run_id for r in page.runs)
        pages += 1
        if not (token := page.next_page_token):
            break
    assert len(seen) == len(set(seen)) == 10
    assert pages >= 3


# -- state keys and scopes ---------------------------------------------------------------


async def test_state_keys_and_scopes_are_bounded(sidecar: Sidecar, plain: grpc.aio.Channel) -> None:
    state = state_pb2_grpc.StateServiceStub(plain)
    value = struct_pb2.Value(number_value=1)
    cases = [
        (state_pb2.SetRequest(scope="s", key="k" * (MAX_KEY_BYTES + 1), value=value), "key"),
        (state_pb2.SetRequest(scope="s" * (MAX_SCOPE_CHARS + 1), key="k", value=value), "scope"),
        (state_pb2.SetRequest(scope="s", key="k", value=value, writer="w" * 1000), "writer"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await state.Set(request)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (refused.value.details() or "").startswith(f"{field}: ")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await state.ListKeys(state_pb2.ListKeysRequest(scope="s" * (MAX_SCOPE_CHARS + 1)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A key of exactly the limit is fine, even in multi-byte characters.
    await state.Set(state_pb2.SetRequest(scope="s", key="é" * (MAX_KEY_BYTES // 2), value=value))


async def test_a_scope_holds_at_most_max_state_keys(sidecar_small: Sidecar) -> None:
    async with grpc.aio.insecure_channel(sidecar_small.address) as channel:
        state = state_pb2_grpc.StateServiceStub(channel)
        value = struct_pb2.Value(number_value=1)
        for i in range(50):
            await state.Set(state_pb2.SetRequest(scope="s", key=f"k{i}", value=value))
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await state.Set(state_pb2.SetRequest(scope="s", key="one-more", value=value))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_state_keys" in (full.value.details() or "")
        await state.Set(state_pb2.SetRequest(scope="s", key="k3", value=value))  # overwriting is fine
        await state.Delete(state_pb2.DeleteRequest(scope="s", key="k3"))
        await state.Set(state_pb2.SetRequest(scope="s", key="one-more", value=value))  # room again


@pytest.fixture
async def sidecar_small() -> AsyncIterator[Sidecar]:
    server = Sidecar(TEST_SETTINGS.replace(max_state_keys=50))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


async def test_list_keys_pages_by_count_and_by_bytes(sidecar: Sidecar, plain: grpc.aio.Channel) -> None:
    state = state_pb2_grpc.StateServiceStub(plain)
    value = struct_pb2.Value(number_value=1)
    keys = sorted(f"key-{i:04d}" for i in range(2500))
    for key in keys:
        await state.Set(state_pb2.SetRequest(scope="many", key=key, value=value))
    # Long keys: 1 KiB each, so a default page (1000 keys) would be ~1 MiB: it ends by bytes.
    long_keys = sorted(f"{i:04d}".ljust(MAX_KEY_BYTES, "z") for i in range(1500))
    for key in long_keys:
        await state.Set(state_pb2.SetRequest(scope="long", key=key, value=value))

    async def all_pages(scope: str, page_size: int = 0, prefix: str = "") -> list[list[str]]:
        pages: list[list[str]] = []
        token = ""
        while True:
            page = await state.ListKeys(
                state_pb2.ListKeysRequest(scope=scope, prefix=prefix, page_size=page_size, page_token=token)
            )
            pages.append(list(page.keys))
            if not (token := page.next_page_token):
                return pages

    pages = await all_pages("many")
    assert [len(p) for p in pages] == [1000, 1000, 500]
    assert [k for p in pages for k in p] == keys
    assert [len(p) for p in await all_pages("many", page_size=2000)] == [2000, 500]
    assert [k for p in await all_pages("many", prefix="key-1") for k in p] == [k for k in keys if k.startswith("key-1")]
    long_pages = await all_pages("long")
    assert len(long_pages) >= 2 and all(len(p) < 1024 for p in long_pages)
    assert [k for p in long_pages for k in p] == long_keys
    with pytest.raises(grpc.aio.AioRpcError) as too_many:
        await state.ListKeys(state_pb2.ListKeysRequest(scope="many", page_size=10_001))
    assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (too_many.value.details() or "").startswith("page_size: ")


# -- labels and the registry ----------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({f"k{i}": "v" for i in range(65)}, id="too-many"),
        pytest.param({"k" * 257: "v"}, id="long-key"),
        pytest.param({"k": "v" * 4097}, id="long-value"),
    ],
)
async def test_labels_are_a_few_short_strings(
    sidecar: Sidecar, plain: grpc.aio.Channel, labels: dict[str, str]
) -> None:
    runs = runs_pb2_grpc.RunServiceStub(plain)
    request = runs_pb2.StartRunRequest(single=single(agent("a"), "t"), labels=labels)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.StartRun(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith("labels: ")


async def test_the_registry_always_lists_in_one_message(sidecar: Sidecar, plain: grpc.aio.Channel) -> None:
    registry = registry_pb2_grpc.RegistryServiceStub(plain)
    prompt = "p" * (1000 * KIB)
    registered = 0
    with pytest.raises(grpc.aio.AioRpcError) as full:
        for i in range(10):
            spec = types_pb2.AgentSpec(name=f"agent{i}", system_prompt=prompt)
            await registry.RegisterAgent(registry_pb2.RegisterAgentRequest(agent=spec))
            registered += 1
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert registered == MAX_TOTAL_BYTES // (1000 * KIB)
    listed = await registry.ListAgents(registry_pb2.ListAgentsRequest())
    assert len(listed.agents) == registered
    # Unregistering frees the room again; replacing accounts for the old spec.
    await registry.UnregisterAgent(registry_pb2.UnregisterAgentRequest(name="agent0"))
    await registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent=types_pb2.AgentSpec(name="agent0", system_prompt=prompt))
    )
    await registry.RegisterAgent(
        registry_pb2.RegisterAgentRequest(agent=types_pb2.AgentSpec(name="agent0", system_prompt=prompt), replace=True)
    )
    # An oversized prompt is refused before it counts.
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(agent=types_pb2.AgentSpec(name="huge", system_prompt="p" * (2 * MIB)))
        )
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (big.value.details() or "").startswith("agent.system_prompt: ")


# -- map-reduce at scale ---------------------------------------------------------------


async def small_mapper(ctx: AgentContext) -> str:
    return f"{ctx.name} done"


async def measuring_reducer(ctx: AgentContext) -> str:
    return str(len(ctx.task.encode()))


async def _map_reduce_items(client: Client, workers: Workers, count: int) -> None:
    await workers.start({"mapper*": small_mapper, "reducer": measuring_reducer}, max_in_flight=256)
    run = await client.run(
        map_reduce(agent("mapper"), agent("reducer"), "t", [str(i) for i in range(count)], max_concurrent=256)
    )
    assert run.status == SUCCEEDED, run.termination_detail
    result = run.result.map_reduce
    assert len(result.map_outputs) == count
    assert result.map_outputs[-1].answer == f"mapper_{count - 1} done"
    # The reducer's task is bounded by construction, whatever the item count.
    assert int(result.reduced_answer) <= TEST_SETTINGS.max_field_bytes


async def test_a_20000_item_map_reduce_runs_and_reads_back(
    sidecar: Sidecar, client: Client, workers: Workers
) -> None:
    """Was: Client.run() raised RESOURCE_EXHAUSTED (a 4.21 MB answer)."""
    await _map_reduce_items(client, workers, 20_000)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_the_documented_maximum_of_100000_items(sidecar: Sidecar, client: Client, workers: Workers) -> None:
    """Was: the reducer's 5.58 MB task went over the worker channel's 4 MiB limit,
    and the run FAILED with "worker ... was lost"."""
    await _map_reduce_items(client, workers, 100_000)


async def test_a_worker_is_held_to_the_same_key_bounds(sidecar_small: Sidecar) -> None:
    """Keys an agent writes are bounded like a client's: length, and max_state_keys per scope."""
    seen: list[tuple[grpc.StatusCode, str]] = []

    async def writer(ctx: AgentContext) -> str:
        for key in ["k" * (MAX_KEY_BYTES + 1), *(f"k{i}" for i in range(51))]:
            try:
                await ctx.state.set(key, 1)
            except RuntimeCallError as err:
                seen.append((err.code, str(err)))
        return "done"

    pool = Workers(sidecar_small.address)
    try:
        await pool.start({"writer": writer})
        async with Client(sidecar_small.address) as client:
            run = await client.run(single(agent("writer"), "t"), thread_id="keys")
            assert run.status == SUCCEEDED
            listed = await client.state.ListKeys(state_pb2.ListKeysRequest(scope="keys"))
            assert len(listed.keys) == 50
    finally:
        await pool.stop_all()
    assert [code for code, _ in seen] == [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert seen[0][1].startswith("calls[0].state_set.key: is 1025 bytes")
    assert "max_state_keys" in seen[1][1]
