"""Adversarial review and tournament runs: over real workers (the wire), and
in-process against scripted agents (the patterns' logic). Conformance items 26-30."""

from __future__ import annotations

import json

import pytest

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.client import Client, adversarial_review, agent, tournament
from carsvc.patterns.adversarial_review import INCONCLUSIVE_EVIDENCE_CAP, parse_findings
from carsvc.patterns.prompts import REVIEW_TASK, TOURNAMENT_JUDGE_TASK
from carsvc.patterns.tournament import parse_verdict
from carsvc.testing import PatternEnvironment, ScriptedAgent
from carsvc.worker import AgentContext
from tests.conftest import Workers

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
P = patterns_pb2


# -- adversarial review ---------------------------------------------------------------------


def review_json(*findings: dict[str, object]) -> str:
    return json.dumps({"findings": list(findings)})


def test_finding_parsing() -> None:
    fenced = 'Here you go:\n```json\n[{"criterion": "c", "passed": false, "evidence": "a.py:3"}]\n```'
    (f,) = parse_findings(fenced) or []
    assert (f.criterion, f.passed, f.evidence, f.severity) == ("c", False, "a.py:3", P.SEVERITY_MAJOR)
    (f,) = parse_findings(review_json({"criterion": "c", "passed": True})) or []
    assert f.severity == P.SEVERITY_INFO and f.evidence == ""
    (f,) = parse_findings(review_json({"criterion": "c", "passed": False, "severity": "BLOCKER"})) or []
    assert f.severity == P.SEVERITY_BLOCKER
    for bad in (
        "looks fine to me",
        review_json(),
        review_json({"criterion": "c", "passed": "yes"}),
        review_json({"criterion": "", "passed": True}),
        review_json({"criterion": "c", "passed": True, "severity": "catastrophic"}),
        json.dumps({"findings": ["c passed"]}),
    ):
        assert parse_findings(bad) is None, bad


async def test_reviewer_sees_only_the_work_and_the_criteria(client: Client, workers: Workers) -> None:
    """Item 28: a fresh reviewer, no author context."""
    seen: list[AgentContext] = []

    async def reviewer(ctx: AgentContext) -> str:
        seen.append(ctx)
        return review_json(
            {"criterion": "has tests", "passed": True, "evidence": "test_x.py:1"},
            {"criterion": "no TODOs", "passed": True, "evidence": "grep found none", "severity": "minor"},
        )

    await workers.start({"critic": reviewer})
    run = await client.run(
        adversarial_review(
            agent("critic", "You are strict."), "def f(): return 1", ["has tests", "no TODOs"], author="alice-bot"
        )
    )
    assert run.status == SUCCEEDED and run.pattern == "adversarial_review"
    (ctx,) = seen
    assert ctx.task == REVIEW_TASK.format(work_output="def f(): return 1", criteria="1. has tests\n2. no TODOs")
    assert "alice-bot" not in ctx.task and ctx.spec.system_prompt == "You are strict."
    result = run.result.adversarial_review
    assert result.passed and result.blockers == 0
    assert [(f.criterion, f.severity) for f in result.findings] == [
        ("has tests", P.SEVERITY_INFO),
        ("no TODOs", P.SEVERITY_MINOR),
    ]
    assert list(result.criteria) == ["has tests", "no TODOs"]
    assert result.reviewer_output.name == "critic"


async def test_unparseable_review_is_one_capped_inconclusive_finding() -> None:
    """Item 29."""
    rambling = "I think it is mostly fine " * 200
    run = await PatternEnvironment({"critic": rambling}).run(adversarial_review(agent("critic"), "work", ["correct"]))
    assert run.status == SUCCEEDED
    result = run.result.adversarial_review
    (finding,) = result.findings
    assert finding.severity == P.SEVERITY_INCONCLUSIVE and not finding.passed
    assert finding.evidence == rambling[:INCONCLUSIVE_EVIDENCE_CAP] and len(finding.evidence) == 1024
    assert not result.passed


@pytest.mark.parametrize(
    ("finding", "fail_on_blockers", "passed"),
    [
        ({"criterion": "safe", "passed": False, "severity": "blocker"}, None, False),
        ({"criterion": "safe", "passed": False, "severity": "blocker"}, False, False),
        ({"criterion": "safe", "passed": True, "severity": "blocker"}, None, False),  # blockers auto-fail
        ({"criterion": "safe", "passed": True, "severity": "blocker"}, False, True),
        ({"criterion": "safe", "passed": False, "severity": "minor"}, None, False),
        ({"criterion": "safe", "passed": True, "severity": "major"}, None, True),
    ],
)
async def test_fail_on_blockers(finding: dict[str, object], fail_on_blockers: bool | None, passed: bool) -> None:
    """Item 30."""
    env = PatternEnvironment({"critic": review_json(finding)})
    run = await env.run(adversarial_review(agent("critic"), "w", ["safe"], fail_on_blockers=fail_on_blockers))
    result = run.result.adversarial_review
    assert result.passed is passed
    assert result.blockers == (1 if finding["severity"] == "blocker" else 0)


