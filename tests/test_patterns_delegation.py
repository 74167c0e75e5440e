"""Patterns whose agents call back into the sidecar through the worker stream:
delegator, spawn_subtask and advisor; over real workers (the wire), and
in-process against scripted agents (the patterns' logic). Conformance items 31-35."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.client import Client, advisor, agent, delegator, single, spawn_subtask
from carsvc.patterns.advisor import parse_advice
from carsvc.patterns.prompts import ADVISOR_TASK, SUBTASK_SYSTEM_PROMPT
from carsvc.testing import PatternEnvironment, ScriptedAgent
from carsvc.values import from_value
from carsvc.worker import AgentContext, RuntimeCallError
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED
V = patterns_pb2


# -- delegator -------------------------------------------------------------------------------


async def test_delegator_runs_named_specialists_on_their_workers(client: Client, workers: Workers) -> None:
    seen: dict[str, object] = {}

    async def lead(ctx: AgentContext) -> str:
        seen["tools"] = list(ctx.spec.tools)
        seen["specialists"] = from_value(ctx.spec.metadata.fields["specialists"])
        code = await ctx.delegate("coder", "write fizzbuzz")
        prose = await ctx.delegate("writer", "explain it")
        return f"{code.answer} + {prose.answer}"

    async def specialist(ctx: AgentContext) -> str:
        seen[ctx.name] = ctx.task
        return f"{ctx.name} did it"

    lead_worker = await workers.start({"lead": lead})
    await workers.start({"coder": specialist, "writer": specialist}, max_in_flight=2)  # another worker
    handle = await client.start_run(
        delegator(agent("lead", tools=["search"]), [agent("coder"), agent("writer")], "ship fizzbuzz")
    )
    events = [e async for e in client.watch(handle.run_id)]
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED and run.pattern == "delegator"
    result = run.result.delegator
    assert result.final_answer == "coder did it + writer did it"
    assert [(d.specialist, d.subtask, d.result, d.success) for d in result.delegations] == [
        ("coder", "write fizzbuzz", "coder did it", True),
        ("writer", "explain it", "writer did it", True),
    ]
    assert seen == {
        "tools": ["search", "delegate"],  # the pattern grants the delegate tool
        "specialists": ["coder", "writer"],
        "coder": "write fizzbuzz",
        "writer": "explain it",
    }
    assert lead_worker.completed == 1  # the specialists ran elsewhere
    made = [e.delegation.record.specialist for e in events if e.WhichOneof("kind") == "delegation"]
    assert made == ["coder", "writer"]
    finished = [e.agent_finished.role for e in events if e.WhichOneof("kind") == "agent_finished"]
    assert finished == ["specialist", "specialist", "main"]


async def test_cancelling_a_delegator_run_cancels_its_specialists(client: Client, workers: Workers) -> None:
    specialist_started = asyncio.Event()
    specialist_cancelled = asyncio.Event()

    async def lead(ctx: AgentContext) -> str:
        return (await ctx.delegate("slow", "forever")).answer

    async def slow(ctx: AgentContext) -> str:
        specialist_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            specialist_cancelled.set()
            raise
        return "late"

    await workers.start({"lead": lead, "slow": slow}, max_in_flight=2)
    handle = await client.start_run(delegator(agent("lead"), [agent("slow")], "t"))
    await asyncio.wait_for(specialist_started.wait(), 5)
    await client.cancel(handle.run_id, wait=True)
    await asyncio.wait_for(specialist_cancelled.wait(), 5)
    assert (await client.get_run(handle.run_id)).status == CANCELLED


# -- spawn_subtask -----------------------------------------------------------------------------


async def test_spawned_subagents_get_a_subset_of_the_main_agents_tools(client: Client, workers: Workers) -> None:
    """Items 33 and 34: a tool outside the main agent's set, or spawn_subtask
    itself, is refused before anything runs; sub-agents never hold spawn_subtask
    and cannot spawn."""
    refusals: list[tuple[grpc.StatusCode, str]] = []
    subs: list[AgentContext] = []

    async def planner(ctx: AgentContext) -> str:
        for tools in (["shell"], ["search", "spawn_subtask"]):
            try:
                await ctx.spawn_subtask("not allowed", tools)
            except RuntimeCallError as err:
                refusals.append((err.code, str(err)))
        first = await ctx.spawn_subtask("look it up", ["search"])
        second = await ctx.spawn_subtask("sum it", ["calc", "calc"], name="adder")
        return f"{first.answer}; {second.answer}"

    async def sub(ctx: AgentContext) -> str:
        subs.append(ctx)
        try:
            await ctx.spawn_subtask("deeper", [])
        except RuntimeCallError as err:
            refusals.append((err.code, "sub-agent: " + str(err)))
        return f"{ctx.name} did {ctx.task}"

    await workers.start({"planner": planner, "planner.subtask": sub}, max_in_flight=2)
    handle = await client.start_run(
        spawn_subtask(agent("planner", "You plan.", tools=["search", "calc"], metadata={"model": "m"}), "plan")
    )
    events = [e async for e in client.watch(handle.run_id)]
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED and run.pattern == "spawn_subtask"
    result = run.result.spawn_subtask
    assert result.final_answer == "planner.subtask_0 did look it up; adder did sum it"
    assert refusals[:2] == [
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "spawn_subtask.tools: tool 'shell' is not one of the main agent's tools (search, calc)",
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "spawn_subtask.tools: 'spawn_subtask' is never granted to a sub-agent (delegation depth is 1)",
        ),
    ]
    assert [code for code, _ in refusals[2:]] == [grpc.StatusCode.PERMISSION_DENIED] * 2
    assert all("may not use tool 'spawn_subtask'" in message for _, message in refusals[2:])
    first, second = subs
    assert list(first.spec.tools) == ["search"] and list(second.spec.tools) == ["calc"]
    assert first.agent == "planner.subtask" and first.name == "planner.subtask_0"
    assert first.spec.system_prompt == SUBTASK_SYSTEM_PROMPT.format(parent="planner")
    assert first.spec.metadata["model"] == "m"
    assert [(r.name, r.task, list(r.tools), r.success) for r in result.subtasks] == [
        ("planner.subtask_0", "look it up", ["search"], True),
        ("adder", "sum it", ["calc"], True),
    ]
    spawned = [e.subtask_spawned.record.name for e in events if e.WhichOneof("kind") == "subtask_spawned"]
    assert spawned == ["planner.subtask_0", "adder"]


# -- advisor -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "kind", "text"),
    [
        ('{"verdict": "continue", "rationale": "on track"}', V.ADVISOR_VERDICT_KIND_CONTINUE, "on track"),
        ('{"verdict": "plan", "guidance": "split it"}', V.ADVISOR_VERDICT_KIND_PLAN, "split it"),
        ('Sure:\n```json\n{"verdict": "Correction", "guidance": "fix"}\n```', V.ADVISOR_VERDICT_KIND_CORRECTION, "fix"),
        ('{"verdict": "stop", "reason": "done"}', V.ADVISOR_VERDICT_KIND_STOP, "done"),
        ('{"verdict": "uncertain", "reason": "unclear"}', V.ADVISOR_VERDICT_KIND_UNCERTAIN, "unclear"),
        ('{"verdict": "plan"}', V.ADVISOR_VERDICT_KIND_UNCERTAIN, 'malformed advisor verdict: {"verdict": "plan"}'),
        ('{"verdict": "yolo", "reason": "x"}', V.ADVISOR_VERDICT_KIND_UNCERTAIN, None),
        ("keep going!", V.ADVISOR_VERDICT_KIND_UNCERTAIN, "malformed advisor verdict: keep going!"),
    ],
)
def test_advisor_verdict_parsing(reply: str, kind: int, text: str | None) -> None:
    """Item 32: malformed or incomplete advice is uncertain."""
    verdict = parse_advice(reply)
    assert verdict.kind == kind
    if text is not None:
        assert verdict.text == text


async def test_advisor_consultations_are_counted_and_bounded(client: Client, workers: Workers) -> None:
    """Item 31: `used` grows per consultation; past max_uses the call fails with
    'advisor exhausted: used N of M ...'."""
    seen: dict[str, object] = {}

    async def executor(ctx: AgentContext) -> str:
        seen["tools"] = list(ctx.spec.tools)
        await ctx.state.set("plan", "draft")
        first = await ctx.consult_advisor("should I continue?")
        second = await ctx.consult_advisor("and now?")
        try:
            await ctx.consult_advisor("one more?")
        except RuntimeCallError as err:
            seen["exhausted"] = (err.code, str(err))
        return f"{first.used}/{first.max_uses} {second.used}/{second.max_uses} {second.verdict.text}"

    advisor_tasks: list[str] = []
    replies = iter(['{"verdict": "continue", "rationale": "fine"}', "no json here"])

    async def oracle(ctx: AgentContext) -> str:
        advisor_tasks.append(ctx.task)
        seen["advisor tools"] = list(ctx.spec.tools)
        seen["advisor reads"] = await ctx.state.get("plan")
        await ctx.state.set("plan", "hijacked")  # thrown away: the advisor never acts
        return next(replies)

    await workers.start({"exec": executor, "oracle": oracle}, max_in_flight=2)
    handle = await client.start_run(
        advisor(agent("exec"), agent("oracle", tools=["shell"]), "build it", max_uses=2), thread_id="adv"
    )
    events = [e async for e in client.watch(handle.run_id)]
    run = await client.get_run(handle.run_id)
    assert run.status == SUCCEEDED and run.pattern == "advisor"
    result = run.result.advisor
    assert result.output.answer == "1/2 2/2 malformed advisor verdict: no json here"
    assert seen["exhausted"] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "advisor exhausted: used 2 of 2 allowed consultations",
    )
    assert seen["tools"] == ["consult_advisor"]
    assert seen["advisor tools"] == []
    assert seen["advisor reads"] == "draft"
    assert await client.get_state("adv", "plan") == "draft"
    assert advisor_tasks == [
        ADVISOR_TASK.format(task="build it", prompt="should I continue?"),
        ADVISOR_TASK.format(task="build it", prompt="and now?"),
    ]
    kinds = [c.verdict.kind for c in result.consultations]
    assert kinds == [V.ADVISOR_VERDICT_KIND_CONTINUE, V.ADVISOR_VERDICT_KIND_UNCERTAIN]
    assert [c.used for c in result.consultations] == [1, 2]
    consulted = [e.advisor_consulted for e in events if e.WhichOneof("kind") == "advisor_consulted"]
    assert [(c.agent, c.consultation.used) for c in consulted] == [("exec", 1), ("exec", 2)]


# -- in-process (carsvc.testing): the patterns' logic, no wire -------------------------------


async def test_unknown_specialist_is_a_tool_error_and_a_failed_record() -> None:
    """Item 35."""
    errors: list[tuple[grpc.StatusCode, str]] = []

    async def lead(agent: ScriptedAgent) -> str:
        try:
            await agent.delegate("ghost", "boo")
        except RuntimeCallError as err:
            errors.append((err.code, str(err)))
        return "carried on"

    run = await PatternEnvironment({"lead": lead}).run(delegator(agent("lead"), [agent("coder")], "t"))
    assert run.status == SUCCEEDED and run.result.delegator.final_answer == "carried on"
    assert errors == [(grpc.StatusCode.NOT_FOUND, "unknown specialist: 'ghost' (known: coder)")]
    (record,) = run.result.delegator.delegations
    assert record.specialist == "ghost" and not record.success and record.error == "unknown specialist: 'ghost'"


async def test_only_the_main_agent_may_delegate() -> None:
    errors: list[grpc.StatusCode] = []

    async def lead(agent: ScriptedAgent) -> str:
        return (await agent.delegate("helper", "help")).answer

    async def helper(agent: ScriptedAgent) -> str:
        try:
            await agent.delegate("helper", "recurse")  # a specialist delegating further
        except RuntimeCallError as err:
            errors.append(err.code)
        return "helped"

    env = PatternEnvironment({"lead": lead, "helper": helper})
    run = await env.run(delegator(agent("lead"), [agent("helper", tools=["delegate"])], "t"))
    assert run.result.delegator.final_answer == "helped"
    assert errors == [grpc.StatusCode.PERMISSION_DENIED]
    # Outside a delegator run there is nobody to delegate to.
    run = await env.run(single(agent("lead", tools=["delegate"]), "t"))
    assert run.status == FAILED
    assert "'delegate' is not available to agents of this run's pattern" in run.result.single.output.error


async def test_concurrent_delegations_run_concurrently_and_budget_refusals_are_outputs() -> None:
    both = asyncio.Event()
    running: set[str] = set()

    async def lead(agent: ScriptedAgent) -> str:
        outs = await asyncio.gather(agent.delegate("a", "x"), agent.delegate("b", "y"), agent.delegate("a", "z"))
        return "|".join(o.answer or o.error for o in outs)

    async def specialist(agent: ScriptedAgent) -> str:
        running.add(agent.name)
        if len(running) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return agent.name

    env = PatternEnvironment({"lead": lead, "*": specialist}, budget=types_pb2.BudgetLimits(max_agents=3))
    run = await env.run(delegator(agent("lead"), [agent("a"), agent("b")], "t"))
    answers = run.result.delegator.final_answer.split("|")
    assert answers[:2] == ["a", "b"]
    assert answers[2].startswith("coordination budget exhausted: max_agents reached")
    records = run.result.delegator.delegations
    assert [r.success for r in records] == [True, True, False]  # in call order
    assert records[2].error.startswith("coordination budget exhausted:")


async def test_concurrent_spawns_run_concurrently_and_the_budget_caps_them() -> None:
    both = asyncio.Event()
    running = 0

    async def main(agent: ScriptedAgent) -> str:
        outs = await asyncio.gather(*(agent.spawn_subtask(f"part {i}") for i in range(3)))
        return "|".join(o.answer or o.error for o in outs)

    async def sub(agent: ScriptedAgent) -> str:
        nonlocal running
        running += 1
        if running == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)  # the two admitted spawns overlap
        return agent.task

    env = PatternEnvironment({"main": main, "main.subtask": sub}, budget=types_pb2.BudgetLimits(max_agents=3))
    run = await env.run(spawn_subtask(agent("main"), "t"))
    assert run.status == SUCCEEDED
    answers = run.result.spawn_subtask.final_answer.split("|")
    assert answers[:2] == ["part 0", "part 1"]  # gated in call order
    assert answers[2].startswith("coordination budget exhausted: max_agents reached")
    assert [r.success for r in run.result.spawn_subtask.subtasks] == [True, True, False]
    assert run.budget.agents_started == 3 and run.budget.agents_denied == 1


async def test_bad_spawn_calls_are_call_errors_and_the_run_carries_on() -> None:
    errors: list[str] = []

    async def main(agent: ScriptedAgent) -> str:
        for task, name in (("", ""), ("t", "two words"), ("t", "main"), ("t", "x"), ("t", "x")):
            try:
                await agent.spawn_subtask(task, name=name)
            except RuntimeCallError as err:
                errors.append(f"{err.code.name} {err}")
        return "done"

    run = await PatternEnvironment({"main": main, "main.subtask": "sub done"}).run(spawn_subtask(agent("main"), "t"))
    assert run.result.spawn_subtask.final_answer == "done"
    assert errors == [
        "INVALID_ARGUMENT spawn_subtask.task: must not be empty",
        "INVALID_ARGUMENT spawn_subtask.name: 'two words' is not an agent name (at most 256 characters, no whitespace)",
        "INVALID_ARGUMENT spawn_subtask.name: 'main' is already used by another agent of this run",
        "INVALID_ARGUMENT spawn_subtask.name: 'x' is already used by another agent of this run",
    ]
    assert [r.name for r in run.result.spawn_subtask.subtasks] == ["x"]


async def test_failed_advisor_is_uncertain_advice() -> None:
    async def executor(agent: ScriptedAgent) -> str:
        c = await agent.consult_advisor("help?")
        return patterns_pb2.AdvisorVerdictKind.Name(c.verdict.kind) + ": " + c.verdict.text

    def oracle(agent: ScriptedAgent) -> str:
        raise RuntimeError("overloaded")

    env = PatternEnvironment({"exec": executor, "oracle": oracle})
    run = await env.run(advisor(agent("exec"), agent("oracle"), "t", max_uses=1))
    assert run.result.advisor.output.answer == "ADVISOR_VERDICT_KIND_UNCERTAIN: no advice: RuntimeError: overloaded"
