"""Faithful to the originals (issue 12, section 8; shared/reference/seeds/).

tirea keeps every decision sent before the agent waits, in order, and each is
delivered once; watchers always see the suspended call before its decision.
car-multi's map-reduce cuts summaries to 300 bytes at a char boundary, keeps a
failed reducer's answer, and runs the reducer over an empty item list. The
reducer's task stays within max_field_bytes whatever the item count (issue 12,
section 2)."""

from __future__ import annotations

from typing import Any

import pytest

from carsvc._proto.car.v1 import events_pb2, types_pb2, worker_pb2
from carsvc.client import Client, agent, map_reduce, resume, single
from carsvc.config import Settings
from carsvc.domain.decisions import CANCEL, DecisionBox
from carsvc.domain.errors import ResourceExhausted
from carsvc.patterns.map_reduce import reduce_task, truncate
from carsvc.patterns.prompts import MAP_SUMMARIES_OMITTED_LINE, MAP_SUMMARY_LINE, REDUCE_TASK
from carsvc.worker import AgentContext, Decision, Result
from tests.conftest import TEST_SETTINGS, Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED


# -- decisions: every early decision kept, first in first out, each once --------------------------


def decision(target: str, decision_id: str) -> types_pb2.ToolCallDecision:
    return resume(target, decision_id, decision_id=decision_id)


def suspend_call(tool_call_id: str, arguments: Any = None, timeout_ms: int = 0) -> worker_pb2.SuspendToolCall:
    call = worker_pb2.SuspendToolCall(tool_call_id=tool_call_id, tool_name="shell", timeout_ms=timeout_ms)
    if arguments is not None:
        call.arguments.string_value = arguments
    return call


def _box(emit: Recorder, max_unmatched: int = Settings().max_unmatched_decisions) -> DecisionBox:
    return DecisionBox(emit, max_unmatched=max_unmatched, default_timeout=Settings().suspension_timeout_s)


class Recorder:
    def __init__(self) -> None:
        self.events: list[events_pb2.RunEvent] = []

    def __call__(self, event: events_pb2.RunEvent) -> events_pb2.RunEvent:
        self.events.append(event)
        return event

    def kinds(self) -> list[str]:
        return [e.WhichOneof("kind") or "" for e in self.events]


async def test_early_decisions_for_one_call_are_all_kept_and_delivered_in_order() -> None:
    box = _box(Recorder())
    outcome = box.submit([decision("call-1", "d1"), decision("call-1", "d2"), decision("call-2", "d3")])
    assert outcome.queued == ["d1", "d2", "d3"]
    first = await box.suspend("a", "as-1", suspend_call("call-1"))
    second = await box.suspend("a", "as-1", suspend_call("call-1"))
    assert (first.decision_id, second.decision_id) == ("d1", "d2")
    assert (await box.suspend("a", "as-1", suspend_call("call-2"))).decision_id == "d3"
    # Each exactly once: a third suspension waits (and here times out).
    third = await box.suspend("a", "as-1", suspend_call("call-1", timeout_ms=1))
    assert third.action == CANCEL and third.decision_id == "timeout_call-1"
    # A repeat of a delivered decision is a duplicate, not queued again.
    assert box.submit([decision("call-1", "d1")]).duplicates == ["d1"]


async def test_the_bound_on_unmatched_decisions_counts_every_one() -> None:
    box = _box(Recorder(), max_unmatched=3)
    assert box.submit([decision("call-1", f"d{i}") for i in range(3)]).queued == ["d0", "d1", "d2"]
    with pytest.raises(ResourceExhausted) as refused:
        box.submit([decision("call-1", "d3")])
    assert str(refused.value) == (
        "decisions: 3 decisions already wait for a tool call that has not suspended (max 3); "
        "decision 'd3' was not kept"
    )
    await box.suspend("a", "as-1", suspend_call("call-1"))
    assert box.submit([decision("call-2", "d4")]).queued == ["d4"]  # a slot freed up


