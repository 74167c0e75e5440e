"""Vote: every agent answers in parallel; the normalised majority wins.

Normalisation: trim, lowercase, collapse whitespace, strip trailing `.!?`.
The most common normalised answer among succeeded votes wins; a tie goes to
the group whose first vote came from the earliest agent. `winner` is that
earliest vote's answer (trimmed); `agreement_ratio` = winner votes / succeeded
votes (0 when none). An optional synthesizer sees every vote and picks the
final `winner`; refused by the budget, the majority answer stands.
See docs/patterns/vote.md."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, run_admitted, run_batch
from carsvc.domain.specs import Limits, Resolver, check_text, resolve_agents, resolve_optional
from carsvc.patterns.answers import answer_lines
from carsvc.patterns.outcomes import agent_failure, no_output
from carsvc.patterns.prompts import VOTE_SYNTHESIZE_TASK

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec


def normalise(answer: str) -> str:
    """Trim, lowercase, collapse whitespace, strip trailing `.!?`."""
    return " ".join(answer.split()).lower().rstrip(".!?").rstrip()


def tally(votes: Sequence[AgentOutput]) -> tuple[str, int, int]:
    """(winning answer, its votes, succeeded votes) by normalised majority;
    ties go to the earliest agent. ("", 0, 0) when no vote succeeded."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}  # normalised -> the earliest vote's answer (dicts keep insertion order)
    for vote in votes:
        if succeeded(vote):
            key = normalise(vote.answer)
            counts[key] = counts.get(key, 0) + 1
            first.setdefault(key, vote.answer.strip())
    if not counts:
        return "", 0, 0
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equals: the earliest group
    return first[best], counts[best], sum(counts.values())


class Vote:
    name: ClassVar[str] = "vote"

    def __init__(self, agents: list[AgentSpec], task: str, synthesizer: AgentSpec | None = None) -> None:
        self.agents = agents
        self.task = task
        self.synthesizer = synthesizer

    @classmethod
    def build(cls, msg: patterns_pb2.VoteRun, resolve: Resolver, limits: Limits) -> Vote:
        agents = resolve_agents(msg.agents, "vote.agents", resolve, limits)
        synthesizer = resolve_optional(msg, "synthesizer", "vote", resolve)
        check_text(msg.task, "vote.task", limits)
        return cls(agents, msg.task, synthesizer)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        jobs = [Job(a, self.task, role="voter", step=f"vote/{i}", index=i) for i, a in enumerate(self.agents)]
        votes = await run_batch(infra, jobs)
        majority, winner_votes, counted = tally(votes)
        result = patterns_pb2.VoteResult(
            task=self.task, votes=votes, winner=majority, agreement_ratio=winner_votes / counted if counted else 0.0
        )
        if not counted:
            return no_output(result, votes)
        if self.synthesizer is None:
            return PatternOutcome(result)
        synth = await infra.admit(self.synthesizer.name, role="synthesizer", step="vote/synthesizer")
        if synth is None:
            task = VOTE_SYNTHESIZE_TASK.format(
                task=self.task, count=counted, answers=answer_lines(votes), majority=majority, votes=winner_votes
            )
            synth = await run_admitted(infra, Job(self.synthesizer, task, role="synthesizer", step="vote/synthesizer"))
            if not succeeded(synth):
                result.winner = ""
                result.synthesizer_output.CopyFrom(synth)
                return agent_failure(result, synth, "synthesizer")
            result.winner = synth.answer
        result.synthesizer_output.CopyFrom(synth)
        return PatternOutcome(result)
