"""DESIGN §4 budget semantics in every pattern, in-process against scripted
agents (carsvc.testing), and a shared budget over real workers: skipped
outputs at their own positions, fallbacks for refused finalizers, a refused
main agent, shared budgets across runs of different patterns, and a
BudgetUpdated event after every change. Conformance items 7-10."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.protobuf.message import Message

from carsvc._proto.car.v1 import budget_pb2, budget_pb2_grpc, patterns_pb2, types_pb2
from carsvc.client import (
    Client,
    adversarial_review,
    advisor,
    agent,
    delegator,
    fleet,
    map_reduce,
    pipeline,
    single,
    spawn_subtask,
    supervisor,
    swarm,
    tournament,
    vote,
)
from carsvc.testing import PatternEnvironment, ScriptedAgent
from carsvc.worker import AgentContext, Result
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
SKIPPED = "coordination budget exhausted: "


def limits(**fields: Any) -> types_pb2.BudgetLimits:
    return types_pb2.BudgetLimits(**fields)


def env(script: Any, **fields: Any) -> PatternEnvironment:
    """An in-process environment whose runs get a budget with these limits."""
    return PatternEnvironment(script, budget=limits(**fields))


async def named(agent: ScriptedAgent) -> str:
    return agent.name


A, B, C = agent("a"), agent("b"), agent("c")

EVERY_PATTERN: dict[str, Message] = {
    "single": single(A, "t"),
    "swarm": swarm([A, B], "t"),
    "pipeline": pipeline([A, B], "t"),
    "supervisor": supervisor([A, B], C, "t"),
    "delegator": delegator(A, [B], "t"),
    "spawn_subtask": spawn_subtask(A, "t"),
    "map_reduce": map_reduce(A, B, "t", ["x"]),
    "vote": vote([A, B], "t"),
    "fleet": fleet([A, B]),
    "adversarial_review": adversarial_review(A, "work", ["c"]),
    "tournament": tournament([A, B], C, "t"),
    "advisor": advisor(A, B, "t", max_uses=1),
}


@pytest.mark.parametrize("pattern", list(EVERY_PATTERN))
async def test_a_budget_that_admits_nobody_fails_every_pattern_with_budget_exhausted(pattern: str) -> None:
    """Nothing runs; every refusal is an AgentSkipped event followed by a
    BudgetUpdated; the run fails with reason budget_exhausted."""
    env = PatternEnvironment(named, budget=limits(max_agents=0))
    run = await env.run(EVERY_PATTERN[pattern])
    events = run.events
    assert env.calls == []
    assert run.status == FAILED, run
    assert run.termination_reason == "budget_exhausted", run.termination_detail
    kinds = [e.WhichOneof("kind") for e in events]
    skips = [i for i, k in enumerate(kinds) if k == "agent_skipped"]
    assert skips and all(kinds[i + 1] == "budget_updated" for i in skips)
    assert run.budget.agents_started == 0 and run.budget.agents_denied == len(skips)
    for i in skips:
        assert events[i].agent_skipped.output.error.startswith(SKIPPED + "max_agents reached")


async def test_refused_load_bearing_agents_keep_their_positions() -> None:
    """Item 9 in swarm, vote, tournament, fleet and supervisor."""

    run = await env(named, max_agents=2).run(swarm([A, B, C], "t"))
    outputs = run.result.swarm.outputs
    assert [o.name for o in outputs] == ["a", "b", "c"]
    assert [o.answer for o in outputs] == ["a", "b", ""] and outputs[2].error.startswith(SKIPPED)
    assert run.result.swarm.final_summary == "- [a] a\n- [b] b"

    run = await env(named, max_agents=2).run(vote([A, B, C], "t"))
    assert [v.name for v in run.result.vote.votes] == ["a", "b", "c"]
    assert run.result.vote.votes[2].error.startswith(SKIPPED)
    assert run.result.vote.agreement_ratio == pytest.approx(0.5)  # two succeeded votes, different answers

    run = await env(named, max_agents=1).run(fleet([A, B, C]))
    assert [o.answer for o in run.result.fleet.outputs] == ["a", "", ""]
    assert (run.result.fleet.succeeded, run.result.fleet.failed) == (1, 2)

    run = await env(named, max_agents=2).run(tournament([A, B, agent("d")], C, "t"))
    candidates = run.result.tournament.candidates
    assert [c.name for c in candidates] == ["a", "b", "d"] and candidates[2].error.startswith(SKIPPED)
    assert list(run.result.tournament.ranking)[-1] == "d"  # never entered the bracket

    run = await env(named, max_agents=1).run(supervisor([A, B], C, "t"))
    (first_round,) = run.result.supervisor.rounds
    assert [o.answer for o in first_round.outputs] == ["a", ""]
    assert first_round.review.error.startswith(SKIPPED)  # the refused supervisor ends the loop
    assert run.status == SUCCEEDED and not run.result.supervisor.approved
    assert run.result.supervisor.final_answer == "- [a] a"


async def test_refused_finalizers_fall_back() -> None:
    """Item 10: synthesizer -> labelled answers, debate judge -> labelled
    round-2 answers, vote synthesizer -> the majority, tournament judge -> the
    left candidate; the run succeeds."""
    synth = agent("synth")

    run = await env(named, max_agents=2).run(swarm([A, B], "t", synthesizer=synth))
    assert run.status == SUCCEEDED
    assert run.result.swarm.final_summary == "- [a] a\n- [b] b"
    assert run.result.swarm.synthesizer_output.error.startswith(SKIPPED)

    run = await env(named, max_agents=2).run(swarm([A, B], "t", mode="sequential", synthesizer=synth))
    assert run.status == SUCCEEDED and run.result.swarm.final_summary == "- [a] a\n- [b] b"

    run = await env(named, max_agents=4).run(swarm([A, B], "t", mode="debate", synthesizer=synth))
    assert run.status == SUCCEEDED and run.result.swarm.final_summary == "- [a] a\n- [b] b"
    assert run.result.swarm.synthesizer_output.error.startswith(SKIPPED)

    run = await env(named, max_agents=2).run(vote([A, B], "t", synthesizer=synth))
    assert run.status == SUCCEEDED and run.result.vote.winner == "a"
    assert run.result.vote.synthesizer_output.error.startswith(SKIPPED)

    run = await env(named, max_agents=2).run(tournament([A, B], C, "t"))
    (match,) = run.result.tournament.matches
    assert run.status == SUCCEEDED and match.winner == "a" and run.result.tournament.winner_name == "a"
    assert match.note.startswith("judge refused by the budget (" + SKIPPED)
    assert match.judge_output.error.startswith(SKIPPED)


async def test_refused_sub_agents_are_answered_with_their_skipped_output() -> None:
    """Specialists and advisor consultations the budget refuses come back to
    the calling agent as outputs, not errors; the main agent carries on."""

    async def main(agent: ScriptedAgent) -> str:
        if "consult_advisor" in agent.spec.tools:
            consultation = await agent.consult_advisor("?")
            return f"{consultation.verdict.kind}:{consultation.advisor_output.error}"
        return (await agent.delegate("b", "sub")).error

    run = await env({"a": main, "b": named}, max_agents=1).run(delegator(A, [B], "t"))
    assert run.status == SUCCEEDED
    assert run.result.delegator.final_answer.startswith(SKIPPED)
    assert not run.result.delegator.delegations[0].success

    run = await env({"a": main, "b": named}, max_agents=1).run(advisor(A, B, "t", max_uses=1))
    kind, error = run.result.advisor.output.answer.split(":", 1)
    assert int(kind) == patterns_pb2.ADVISOR_VERDICT_KIND_UNCERTAIN
    assert error.startswith(SKIPPED)
    (consultation,) = run.result.advisor.consultations
    assert consultation.verdict.text.startswith("no advice: " + SKIPPED)


async def test_spend_gates_the_next_agent_and_never_cancels_in_flight_ones() -> None:
    """Item 7: in a parallel batch every admitted agent finishes even though the
    first one crosses the limit; in a sequence the next agent is refused
    (overshoot bounded by one agent)."""
    release = asyncio.Event()

    async def spender(agent: ScriptedAgent) -> Result:
        if agent.name != "a":
            await release.wait()
        else:
            release.set()
        return Result(answer=agent.name, input_tokens=80, output_tokens=20)

    run = await env(spender, max_total_tokens=100).run(swarm([A, B, C], "t"))
    assert [o.answer for o in run.result.swarm.outputs] == ["a", "b", "c"]  # one batch: all admitted, all finish
    assert run.budget.total_tokens == 300 and run.budget.exhausted

    run = await env(spender, max_total_tokens=100).run(pipeline([A, B, C], "t"))
    stages = run.result.pipeline.stages
    assert [s.answer for s in stages] == ["a", "", ""]
    assert "max_total_tokens" in stages[1].error
    assert run.status == FAILED and run.termination_reason == "budget_exhausted"
    assert run.budget.total_tokens == 100


async def test_a_shared_budget_is_drawn_down_by_runs_of_different_patterns(client: Client, workers: Workers) -> None:
    """Item 8, plus GetBudget's snapshot and a BudgetUpdated after every change."""
    budgets = budget_pb2_grpc.BudgetServiceStub(client.channel)
    await budgets.CreateBudget(budget_pb2.CreateBudgetRequest(budget_id="team", limits=limits(max_agents=4)))

    async def spender(ctx: AgentContext) -> Result:
        return Result(answer=ctx.name, input_tokens=1, output_tokens=1, cost_usd=0.5)

    await workers.start({"*": spender}, max_in_flight=3)
    first = await client.run(swarm([A, B, C], "t"), budget_id="team")
    handle = await client.start_run(vote([A, B], "t"), budget_id="team")
    events = [e async for e in client.watch(handle.run_id)]
    second = await client.get_run(handle.run_id)
    assert first.status == SUCCEEDED and first.budget.agents_started == 3
    assert [v.answer for v in second.result.vote.votes] == ["a", ""]
    snapshot = (await budgets.GetBudget(budget_pb2.GetBudgetRequest(budget_id="team"))).budget
    assert (snapshot.agents_started, snapshot.agents_denied, snapshot.total_tokens) == (4, 1, 8)
    assert snapshot.cost_usd == pytest.approx(2.0)
    updates = [e.budget_updated.budget for e in events if e.WhichOneof("kind") == "budget_updated"]
    # One per admission, one per refusal, one per recorded spend.
    assert len(updates) == 3
    assert [u.agents_started for u in updates] == [4, 4, 4]
    assert updates[-1].total_tokens == 8 and updates[-1].budget_id == "team"