async def test_failed_reviewer_fails_the_run() -> None:
    def reviewer(agent: ScriptedAgent) -> str:
        raise RuntimeError("reviewer crashed")

    run = await PatternEnvironment(reviewer).run(adversarial_review(agent("critic"), "w", ["c"]))
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    (finding,) = run.result.adversarial_review.findings
    assert finding.severity == P.SEVERITY_INCONCLUSIVE
    assert finding.evidence == "the reviewer produced no review: RuntimeError: reviewer crashed"


# -- tournament ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "winner"),
    [
        ("A", "x"),
        ("b", "y"),
        ("**B**", "y"),
        ("A.\nBecause it is shorter.", "x"),
        ("'y'", "y"),
        ("\n\n  x  ", "x"),
        ("Neither", None),
        ("", None),
        ("Answer A", None),
    ],
)
def test_judge_verdict_parsing(reply: str, winner: str | None) -> None:
    assert parse_verdict(reply, "x", "y") == winner


async def test_bracket_with_byes_fresh_judges_and_ranking(client: Client, workers: Workers) -> None:
    """Item 26 and 27 (fresh judge per match): 5 candidates, 4 matches."""
    judges: list[AgentContext] = []

    async def competitor(ctx: AgentContext) -> str:
        return f"answer of {ctx.name}"

    async def judge(ctx: AgentContext) -> str:
        judges.append(ctx)
        return "B"  # the right candidate always wins

    await workers.start({"c*": competitor, "judge": judge}, max_in_flight=5)
    run = await client.run(tournament([agent(f"c{i}") for i in range(5)], agent("judge"), "best haiku"))
    assert run.status == SUCCEEDED and run.pattern == "tournament"
    result = run.result.tournament
    assert [c.answer for c in result.candidates] == [f"answer of c{i}" for i in range(5)]
    assert [(m.round, m.left, m.right, m.winner) for m in result.matches] == [
        (1, "c0", "c1", "c1"),
        (1, "c2", "c3", "c3"),  # c4 has a bye
        (2, "c1", "c3", "c3"),  # c4 has a bye again
        (3, "c3", "c4", "c4"),
    ]
    assert result.winner_name == "c4" and result.winner_answer == "answer of c4"
    assert list(result.ranking) == ["c4", "c3", "c1", "c0", "c2"]
    assert len({j.assignment_id for j in judges}) == 4  # a fresh agent per match
    assert sorted(j.name for j in judges) == ["judge_0", "judge_1", "judge_2", "judge_3"]
    assert {j.agent for j in judges} == {"judge"}
    first = next(j for j in judges if j.name == "judge_0")
    assert first.task == TOURNAMENT_JUDGE_TASK.format(
        task="best haiku", left="c0", left_answer="answer of c0", right="c1", right_answer="answer of c1"
    )


async def test_failed_candidates_skip_the_bracket_and_unclear_verdicts_favour_the_left() -> None:
    def script(agent: ScriptedAgent) -> str:
        if agent.name == "bad":
            raise RuntimeError("no answer")
        return "they are both lovely" if agent.agent == "judge" else agent.name

    env = PatternEnvironment(script)
    run = await env.run(tournament([agent("bad"), agent("good1"), agent("good2")], agent("judge"), "t"))
    result = run.result.tournament
    (match,) = result.matches
    assert (match.left, match.right, match.winner) == ("good1", "good2", "good1")
    assert match.note == "unparseable verdict 'they are both lovely'; the left candidate wins"
    assert list(result.ranking) == ["good1", "good2", "bad"]
    # A single candidate wins without a match.
    run = await env.run(tournament([agent("good9")], agent("judge"), "t"))
    assert run.status == SUCCEEDED
    assert run.result.tournament.winner_name == "good9" and not run.result.tournament.matches


async def test_no_candidate_means_no_winner() -> None:
    """Item 27: no competitor answer -> empty winner_name."""

    def down(agent: ScriptedAgent) -> str:
        raise RuntimeError("down")

    run = await PatternEnvironment(down).run(tournament([agent("a"), agent("b")], agent("judge"), "t"))
    assert run.status == FAILED and run.termination_reason == "agent_failed"
    assert run.result.tournament.winner_name == "" and not run.result.tournament.matches
    assert list(run.result.tournament.ranking) == ["a", "b"]