async def test_an_early_decision_is_recorded_after_its_suspended_call() -> None:
    recorder = Recorder()
    box = _box(recorder)
    box.submit([decision("call-1", "d1")])
    got = await box.suspend("ops", "as-1", suspend_call("call-1", arguments="rm -rf build"))
    assert got.decision_id == "d1"
    assert recorder.kinds() == ["tool_call_suspended", "tool_call_resumed"]
    suspended = recorder.events[0].tool_call_suspended
    assert (suspended.agent, suspended.assignment_id, suspended.tool_call_id, suspended.tool_name) == (
        "ops", "as-1", "call-1", "shell"
    )
    assert suspended.arguments.string_value == "rm -rf build"
    assert recorder.events[1].tool_call_resumed.decision.decision_id == "d1"


async def test_two_early_decisions_reach_two_suspensions_end_to_end(client: Client, workers: Workers) -> None:
    got: list[Decision] = []

    async def ops(ctx: AgentContext) -> str:
        for _ in range(2):
            got.append(await ctx.suspend_tool_call("call-1", "shell", {"n": len(got)}, timeout=5))
        return ",".join(str(d.result) for d in got)

    await workers.start({"ops": ops})
    handle = await client.start_run(
        single(agent("ops", tools=["shell"]), "t"),
        agent_id="alice",
        initial_decisions=[resume("call-1", "first", decision_id="d1"), resume("call-1", "second", decision_id="d2")],
    )
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED and run.result.single.output.answer == "first,second"
    events = [e async for e in client.watch(handle.run_id)]
    calls = [
        (e.WhichOneof("kind"), e.tool_call_resumed.decision.decision_id)
        for e in events
        if e.WhichOneof("kind") in ("tool_call_suspended", "tool_call_resumed")
    ]
    assert calls == [
        ("tool_call_suspended", ""), ("tool_call_resumed", "d1"),
        ("tool_call_suspended", ""), ("tool_call_resumed", "d2"),
    ]


# -- map-reduce: car-multi's truncate, reducer answer, empty items --------------------------------


def test_truncate_cuts_bytes_at_a_character_boundary() -> None:
    assert truncate("abc", 300) == "abc"
    assert truncate("é" * 200, 300) == "é" * 150  # 2 bytes each: 300 bytes exactly
    assert truncate("a" + "🙂" * 100, 300) == "a" + "🙂" * 74  # 297 bytes: the 75th would straddle 300
    assert truncate("x" * 301, 300) == "x" * 300
    assert truncate("€" * 101, 300) == "€" * 100  # 3 bytes each


async def test_summaries_are_cut_to_300_bytes(client: Client, workers: Workers) -> None:
    tasks: list[str] = []

    async def mapper(ctx: AgentContext) -> str:
        return "é" * 200 if ctx.name.endswith("_0") else "a" + "🙂" * 100

    async def reducer(ctx: AgentContext) -> str:
        tasks.append(ctx.task)
        return "done"

    await workers.start({"m": mapper, "r": reducer})
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", ["x", "y"]))
    assert run.status == SUCCEEDED
    assert tasks == [REDUCE_TASK.format(task="t", count=2, summaries="\n".join([
        MAP_SUMMARY_LINE.format(name="m_0", answer="é" * 150),
        MAP_SUMMARY_LINE.format(name="m_1", answer="a" + "🙂" * 74),
    ]))]


async def test_a_failed_reducer_keeps_its_answer(client: Client, workers: Workers) -> None:
    async def reducer(ctx: AgentContext) -> types_pb2.AgentOutput:
        return types_pb2.AgentOutput(answer="partial reduction", error="ran out of context")

    async def mapper(ctx: AgentContext) -> str:
        return "mapped"

    await workers.start({"m": mapper, "r": reducer})
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", ["x"]))
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert run.termination_detail == "reducer 'r' failed: ran out of context"
    assert run.result.map_reduce.reduced_answer == "partial reduction"
    assert run.result.map_reduce.reducer_output.error == "ran out of context"


