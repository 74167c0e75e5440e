"""Swarm (parallel, sequential, debate, isolated) and pipeline runs: served by
real workers over real streams (the wire), and in-process against scripted
agents (the patterns' logic). Conformance items 11-14 and 16."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from carsvc._proto.car.v1 import state_pb2, types_pb2
from carsvc.client import Client, agent, pipeline, swarm
from carsvc.patterns.prompts import DEBATE_JUDGE_TASK, DEBATE_REVISE_TASK, SEQUENTIAL_TASK, SYNTHESIZE_TASK
from carsvc.testing import PatternEnvironment, Script, ScriptedAgent
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED


async def test_parallel_swarm_runs_at_once_keeps_agent_order_and_synthesizes(
    client: Client, workers: Workers
) -> None:
    """Item 12: outputs in agent order; the synthesizer sees every answer."""
    tasks: dict[str, str] = {}
    started: set[str] = set()
    all_started = asyncio.Event()

    async def expert(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        started.add(ctx.name)
        if len(started) == 3:
            all_started.set()
        await asyncio.wait_for(all_started.wait(), 5)  # all three run at once
        await asyncio.sleep(0.01 * (3 - int(ctx.name[-1])))  # finish in reverse order
        return f"view {ctx.name[-1]}"

    async def synth(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        return "synthesis"

    await workers.start({"e*": expert, "synth": synth}, max_in_flight=4)
    run = await client.run(swarm([agent("e1"), agent("e2"), agent("e3")], "pick a colour", synthesizer=agent("synth")))
    assert run.status == SUCCEEDED and run.pattern == "swarm"
    result = run.result.swarm
    assert [o.name for o in result.outputs] == ["e1", "e2", "e3"]
    assert [o.answer for o in result.outputs] == ["view 1", "view 2", "view 3"]
    assert all(tasks[f"e{i}"] == "pick a colour" for i in (1, 2, 3))
    assert tasks["synth"] == SYNTHESIZE_TASK.format(
        task="pick a colour", count=3, answers="- [e1] view 1\n- [e2] view 2\n- [e3] view 3"
    )
    assert result.final_summary == "synthesis"
    assert result.synthesizer_output.answer == "synthesis"


async def test_isolated_parallel_swarm_merges_only_succeeded_agents(client: Client, workers: Workers) -> None:
    """Item 14: an isolated agent's writes are invisible to the shared state and
    its siblings until it succeeds; reads fall through; a failed agent's writes
    are dropped."""
    await client.set_state("iso", "shared", "parent")
    a_wrote = asyncio.Event()
    release_a = asyncio.Event()
    seen: dict[str, object] = {}

    async def a(ctx: AgentContext) -> str:
        seen["a reads through"] = await ctx.state.get("shared")
        await ctx.state.set("shared", "from a")
        await ctx.state.set("a_only", 1)
        seen["a sees its own write"] = await ctx.state.get("shared")
        a_wrote.set()
        await release_a.wait()
        return "a done"

    async def b(ctx: AgentContext) -> str:
        await a_wrote.wait()
        seen["b sees a_only"] = await ctx.state.get("a_only")
        seen["b sees shared"] = await ctx.state.get("shared")
        return "b done"

    async def c(ctx: AgentContext) -> str:
        await ctx.state.set("c_only", 1)
        raise RuntimeError("c fails")

    await workers.start({"a": a, "b": b, "c": c}, max_in_flight=3)
    handle = await client.start_run(swarm([agent("a"), agent("b"), agent("c")], "t", isolated=True), thread_id="iso")
    await asyncio.wait_for(a_wrote.wait(), 5)
    assert await client.get_state("iso", "a_only") is None  # not merged while a runs
    assert await client.get_state("iso", "shared") == "parent"
    release_a.set()
    run = await client.wait(handle.run_id)
    assert run.status == SUCCEEDED
    assert seen == {
        "a reads through": "parent",
        "a sees its own write": "from a",
        "b sees a_only": None,
        "b sees shared": "parent",
    }
    assert await client.get_state("iso", "a_only") == 1  # merged on success
    assert await client.get_state("iso", "shared") == "from a"
    assert await client.get_state("iso", "c_only") is None  # discarded on failure


async def test_pipeline_chains_stages_and_reports_the_last_answer(client: Client, workers: Workers) -> None:
    """Item 16: final_answer is the last stage's answer when it succeeded;
    all_succeeded reflects every stage; a failed middle stage does not stop it."""
    tasks: dict[str, str] = {}

    async def stage(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        if ctx.name == "edit":
            raise RuntimeError("editor away")
        return f"<{ctx.name}>"

    await workers.start({"*": stage})
    run = await client.run(pipeline([agent("draft"), agent("edit"), agent("polish")], "essay"))
    assert run.status == SUCCEEDED and run.pattern == "pipeline"
    result = run.result.pipeline
    assert [o.name for o in result.stages] == ["draft", "edit", "polish"]
    assert result.final_answer == "<polish>"
    assert not result.all_succeeded
    assert tasks["edit"] == SEQUENTIAL_TASK.format(task="essay", answers="- [draft] <draft>")
    assert tasks["polish"] == SEQUENTIAL_TASK.format(task="essay", answers="- [draft] <draft>")

    # All stages fine: all_succeeded.
    run = await client.run(pipeline([agent("draft"), agent("polish")], "essay"))
    assert run.result.pipeline.all_succeeded and run.result.pipeline.final_answer == "<polish>"


async def test_runtime_calls_act_in_the_calling_agents_scope(client: Client, workers: Workers) -> None:
    """Seed test_task_scope, as it means something here: the assignment a call
    travels on is its scope. Two agents served concurrently by one worker
    process each act as themselves (events, mail, state writer) and see their
    own overlay; a call outside any running assignment is refused
    (tests/test_bad_input.py::test_bad_worker_frames_get_errors_and_nothing_else_breaks)."""
    both = asyncio.Event()
    arrived: set[str] = set()
    reads: dict[str, object] = {}

    async def scoped(ctx: AgentContext) -> str:
        await ctx.state.set("counter", ctx.name)
        await ctx.state.set(f"{ctx.name}_only", True)
        ctx.emit("hello", ctx.name)
        arrived.add(ctx.name)
        if len(arrived) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        other = "b" if ctx.name == "a" else "a"
        await ctx.send(other, f"from {ctx.name}")
        message = await ctx.recv(timeout=5)
        reads[ctx.name] = (await ctx.state.get("counter"), await ctx.state.get(f"{other}_only"), message.from_agent)
        return "ok"

    await workers.start({"*": scoped}, max_in_flight=2)
    handle = await client.start_run(swarm([agent("a"), agent("b")], "t", isolated=True), thread_id="scope")
    events = [e async for e in client.watch(handle.run_id)]
    assert reads == {"a": ("a", None, "b"), "b": ("b", None, "a")}
    custom = sorted((e.custom.agent, e.custom.payload.string_value) for e in events if e.WhichOneof("kind") == "custom")
    assert custom == [("a", "a"), ("b", "b")]
    response = await client.state.Get(state_pb2.GetRequest(scope="scope", key="a_only"))
    assert response.writer == "a"


# -- in-process (carsvc.testing): the patterns' logic, no wire -------------------------------


def failing(*names: str, answer: Callable[[ScriptedAgent], str] = lambda a: f"{a.name} says hi") -> Script:
    def script(agent: ScriptedAgent) -> str:
        if agent.name in names:
            raise RuntimeError(f"{agent.name} broke")
        return answer(agent)

    return script


async def test_parallel_swarm_without_synthesizer_labels_the_answers() -> None:
    run = await PatternEnvironment(failing("b")).run(swarm([agent("a"), agent("b"), agent("c")], "t"))
    assert run.status == SUCCEEDED  # one failure is inside the result
    assert run.result.swarm.final_summary == "- [a] a says hi\n- [c] c says hi"
    assert run.result.swarm.outputs[1].error == "RuntimeError: b broke"
    assert not run.result.swarm.HasField("synthesizer_output")


async def test_sequential_swarm_carries_earlier_answers() -> None:
    """Item 11: agent k's task holds the answers of agents 0..k-1 (failed ones have none)."""
    env = PatternEnvironment(failing("c", answer=lambda a: f"{a.name}-answer"))
    run = await env.run(swarm([agent("a"), agent("b"), agent("c"), agent("d")], "write", mode="sequential"))
    assert run.status == SUCCEEDED
    tasks = {n: env.dispatcher.tasks(n)[0] for n in "abcd"}
    assert tasks["a"] == "write"
    assert tasks["b"] == SEQUENTIAL_TASK.format(task="write", answers="- [a] a-answer")
    assert tasks["b"] == "write\n\nAnswers so far, from the agents before you:\n- [a] a-answer\n\nBuild on them."
    assert tasks["c"] == SEQUENTIAL_TASK.format(task="write", answers="- [a] a-answer\n- [b] b-answer")
    assert tasks["d"] == tasks["c"]  # c failed: nothing of it is carried
    # Without a synthesizer, the summary is the last succeeded answer.
    assert run.result.swarm.final_summary == "d-answer"


