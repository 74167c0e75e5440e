"""Vote and fleet runs: in-process against scripted agents (the patterns'
logic) and over real workers (the wire). Conformance items 24, 25 and 38."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from carsvc._proto.car.v1 import runs_pb2, types_pb2
from carsvc.client import Client, agent, fleet, registered, vote
from carsvc.patterns.prompts import VOTE_SYNTHESIZE_TASK
from carsvc.patterns.vote import normalise
from carsvc.testing import PatternEnvironment, ScriptedAgent
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED


@pytest.mark.parametrize(
    ("answer", "normal"),
    [
        ("  Paris. ", "paris"),
        ("PARIS!", "paris"),
        ("paris ?!", "paris"),
        ("New   York\n City", "new york city"),
        ("4.5", "4.5"),
        ("...", ""),
    ],
)
def test_normalisation(answer: str, normal: str) -> None:
    assert normalise(answer) == normal


# -- in-process (carsvc.testing): the pattern's logic, no wire -------------------------------


def answers(table: dict[str, str]) -> Callable[[ScriptedAgent], str]:
    def voter(agent: ScriptedAgent) -> str:
        reply = table[agent.name]
        if reply == "!fail":
            raise RuntimeError("abstains")
        return reply

    return voter


async def test_normalised_majority_wins_and_failed_votes_do_not_count() -> None:
    """Item 24: agreement_ratio = winner votes / succeeded votes."""
    table = {"v1": "Paris", "v2": "paris.", "v3": "Lyon", "v4": "!fail", "v5": "  PARIS!  "}
    run = await PatternEnvironment(answers(table)).run(vote([agent(n) for n in table], "capital of France?"))
    assert run.status == SUCCEEDED and run.pattern == "vote"
    result = run.result.vote
    assert [v.name for v in result.votes] == list(table)
    assert result.winner == "Paris"  # the earliest vote of the winning group, trimmed
    assert result.agreement_ratio == pytest.approx(3 / 4)
    assert not result.HasField("synthesizer_output")


async def test_ties_go_to_the_earliest_agent() -> None:
    """Item 25 (tie rule)."""
    table = {"a": "blue", "b": "red", "c": "Red", "d": "BLUE"}
    env = PatternEnvironment(answers(table))
    run = await env.run(vote([agent(n) for n in table], "colour?"))
    assert run.result.vote.winner == "blue"
    assert run.result.vote.agreement_ratio == pytest.approx(0.5)
    run = await env.run(vote([agent(n) for n in ("b", "a", "c", "d")], "colour?"))
    assert run.result.vote.winner == "red"


async def test_synthesizer_picks_the_final_answer() -> None:
    """Item 25 (synthesizer path)."""
    table = {"a": "a long essay", "b": "a short essay", "c": "A long essay.", "judge": "the short one"}
    env = PatternEnvironment(table)
    run = await env.run(vote([agent(n) for n in "abc"], "write", synthesizer=agent("judge")))
    result = run.result.vote
    assert result.winner == "the short one"
    assert result.synthesizer_output.answer == "the short one"
    assert result.agreement_ratio == pytest.approx(2 / 3)  # still the voters' agreement
    assert env.dispatcher.tasks("judge") == [
        VOTE_SYNTHESIZE_TASK.format(
            task="write",
            count=3,
            answers="- [a] a long essay\n- [b] a short essay\n- [c] A long essay.",
            majority="a long essay",
            votes=2,
        )
    ]


async def test_vote_with_no_succeeded_votes_fails() -> None:
    run = await PatternEnvironment(answers({"a": "!fail", "b": "!fail"})).run(vote([agent("a"), agent("b")], "t"))
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert run.result.vote.winner == "" and run.result.vote.agreement_ratio == 0


async def test_fleet_tasks_are_the_brief_or_the_mission() -> None:
    env = PatternEnvironment(lambda agent: f"{agent.name} done")
    run = await env.run(fleet([agent(n) for n in "abcd"], "shared brief"))
    assert {env.dispatcher.tasks(n)[0] for n in "abcd"} == {"shared brief"}
    assert (run.result.fleet.succeeded, run.result.fleet.failed) == (4, 0)
    run = await env.run(fleet([agent("researcher", "Research competitor pricing")]))
    assert env.dispatcher.tasks("researcher") == ["Research competitor pricing"]  # the mission is the system prompt


# -- over real workers: the wire ----------------------------------------------------------------


async def test_fleet_agents_work_independently_with_a_per_agent_timeout(client: Client, workers: Workers) -> None:
    """Item 38: a timed-out agent is cancelled on its worker and counted as
    failed; succeeded + failed = number of agents."""
    tasks: dict[str, str] = {}
    slow_cancelled = asyncio.Event()
    started: set[str] = set()
    all_started = asyncio.Event()

    async def member(ctx: AgentContext) -> str:
        tasks[ctx.name] = ctx.task
        started.add(ctx.name)
        if len(started) == 4:
            all_started.set()
        await asyncio.wait_for(all_started.wait(), 5)  # independent, all at once
        if ctx.name == "slow":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                slow_cancelled.set()
                raise
        if ctx.name == "broken":
            raise RuntimeError("crashed")
        return f"{ctx.name} done"

    await workers.start({"*": member}, max_in_flight=4)
    run = await client.run(
        fleet(
            [agent("researcher", "Research competitor pricing"), agent("writer", "Draft the newsletter"),
             agent("slow", "Never finishes"), agent("broken", "Fails")],
            agent_timeout_secs=0.3,
        )
    )
    assert run.status == SUCCEEDED and run.pattern == "fleet"
    result = run.result.fleet
    assert [o.name for o in result.outputs] == ["researcher", "writer", "slow", "broken"]
    assert result.outputs[2].error == "timed out after 0.3s"
    assert result.outputs[2].outcome.status == types_pb2.OUTCOME_STATUS_TIMEOUT
    assert (result.succeeded, result.failed) == (2, 2)
    assert result.succeeded + result.failed == len(result.outputs)
    assert result.duration_ms >= 300
    assert tasks["researcher"] == "Research competitor pricing"  # no task: the mission is the system prompt
    await asyncio.wait_for(slow_cancelled.wait(), 5)


async def test_fleet_timeout_must_be_positive(client: Client) -> None:
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.runs.StartRun(runs_pb2.StartRunRequest(fleet=fleet([agent("a")], agent_timeout_secs=bad)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("fleet.agent_timeout_secs:")


async def test_registered_agents_by_name_in_a_multi_agent_pattern(client: Client, workers: Workers) -> None:
    prompts: dict[str, str] = {}

    async def voter(ctx: AgentContext) -> str:
        prompts[ctx.name] = ctx.spec.system_prompt
        return "yes"

    await workers.start({"*": voter}, max_in_flight=2)
    await client.register_agent(types_pb2.AgentSpec(name="r1", system_prompt="registered one"))
    run = await client.run(vote([registered("r1"), agent("inline", "inline one")], "ok?"))
    assert run.result.vote.winner == "yes" and run.result.vote.agreement_ratio == 1.0
    assert prompts == {"r1": "registered one", "inline": "inline one"}
