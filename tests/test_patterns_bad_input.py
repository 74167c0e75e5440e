"""Bad pattern requests get INVALID_ARGUMENT (or NOT_FOUND for an unknown
registered agent) naming the field, and nothing starts; bad runtime calls get a
clear call error and the run carries on."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import Message

from carsvc._proto.car.v1 import patterns_pb2
from carsvc.client import (
    Client,
    adversarial_review,
    advisor,
    agent,
    delegator,
    fleet,
    pipeline,
    registered,
    spawn_subtask,
    supervisor,
    swarm,
    tournament,
    vote,
)
from carsvc.worker import AgentContext, RuntimeCallError
from tests.conftest import Workers

A, B, C = agent("a"), agent("b"), agent("c")
INVALID = grpc.StatusCode.INVALID_ARGUMENT

CASES: list[tuple[str, Message, grpc.StatusCode, str]] = [
    ("swarm-no-agents", swarm([], "t"), INVALID, "swarm.agents"),
    ("swarm-duplicate", swarm([A, B, agent("a")], "t"), INVALID, "swarm.agents[2]"),
    ("swarm-no-mode", patterns_pb2.SwarmRun(agents=[A], task="t"), INVALID, "swarm.mode"),
    ("debate-of-one", swarm([A], "t", mode="debate"), INVALID, "swarm.agents"),
    ("swarm-unnamed", swarm([agent("")], "t"), INVALID, "swarm.agents[0].spec.name"),
    ("swarm-unknown-registered", swarm([registered("ghost")], "t"), grpc.StatusCode.NOT_FOUND,
     "swarm.agents[0].registered_name"),
    ("swarm-bad-synthesizer", swarm([A], "t", synthesizer=agent("x y")), INVALID, "swarm.synthesizer.spec.name"),
    ("pipeline-no-stages", pipeline([], "t"), INVALID, "pipeline.stages"),
    ("pipeline-duplicate", pipeline([A, A], "t"), INVALID, "pipeline.stages[1]"),
    ("supervisor-no-workers", supervisor([], C, "t"), INVALID, "supervisor.workers"),
    ("supervisor-max-rounds-0", supervisor([A], C, "t", max_rounds=0), INVALID, "supervisor.max_rounds"),
    ("supervisor-missing", patterns_pb2.SupervisorRun(workers=[A], task="t"), INVALID, "supervisor.supervisor"),
    ("supervisor-is-a-worker", supervisor([A, B], B, "t"), INVALID, "supervisor.supervisor"),
    ("delegator-no-main", patterns_pb2.DelegatorRun(specialists=[B], task="t"), INVALID, "delegator.main"),
    ("delegator-no-specialists", delegator(A, [], "t"), INVALID, "delegator.specialists"),
    ("delegator-duplicate", delegator(A, [B, B], "t"), INVALID, "delegator.specialists[1]"),
    ("delegator-main-as-specialist", delegator(A, [B, A], "t"), INVALID, "delegator.specialists[1]"),
    ("spawn-no-main", patterns_pb2.SpawnSubtaskRun(task="t"), INVALID, "spawn_subtask.main"),
    ("vote-no-agents", vote([], "t"), INVALID, "vote.agents"),
    ("vote-duplicate", vote([A, A], "t"), INVALID, "vote.agents[1]"),
    ("fleet-no-agents", fleet([]), INVALID, "fleet.agents"),
    ("fleet-duplicate", fleet([A, B, B]), INVALID, "fleet.agents[2]"),
    ("review-reviewer-is-author", adversarial_review(A, "w", ["c"], author="a"), INVALID,
     "adversarial_review.reviewer"),
    ("review-no-reviewer", patterns_pb2.AdversarialReviewRun(work_output="w", criteria=["c"]), INVALID,
     "adversarial_review.reviewer"),
    ("review-no-work", adversarial_review(A, "  ", ["c"]), INVALID, "adversarial_review.work_output"),
    ("review-no-criteria", adversarial_review(A, "w", []), INVALID, "adversarial_review.criteria"),
    ("review-empty-criterion", adversarial_review(A, "w", ["ok", ""]), INVALID, "adversarial_review.criteria[1]"),
    ("tournament-no-competitors", tournament([], C, "t"), INVALID, "tournament.competitors"),
    ("tournament-duplicate", tournament([A, A], C, "t"), INVALID, "tournament.competitors[1]"),
    ("tournament-no-judge", patterns_pb2.TournamentRun(competitors=[A], task="t"), INVALID, "tournament.judge"),
    ("tournament-judge-competes", tournament([A, B], A, "t"), INVALID, "tournament.judge"),
    ("advisor-max-uses-0", advisor(A, B, "t", max_uses=0), INVALID, "advisor.max_uses"),
    ("advisor-advises-itself", advisor(A, A, "t", max_uses=1), INVALID, "advisor.advisor"),
    ("advisor-missing", patterns_pb2.AdvisorRun(agent=A, task="t", max_uses=1), INVALID, "advisor.advisor"),
    ("advisor-no-agent", patterns_pb2.AdvisorRun(advisor=B, task="t", max_uses=1), INVALID, "advisor.agent"),
]


@pytest.mark.parametrize(("pattern", "code", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_bad_pattern_requests_name_the_field(
    client: Client, pattern: Message, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.start_run(pattern)
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(f"{field}:"), err.value.details()
    assert await client.list_runs() == []


async def test_duplicate_names_say_where_the_first_one_is(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.start_run(swarm([A, B, A], "t"))
    assert err.value.details() == "swarm.agents[2]: duplicate agent name 'a' (also swarm.agents[0])"


async def test_bad_spawn_calls_are_call_errors_and_the_run_carries_on(client: Client, workers: Workers) -> None:
    errors: list[str] = []

    async def sub(ctx: AgentContext) -> str:
        return "sub done"

    async def main(ctx: AgentContext) -> str:
        for task, name in (("", ""), ("t", "two words"), ("t", "main"), ("t", "x"), ("t", "x")):
            try:
                await ctx.spawn_subtask(task, name=name)
            except RuntimeCallError as err:
                errors.append(f"{err.code.name} {err}")
        return "done"

    await workers.start({"main": main, "main.subtask": sub}, max_in_flight=2)
    run = await client.run(spawn_subtask(agent("main"), "t"))
    assert run.result.spawn_subtask.final_answer == "done"
    assert errors == [
        "INVALID_ARGUMENT spawn_subtask.task: must not be empty",
        "INVALID_ARGUMENT spawn_subtask.name: 'two words' is not an agent name (at most 256 characters, no whitespace)",
        "INVALID_ARGUMENT spawn_subtask.name: 'main' is already used by another agent of this run",
        "INVALID_ARGUMENT spawn_subtask.name: 'x' is already used by another agent of this run",
    ]
    assert [r.name for r in run.result.spawn_subtask.subtasks] == ["x"]