async def test_sequential_swarm_runs_one_agent_at_a_time() -> None:
    running = 0
    peak = 0

    async def step(agent: ScriptedAgent) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1
        return "ok"

    run = await PatternEnvironment(step).run(swarm([agent("a"), agent("b"), agent("c")], "t", mode="sequential"))
    assert run.status == SUCCEEDED and peak == 1


async def test_debate_second_round_sees_the_others_and_judge_decides() -> None:
    """Item 13: round 2 tasks hold the other agents' round-1 answers; the judge's
    answer is the final summary; both rounds are in the result."""
    env = PatternEnvironment(
        lambda a: "pro wins" if a.name == "judge" else f"{a.name} round {len(env.dispatcher.tasks(a.name))}"
    )
    debate = swarm([agent("pro"), agent("con")], "is tea better?", mode="debate", synthesizer=agent("judge"))
    run = await env.run(debate)
    assert run.status == SUCCEEDED
    result = run.result.swarm
    assert [o.answer for o in result.first_round] == ["pro round 1", "con round 1"]
    assert [o.answer for o in result.outputs] == ["pro round 2", "con round 2"]
    pro, con = env.dispatcher.tasks("pro"), env.dispatcher.tasks("con")
    assert pro[0] == "is tea better?"  # round 1 is independent
    assert pro[1] == DEBATE_REVISE_TASK.format(task="is tea better?", own="pro round 1", others="- [con] con round 1")
    assert con[1] == DEBATE_REVISE_TASK.format(task="is tea better?", own="con round 1", others="- [pro] pro round 1")
    assert env.dispatcher.tasks("judge") == [
        DEBATE_JUDGE_TASK.format(task="is tea better?", count=2, answers="- [pro] pro round 2\n- [con] con round 2")
    ]
    assert result.final_summary == "pro wins"
    roles = [e.role for e in run.events_of("agent_started")]
    assert roles == ["debate_round1", "debate_round1", "debate_round2", "debate_round2", "judge"]


