"""Single-agent and map-reduce runs served by real workers over real streams."""

from __future__ import annotations

import asyncio

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, map_reduce, registered, single
from carsvc.patterns.prompts import MAP_ITEM_TASK, REDUCE_TASK
from carsvc.server import Sidecar
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED


async def echo(ctx: AgentContext) -> str:
    return f"{ctx.name} did: {ctx.task}"


async def test_single_agent_run(client: Client, workers: Workers) -> None:
    await workers.start({"writer": echo})
    run = await client.run(single(agent("writer", "You write."), "write a haiku"))
    assert run.status == SUCCEEDED
    assert run.termination_reason == "completed"
    output = run.result.single.output
    assert output.name == "writer"
    assert output.answer == "writer did: write a haiku"
    assert not output.HasField("error")
    assert run.pattern == "single"


async def test_single_agent_failure_fails_the_run(client: Client, workers: Workers) -> None:
    async def broken(ctx: AgentContext) -> str:
        raise RuntimeError("model unavailable")

    await workers.start({"writer": broken})
    run = await client.run(single(agent("writer"), "anything"))
    assert run.status == FAILED
    assert run.termination_reason == "agent_failed"
    assert run.result.single.output.error == "RuntimeError: model unavailable"


async def test_worker_sees_spec_and_run_identity(client: Client, workers: Workers) -> None:
    seen: list[AgentContext] = []

    async def record(ctx: AgentContext) -> str:
        seen.append(ctx)
        return "ok"

    await workers.start({"writer": record})
    ref = agent("writer", "system!", tools=["search"], max_turns=4, metadata={"model": "m1"})
    handle = await client.start_run(single(ref, "t"), thread_id="thread-1", agent_id="owner")
    await client.wait(handle.run_id)
    (ctx,) = seen
    assert ctx.run_id == handle.run_id
    assert ctx.thread_id == "thread-1"
    assert ctx.attempt == 1
    assert ctx.spec.system_prompt == "system!"
    assert list(ctx.spec.tools) == ["search"]
    assert ctx.spec.max_turns == 4
    assert ctx.spec.metadata["model"] == "m1"


async def test_registered_agent_by_name(client: Client, workers: Workers) -> None:
    await workers.start({"writer": echo})
    await client.register_agent(types_pb2.AgentSpec(name="writer", system_prompt="registered prompt"))
    run = await client.run(single(registered("writer"), "go"))
    assert run.status == SUCCEEDED
    assert run.result.single.output.answer == "writer did: go"


