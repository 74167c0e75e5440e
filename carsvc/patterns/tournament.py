"""Tournament: candidates answer, then a single-elimination bracket.

Every competitor answers the task (one gated batch); those that succeeded enter
the bracket in competitor order. Each round pairs them in order (0 v 1,
2 v 3, ...), an odd one out (the last) gets a bye, and the matches of a round
run at once, each judged by a fresh judge instance `{judge}_{m}` (m counts
matches from 0) on TOURNAMENT_JUDGE_TASK. The judge answers A (left) or B
(right), or a competitor's name; anything else, a failed judge, or a judge the
budget refuses, and the left candidate wins with a note saying why.
`ranking`: the winner, then losers of later rounds before earlier ones (bracket
order within a round), then competitors that never entered (competitor order).
See docs/patterns/tournament.md."""

from __future__ import annotations

import asyncio
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, error_text, run_admitted, run_batch
from carsvc.domain.specs import Limits, Resolver, check_distinct, check_text, copy_spec, require_ref, resolve_agents
from carsvc.patterns.outcomes import no_output
from carsvc.patterns.prompts import TOURNAMENT_JUDGE_TASK

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
MatchResult = patterns_pb2.MatchResult
_DECORATION = " \t*`\"'.:!()[]"


def parse_verdict(reply: str, left: str, right: str) -> str | None:
    """The winner's name from a judge's reply, or None when it is unclear.

    The first non-empty line, stripped of quotes, emphasis and punctuation,
    must be A or B (any case; A is the left candidate) or a candidate's exact
    name."""
    for line in reply.splitlines():
        token = line.strip(_DECORATION)
        if token:
            break
    else:
        return None
    if token.upper() == "A":
        return left
    if token.upper() == "B":
        return right
    if token in (left, right):
        return token
    return None


class Tournament:
    name: ClassVar[str] = "tournament"

    def __init__(self, competitors: list[AgentSpec], judge: AgentSpec, task: str) -> None:
        self.competitors = competitors
        self.judge = judge
        self.task = task

    @classmethod
    def build(cls, msg: patterns_pb2.TournamentRun, resolve: Resolver, limits: Limits) -> Tournament:
        competitors = resolve_agents(msg.competitors, "tournament.competitors", resolve, limits)
        judge = resolve(require_ref(msg, "judge", "tournament"), "tournament.judge")
        check_distinct(judge, competitors, "tournament.judge", "a competitor")
        check_text(msg.task, "tournament.task", limits)
        return cls(competitors, judge, msg.task)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        jobs = [
            Job(c, self.task, role="competitor", step=f"tournament/{i}", index=i)
            for i, c in enumerate(self.competitors)
        ]
        candidates = await run_batch(infra, jobs)
        result = patterns_pb2.TournamentResult(task=self.task, candidates=candidates)
        answers = {c.name: c.answer for c in candidates if succeeded(c)}
        alive = [c.name for c in candidates if succeeded(c)]
        if not alive:
            result.ranking.extend(c.name for c in candidates)
            return no_output(result, candidates)
        eliminated: list[list[str]] = []
        number = 0
        while len(alive) > 1:
            number += 1
            pairs = [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
            base = len(result.matches)
            games = [self._match(infra, number, base + m, a, b, answers) for m, (a, b) in enumerate(pairs)]
            matches = await asyncio.gather(*games)
            result.matches.extend(matches)
            winners = [m.winner for m in matches]
            eliminated.append([m.right if m.winner == m.left else m.left for m in matches])
            alive = winners + ([alive[-1]] if len(alive) % 2 else [])
        winner = alive[0]
        result.winner_name = winner
        result.winner_answer = answers[winner]
        result.ranking.append(winner)
        for losers in reversed(eliminated):
            result.ranking.extend(losers)
        result.ranking.extend(c.name for c in candidates if c.name not in answers)
        return PatternOutcome(result)

    async def _match(
        self, infra: RunInfra, number: int, index: int, left: str, right: str, answers: dict[str, str]
    ) -> MatchResult:
        match = MatchResult(round=number, left=left, right=right, winner=left)
        judge = copy_spec(self.judge, name=f"{self.judge.name}_{index}")
        step = f"tournament/round-{number}/match-{index}/judge"
        output = await infra.admit(judge.name, role="judge", index=index, step=step)
        if output is not None:
            match.note = f"judge refused by the budget ({output.error}); the left candidate wins"
        else:
            task = TOURNAMENT_JUDGE_TASK.format(
                task=self.task, left=left, left_answer=answers[left], right=right, right_answer=answers[right]
            )
            job = Job(judge, task, role="judge", step=step, index=index, agent=self.judge.name)
            output = await run_admitted(infra, job)
            if not succeeded(output):
                match.note = f"judge failed ({error_text(output)}); the left candidate wins"
            else:
                picked = parse_verdict(output.answer, left, right)
                if picked is None:
                    match.note = f"unparseable verdict {output.answer[:200]!r}; the left candidate wins"
                else:
                    match.winner = picked
        match.judge_output.CopyFrom(output)
        return match