async def test_isolated_sequential_swarm_later_agents_see_merged_writes() -> None:
    async def script(agent: ScriptedAgent) -> str:
        if agent.name == "first":
            await agent.state.set("draft", "v1")
            return "wrote v1"
        return f"read {await agent.state.get('draft')}"

    env = PatternEnvironment(script)
    run = await env.run(swarm([agent("first"), agent("second")], "t", mode="sequential", isolated=True))
    assert run.result.swarm.outputs[1].answer == "read v1"
    assert env.state.get("draft") is not None  # merged into the run's scope


async def test_swarm_where_no_agent_answers_fails() -> None:
    env = PatternEnvironment(failing("x1", "x2"))
    run = await env.run(swarm([agent("x1"), agent("x2")], "t", synthesizer=agent("synth")))
    assert run.status == FAILED
    assert run.termination_reason == "agent_failed"
    assert run.termination_detail == "no agents produced output"
    assert len(run.result.swarm.outputs) == 2
    assert env.dispatcher.tasks("synth") == []


async def test_failed_synthesizer_fails_the_swarm() -> None:
    run = await PatternEnvironment(failing("synth", answer=lambda a: "fine")).run(
        swarm([agent("a")], "t", synthesizer=agent("synth"))
    )
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert run.termination_detail == "synthesizer 'synth' failed: RuntimeError: synth broke"
    assert run.result.swarm.final_summary == ""
    assert run.result.swarm.outputs[0].answer == "fine"


async def test_pipeline_whose_last_stage_fails_has_no_answer_and_fails() -> None:
    run = await PatternEnvironment(failing("last", answer=lambda a: "fine")).run(
        pipeline([agent("first"), agent("last")], "t")
    )
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert run.termination_detail == "last stage 'last' failed: RuntimeError: last broke"
    assert run.result.pipeline.final_answer == ""
    assert run.result.pipeline.stages[0].answer == "fine"