async def test_map_reduce_outputs_names_order_and_prompts(client: Client, workers: Workers) -> None:
    tasks: dict[str, str] = {}

    async def mapper(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        await asyncio.sleep(0.01 * (3 - int(ctx.name.rsplit("_", 1)[1])))  # finish out of order
        return f"{ctx.name} processed"

    async def reducer(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        return "combined"

    await workers.start({"summarizer": mapper, "combiner": reducer}, max_in_flight=4)
    items = ["file_a.rs", "file_b.rs", "file_c.rs"]
    run = await client.run(map_reduce(agent("summarizer"), agent("combiner"), "summarize codebase", items))
    assert run.status == SUCCEEDED
    result = run.result.map_reduce
    assert [o.name for o in result.map_outputs] == ["summarizer_0", "summarizer_1", "summarizer_2"]
    assert [o.answer for o in result.map_outputs] == [f"summarizer_{i} processed" for i in range(3)]
    assert result.all_succeeded
    assert result.reduced_answer == "combined"
    assert tasks["summarizer_1"] == "summarize codebase\n\nProcess this item: file_b.rs"
    assert tasks["summarizer_1"] == MAP_ITEM_TASK.format(task="summarize codebase", item="file_b.rs")
    assert tasks["combiner"] == (
        "Original task: summarize codebase\n\nResults from 3 sub-agents:\n"
        "- [summarizer_0] summarizer_0 processed\n"
        "- [summarizer_1] summarizer_1 processed\n"
        "- [summarizer_2] summarizer_2 processed\n\n"
        "Combine these into a single coherent result."
    )
    assert REDUCE_TASK.startswith("Original task: {task}")


async def test_reducer_summaries_cut_at_300_chars_and_skip_failures(client: Client, workers: Workers) -> None:
    reducer_task: list[str] = []

    async def mapper(ctx: AgentContext) -> str:
        if ctx.name.endswith("_1"):
            raise ValueError("bad item")
        return "x" * 500

    async def reducer(ctx: AgentContext) -> str:
        reducer_task.append(ctx.task)
        return "done"

    await workers.start({"m": mapper, "r": reducer}, max_in_flight=2)
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", ["a", "b"]))
    (task,) = reducer_task
    assert "Results from 2 sub-agents:" in task
    assert f"- [m_0] {'x' * 300}\n" in task
    assert "m_1" not in task
    assert not run.result.map_reduce.all_succeeded


async def test_failing_mapper_keeps_its_index(client: Client, workers: Workers) -> None:
    """Seed: panicking_mapper_keeps_original_item_index (mapper 1 fails first)."""
    failed_first = asyncio.Event()

    async def mapper(ctx: AgentContext) -> str:
        if ctx.name == "mapper_0":
            await failed_first.wait()
            return "mapper 0 completed"
        failed_first.set()
        raise RuntimeError("mapper 1 panicked first")

    async def reducer(ctx: AgentContext) -> str:
        return "reduced"

    await workers.start({"mapper": mapper, "reducer": reducer}, max_in_flight=2)
    run = await client.run(
        map_reduce(agent("mapper"), agent("reducer"), "preserve mapper order", ["slow first", "fast panic"],
                   max_concurrent=2)
    )
    outputs = run.result.map_reduce.map_outputs
    assert [o.name for o in outputs] == ["mapper_0", "mapper_1"]
    assert outputs[0].answer == "mapper 0 completed" and not outputs[0].HasField("error")
    assert "panicked" in outputs[1].error
    assert run.status == SUCCEEDED  # a mapper failure is in the result, not a run failure


async def test_max_concurrent_bounds_running_mappers(client: Client, workers: Workers) -> None:
    running = 0
    peak = 0

    async def mapper(ctx: AgentContext) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return "ok"

    await workers.start({"m": mapper, "r": echo}, max_in_flight=16)
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(12)], max_concurrent=3))
    assert run.status == SUCCEEDED
    assert peak == 3
    # Default is 5.
    peak = 0
    await client.run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(12)]))
    assert peak == 5


async def test_run_progress_events_and_state_from_workers(client: Client, workers: Workers) -> None:
    async def mapper(ctx: AgentContext) -> str:
        ctx.progress("halfway", 0.5)
        ctx.emit("note", {"item": ctx.name})
        await ctx.state.set(ctx.name, {"n": 1})
        return "ok"

    await workers.start({"m": mapper, "r": echo}, max_in_flight=4)
    handle = await client.start_run(map_reduce(agent("m"), agent("r"), "t", ["a", "b"]), thread_id="T")
    kinds = [e.WhichOneof("kind") async for e in client.watch(handle.run_id)]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert kinds.count("progress") == 2 and kinds.count("custom") == 2
    assert kinds.count("agent_started") == 3 and kinds.count("agent_finished") == 3
    assert "budget_updated" in kinds
    assert await client.get_state("T", "m_0") == {"n": 1}


async def test_list_and_get_runs(client: Client, workers: Workers, sidecar: Sidecar) -> None:
    await workers.start({"writer": echo})
    a = await client.run(single(agent("writer"), "1"), thread_id="t1", agent_id="alice")
    b = await client.run(single(agent("writer"), "2"), thread_id="t2", agent_id="bob")
    assert [r.run_id for r in await client.list_runs()] == [b.run_id, a.run_id]
    assert [r.run_id for r in await client.list_runs(agent_id="alice")] == [a.run_id]
    assert [r.run_id for r in await client.list_runs(page_size=1)] == [b.run_id, a.run_id]
    by_thread = await client.get_run(thread_id="t2")
    assert by_thread.run_id == b.run_id and by_thread.result.single.output.answer == "writer did: 2"