async def test_an_empty_item_list_runs_the_reducer_over_zero_results(client: Client, workers: Workers) -> None:
    tasks: list[str] = []

    async def reducer(ctx: AgentContext) -> Result:
        tasks.append(ctx.task)
        return Result(answer="nothing to combine")

    await workers.start({"r": reducer})
    run = await client.run(map_reduce(agent("m"), agent("r"), "Summarize", []))
    assert run.status == SUCCEEDED
    assert tasks == [
        "Original task: Summarize\n\nResults from 0 sub-agents:\n\n\nCombine these into a single coherent result."
    ]
    result = run.result.map_reduce
    assert (result.reduced_answer, len(result.map_outputs), result.all_succeeded) == ("nothing to combine", 0, True)


# -- the reducer's task is bounded by construction ----------------------------------------------------


def lines_of(count: int, answer_bytes: int = 300) -> list[str]:
    return [MAP_SUMMARY_LINE.format(name=f"m_{i}", answer="x" * answer_bytes) for i in range(count)]


def test_a_reducer_task_that_fits_is_exactly_car_multis() -> None:
    lines = lines_of(3)
    assert reduce_task("t", 5, lines, 1 << 20) == REDUCE_TASK.format(task="t", count=5, summaries="\n".join(lines))
    assert reduce_task("t", 0, [], 10) == REDUCE_TASK.format(task="t", count=0, summaries="")


@pytest.mark.parametrize("limit", [200, 1_000, 4_096, 65_536, 1 << 20])
@pytest.mark.parametrize("count", [1, 10, 1_000, 100_000])
def test_the_reducer_task_stays_within_the_limit_whatever_the_item_count(limit: int, count: int) -> None:
    lines = lines_of(count)
    task = reduce_task("Summarize the repository", count, lines, limit)
    assert len(task.encode()) <= limit
    full = REDUCE_TASK.format(task="Summarize the repository", count=count, summaries="\n".join(lines))
    if len(full.encode()) <= limit:
        assert task == full
        return
    # The first lines, in order, then one line counting the rest.
    summaries = task.split("sub-agents:\n", 1)[1].rsplit("\n\nCombine", 1)[0].split("\n")
    kept = summaries[:-1]
    assert kept == lines[: len(kept)]
    assert summaries[-1] == MAP_SUMMARIES_OMITTED_LINE.format(omitted=count - len(kept), limit=limit)
    # As many as fit: one more would not have.
    if len(kept) < count:
        longer = REDUCE_TASK.format(
            task="Summarize the repository", count=count,
            summaries="\n".join([*lines[: len(kept) + 1], MAP_SUMMARIES_OMITTED_LINE.format(
                omitted=count - len(kept) - 1, limit=limit)]),
        )
        assert len(longer.encode()) > limit - 2  # within a digit of the count's width


def test_an_original_task_at_the_limit_leaves_only_the_count() -> None:
    task = reduce_task("t" * 1000, 3, lines_of(3), 1000)
    assert task == REDUCE_TASK.format(
        task="t" * 1000, count=3, summaries=MAP_SUMMARIES_OMITTED_LINE.format(omitted=3, limit=1000)
    )


@pytest.mark.parametrize("settings", [TEST_SETTINGS.replace(max_field_bytes=4_096)])
async def test_a_reducer_gets_a_bounded_task_end_to_end(
    client: Client, workers: Workers, settings: Settings
) -> None:
    tasks: list[str] = []

    async def mapper(ctx: AgentContext) -> str:
        return "y" * 400

    async def reducer(ctx: AgentContext) -> str:
        tasks.append(ctx.task)
        return "combined"

    await workers.start({"m": mapper, "r": reducer}, max_in_flight=16)
    run = await client.run(map_reduce(agent("m"), agent("r"), "t", [str(i) for i in range(60)], max_concurrent=16))
    assert run.status == SUCCEEDED
    (task,) = tasks
    assert len(task.encode()) <= 4_096
    assert "Results from 60 sub-agents:\n- [m_0] " + "y" * 300 + "\n" in task
    kept = task.count("\n- [m_")
    assert f"\n- ({60 - kept} more results left out to keep this task within 4096 bytes)\n\nCombine" in task
    # Every mapper output is still whole in the result.
    assert [len(o.answer) for o in run.result.map_reduce.map_outputs] == [400] * 60
