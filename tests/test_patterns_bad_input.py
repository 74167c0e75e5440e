"""Bad pattern requests get INVALID_ARGUMENT (or NOT_FOUND for an unknown
registered agent) naming the field, and nothing starts (the checks in-process,
one test over the wire). Bad runtime calls: tests/test_patterns_delegation.py."""

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
    supervisor,
    swarm,
    tournament,
    vote,
)
from carsvc.domain.errors import CarError
from carsvc.testing import PatternEnvironment

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
def test_bad_pattern_requests_name_the_field(pattern: Message, code: grpc.StatusCode, field: str) -> None:
    """In-process: the builders' checks (carsvc.testing builds as the sidecar does)."""
    with pytest.raises(CarError) as err:
        PatternEnvironment({}).build(pattern)
    assert err.value.code.name == code.name
    assert str(err.value).startswith(f"{field}:"), str(err.value)


async def test_bad_requests_are_refused_over_the_wire_and_nothing_starts(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.start_run(swarm([A, B, A], "t"))
    assert err.value.code() == INVALID
    assert err.value.details() == "swarm.agents[2]: duplicate agent name 'a' (also swarm.agents[0])"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.start_run(swarm([registered("ghost")], "t"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert await client.list_runs() == []
