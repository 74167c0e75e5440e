"""Supervisor runs: over real workers (the wire), and in-process against
scripted agents (the pattern's logic). Conformance items 17-19."""

from __future__ import annotations

import pytest

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, supervisor
from carsvc.patterns.prompts import SUPERVISOR_REVIEW_TASK, SUPERVISOR_REVISE_TASK
from carsvc.patterns.supervisor import is_approved
from carsvc.testing import PatternEnvironment, ScriptedAgent
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED


@pytest.mark.parametrize(
    ("review", "approved"),
    [
        ("APPROVED", True),
        ("Looks good. APPROVED.", True),
        ("APPROVED\nship it", True),
        ("NOT APPROVED: fix the intro", False),
        ("not quite. NOT  APPROVED", False),
        ("UNAPPROVED", False),
        ("approved", False),  # case-sensitive
        ("needs work", False),
    ],
)
def test_approval_rule(review: str, approved: bool) -> None:
    assert is_approved(review) is approved


async def test_stops_at_the_first_approval_and_feeds_back_between_rounds(client: Client, workers: Workers) -> None:
    """Items 17 and 19."""
    tasks: dict[str, list[str]] = {}
    reviews = iter(["Too short, add detail.", "APPROVED"])

    async def writer(ctx: AgentContext) -> str:
        tasks.setdefault(ctx.name, []).append(ctx.task)
        return f"{ctx.name} draft {len(tasks[ctx.name])}"

    async def boss(ctx: AgentContext) -> str:
        tasks.setdefault(ctx.name, []).append(ctx.task)
        return next(reviews)

    await workers.start({"w*": writer, "boss": boss}, max_in_flight=3)
    run = await client.run(supervisor([agent("w1"), agent("w2")], agent("boss"), "write a poem"))
    assert run.status == SUCCEEDED and run.pattern == "supervisor"
    result = run.result.supervisor
    assert result.approved and result.total_rounds == 2 and len(result.rounds) == 2
    assert list(result.supervisor_feedback) == ["Too short, add detail.", "APPROVED"]
    assert [o.answer for o in result.rounds[0].outputs] == ["w1 draft 1", "w2 draft 1"]
    assert result.rounds[1].review.answer == "APPROVED"
    assert result.final_answer == "- [w1] w1 draft 2\n- [w2] w2 draft 2"
    assert tasks["w1"][0] == "write a poem"
    assert tasks["w1"][1] == SUPERVISOR_REVISE_TASK.format(
        task="write a poem", previous="w1 draft 1", feedback="Too short, add detail."
    )
    assert tasks["boss"][0] == SUPERVISOR_REVIEW_TASK.format(
        task="write a poem", round=1, max_rounds=3, answers="- [w1] w1 draft 1\n- [w2] w2 draft 1"
    )


# -- in-process (carsvc.testing): the pattern's logic, no wire -------------------------------


async def test_never_approved_runs_exactly_max_rounds() -> None:
    """Item 18: default 3 rounds, approved=false, and the run still succeeds."""
    script = {"w": "draft", "boss": "NOT APPROVED: try again"}
    env = PatternEnvironment(script)
    run = await env.run(supervisor([agent("w")], agent("boss"), "t"))
    assert run.status == SUCCEEDED
    result = run.result.supervisor
    assert not result.approved
    assert result.total_rounds == 3 and len(env.dispatcher.tasks("boss")) == 3
    assert len(result.supervisor_feedback) == 3
    assert result.final_answer == "draft"  # one worker: its answer as is
    env = PatternEnvironment(script)
    run = await env.run(supervisor([agent("w")], agent("boss"), "t", max_rounds=1))
    assert run.result.supervisor.total_rounds == 1 and len(env.dispatcher.tasks("boss")) == 1


async def test_failed_worker_is_shown_to_the_supervisor_and_failed_review_ends_the_loop() -> None:
    def script(agent: ScriptedAgent) -> str:
        if agent.name == "bad":
            raise RuntimeError("writer's block")
        if agent.name == "boss":
            raise RuntimeError("supervisor offline")
        return "text"

    env = PatternEnvironment(script)
    run = await env.run(supervisor([agent("good"), agent("bad")], agent("boss"), "t"))
    assert run.status == SUCCEEDED  # the workers' answers stand; approved=false
    result = run.result.supervisor
    assert not result.approved and result.total_rounds == 1
    assert result.rounds[0].review.error == "RuntimeError: supervisor offline"
    assert list(result.supervisor_feedback) == []
    assert result.final_answer == "- [good] text"
    assert "- [bad] (no answer: RuntimeError: writer's block)" in env.dispatcher.tasks("boss")[0]
