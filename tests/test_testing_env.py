"""carsvc.testing: the in-process pattern environment's switches (lost workers,
cancel, decisions, timeouts, registered agents), and docs/testing.md's whole
program, run as it stands."""

from __future__ import annotations

import asyncio
import pathlib
import re
import subprocess
import sys

import pytest

from carsvc._proto.car.v1 import runs_pb2, types_pb2
from carsvc.client import agent, fleet, map_reduce, pipeline, registered, single, swarm
from carsvc.config import Settings
from carsvc.domain.budget import BudgetLimits, CoordinationBudget
from carsvc.testing import PatternEnvironment, ScriptedAgent, ScriptedDispatcher, approve, reject
from carsvc.worker import RuntimeCallError

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED


def test_the_docs_program_runs_as_written() -> None:
    text = (ROOT / "docs" / "testing.md").read_text()
    (program,) = re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "vote: Paris\n"


async def test_a_lost_worker_is_redispatched_and_past_max_attempts_gives_up() -> None:
    env = PatternEnvironment(lambda a: f"{a.name}@{a.attempt}", lost_attempts={"map/1": 1, "reducer": 5})
    run = await env.run(map_reduce(agent("m"), agent("reducer"), "t", ["x", "y"]))
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert [o.answer for o in run.result.map_reduce.map_outputs] == ["m_0@1", "m_1@2"]
    redispatched = run.events_of("agent_redispatched")
    assert [(e.agent, e.attempt, e.previous_worker_id) for e in redispatched] == [
        ("m_1", 2, "scripted-1"),
        ("reducer", 2, "scripted-1"),
        ("reducer", 3, "scripted-2"),
    ]
    reducer = env.dispatcher.call("reduce")
    assert reducer.attempts == 3
    assert reducer.output is not None and reducer.output.error == (
        "worker 'scripted-3' was lost (the worker closed its stream) on attempt 3 of 3; giving up"
    )
    finished = {e.step: (e.attempt, e.worker_id) for e in run.events_of("agent_finished")}
    assert finished["map/1"] == (2, "scripted-2") and finished["reduce"] == (3, "scripted-3")

    env = PatternEnvironment({"a": "ok"}, lost_attempts={"a": 1}, max_attempts=1)
    run = await env.run(single(agent("a"), "t"))
    assert run.status == FAILED
    assert run.result.single.output.error.endswith("on attempt 1 of 1; giving up")


async def test_cancelling_mid_way_cancels_the_running_scripts() -> None:
    started = asyncio.Event()
    cancelled: list[str] = []

    async def slow(agent: ScriptedAgent) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(f"{agent.name}: {agent.cancel_reason}")
            raise
        return "late"

    env = PatternEnvironment(slow)
    running = asyncio.ensure_future(env.run(swarm([agent("a"), agent("b")], "t")))
    await started.wait()
    env.cancel("the user gave up")
    run = await running
    assert (run.status, run.termination_reason, run.termination_detail) == (
        CANCELLED, "cancelled", "the user gave up"
    )
    assert sorted(cancelled) == ["a: the user gave up", "b: the user gave up"]
    assert {c.cancelled for c in env.calls} == {"the user gave up"}
    with pytest.raises(RuntimeError):
        env.cancel()

    async def quitter(agent: ScriptedAgent) -> str:
        if agent.step == "pipeline/1":
            agent.cancel_run("stage 2 pulled the plug")
            await asyncio.sleep(30)
        return "ok"

    env = PatternEnvironment(quitter)
    run = await env.run(runs_pb2.StartRunRequest(pipeline=pipeline([agent("s0"), agent("s1"), agent("s2")], "t")))
    assert run.status == CANCELLED and run.termination_detail == "stage 2 pulled the plug"
    assert env.dispatcher.steps == ["pipeline/0", "pipeline/1"]


async def test_suspended_tool_calls_wait_for_decisions() -> None:
    async def tool_user(agent: ScriptedAgent) -> str:
        first = await agent.suspend_tool_call("c1", "deploy", {"env": "prod"}, reason="risky")
        second = await agent.suspend_tool_call("c2", "deploy")
        try:
            await agent.suspend_tool_call("c3", "shell")
        except RuntimeCallError as err:
            return f"{first.result} {second.approved} {second.reason} {err.code.name}"
        return "shell allowed?"

    env = PatternEnvironment(tool_user, decisions=[approve("c1", "shipped")])
    running = asyncio.ensure_future(env.run(single(agent("ops", tools=["deploy"]), "t")))
    while not env.waiting:
        await asyncio.sleep(0)
    outcome = env.submit(reject("c2", "not on a Friday", decision_id="d2"))
    assert outcome.applied == ["d2"]
    run = await running
    assert run.result.single.output.answer == "shipped False not on a Friday PERMISSION_DENIED"
    suspended = run.events_of("tool_call_suspended")
    assert [(s.tool_call_id, s.reason) for s in suspended] == [("c1", "risky"), ("c2", "")]
    assert [r.decision.action for r in run.events_of("tool_call_resumed")] == [
        types_pb2.DECISION_ACTION_RESUME,
        types_pb2.DECISION_ACTION_CANCEL,
    ]
    assert not env.waiting


async def test_agent_timeouts_state_events_and_registered_agents() -> None:
    async def member(agent: ScriptedAgent) -> str:
        agent.progress("half way", 0.5)
        agent.emit("note", {"who": agent.name})
        await agent.state.set(f"seen/{agent.name}", True)
        if agent.name == "slow":
            await asyncio.sleep(30)
        return "done"

    env = PatternEnvironment(member, registered=[types_pb2.AgentSpec(name="known", system_prompt="hi")])
    run = await env.run(fleet([registered("known"), agent("slow")], "t", agent_timeout_secs=0.01))
    assert [o.error for o in run.result.fleet.outputs] == ["", "timed out after 0.01s"]
    assert env.dispatcher.call("fleet/0").spec.system_prompt == "hi"
    assert env.dispatcher.call("fleet/1").cancelled == "timed out after 0.01s"
    assert [e.payload.struct_value.fields["who"].string_value for e in run.events_of("custom")] == ["known", "slow"]
    assert [p.fraction for p in run.events_of("progress")] == [0.5, 0.5]
    assert sorted(env.state.keys("seen/")) == ["seen/known", "seen/slow"]


async def test_a_shared_budget_spans_runs_and_settings_apply() -> None:
    budget = CoordinationBudget(BudgetLimits(max_agents=2))
    env = PatternEnvironment({"*": "ok"}, budget=budget, settings=Settings(agent_timeout_s=0))
    assert (await env.run(single(agent("a"), "t"))).succeeded
    assert (await env.run(single(agent("b"), "t"))).succeeded
    third = await env.run(single(agent("c"), "t"))
    assert third.termination_reason == "budget_exhausted" and budget.snapshot().agents_denied == 1


async def test_scripts_may_be_handed_over_as_a_dispatcher_and_unknown_agents_fail() -> None:
    dispatcher = ScriptedDispatcher({"a": "ok"})
    env = PatternEnvironment(dispatcher)
    run = await env.run(swarm([agent("a"), agent("ghost")], "t"))
    assert env.dispatcher is dispatcher
    error = run.result.swarm.outputs[1].error
    assert error == "LookupError: the script has no answer for agent 'ghost' (step 'swarm/1')"
    with pytest.raises(TypeError):
        env.build(types_pb2.AgentSpec(name="x"))
