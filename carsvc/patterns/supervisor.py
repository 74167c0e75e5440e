"""Supervisor: workers answer in parallel each round, a supervisor reviews, and
its feedback goes into the next round, until it approves or `max_rounds` pass.

Approval: the review contains the whole word APPROVED (case-sensitive) and not
NOT APPROVED. Never approved is `approved=false`, not an error. Workers are
load-bearing (skipped outputs); the supervisor is an optional finalizer: when
the budget refuses it, or it fails, the loop ends with what it has
(`approved=false`). A round whose workers were all refused ends the loop
before any review. See docs/patterns/supervisor.md for the decisions."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, error_text, run_admitted, run_batch
from carsvc.domain.specs import Limits, Resolver, check_distinct, check_text, require_ref, resolve_agents
from carsvc.patterns.answers import answer_lines
from carsvc.patterns.outcomes import is_skipped, no_output
from carsvc.patterns.prompts import (
    ANSWER_LINE,
    FAILED_ANSWER_LINE,
    NO_ANSWER,
    SUPERVISOR_REVIEW_TASK,
    SUPERVISOR_REVISE_TASK,
)

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
DEFAULT_MAX_ROUNDS = 3
MAX_ROUNDS = 1_000
_APPROVED = re.compile(r"\bAPPROVED\b")
_NOT_APPROVED = re.compile(r"\bNOT\s+APPROVED\b")


def is_approved(review: str) -> bool:
    """The whole word APPROVED, and no NOT APPROVED (both case-sensitive)."""
    return _APPROVED.search(review) is not None and _NOT_APPROVED.search(review) is None


def review_lines(outputs: Sequence[AgentOutput]) -> str:
    return "\n".join(
        ANSWER_LINE.format(name=o.name, answer=o.answer)
        if succeeded(o)
        else FAILED_ANSWER_LINE.format(name=o.name, error=error_text(o))
        for o in outputs
    )


class Supervisor:
    name: ClassVar[str] = "supervisor"

    def __init__(self, workers: list[AgentSpec], supervisor: AgentSpec, task: str, max_rounds: int) -> None:
        self.workers = workers
        self.supervisor = supervisor
        self.task = task
        self.max_rounds = max_rounds

    @classmethod
    def build(cls, msg: patterns_pb2.SupervisorRun, resolve: Resolver, limits: Limits) -> Supervisor:
        workers = resolve_agents(msg.workers, "supervisor.workers", resolve, limits)
        supervisor = resolve(require_ref(msg, "supervisor", "supervisor"), "supervisor.supervisor")
        check_distinct(supervisor, workers, "supervisor.supervisor", "a worker")
        check_text(msg.task, "supervisor.task", limits)
        max_rounds = DEFAULT_MAX_ROUNDS
        if msg.HasField("max_rounds"):
            if not 1 <= msg.max_rounds <= MAX_ROUNDS:
                raise InvalidArgument(
                    f"must be within 1..{MAX_ROUNDS} (leave it unset for the default, {DEFAULT_MAX_ROUNDS})",
                    field="supervisor.max_rounds",
                )
            max_rounds = msg.max_rounds
        return cls(workers, supervisor, msg.task, max_rounds)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        result = patterns_pb2.SupervisorResult(task=self.task)
        previous: Sequence[AgentOutput] = ()
        feedback = ""
        answered: Sequence[AgentOutput] = ()  # the latest round in which a worker succeeded
        for number in range(1, self.max_rounds + 1):
            jobs = [
                Job(
                    w,
                    self._worker_task(previous[i] if previous else None, feedback),
                    role="worker",
                    step=f"supervisor/round-{number}/worker-{i}",
                    index=i,
                )
                for i, w in enumerate(self.workers)
            ]
            outputs = await run_batch(infra, jobs)
            this_round = result.rounds.add(outputs=outputs)
            if any(succeeded(o) for o in outputs):
                answered = outputs
            if all(is_skipped(o) for o in outputs):
                break  # nothing to review
            review = await infra.admit(
                self.supervisor.name, role="supervisor", index=number - 1, step=f"supervisor/round-{number}/review"
            )
            if review is None:
                review_task = SUPERVISOR_REVIEW_TASK.format(
                    task=self.task, round=number, max_rounds=self.max_rounds, answers=review_lines(outputs)
                )
                job = Job(
                    self.supervisor,
                    review_task,
                    role="supervisor",
                    step=f"supervisor/round-{number}/review",
                    index=number - 1,
                )
                review = await run_admitted(infra, job)
            this_round.review.CopyFrom(review)
            if not succeeded(review):
                break  # refused or failed: end with what we have
            result.supervisor_feedback.append(review.answer)
            if is_approved(review.answer):
                result.approved = True
                break
            previous, feedback = outputs, review.answer
        result.total_rounds = len(result.rounds)
        if not answered:
            return no_output(result, [o for r in result.rounds for o in r.outputs])
        if len(self.workers) == 1:
            result.final_answer = answered[0].answer
        else:
            result.final_answer = answer_lines(answered)
        return PatternOutcome(result)

    def _worker_task(self, previous: AgentOutput | None, feedback: str) -> str:
        if previous is None:
            return self.task
        answer = previous.answer if succeeded(previous) else NO_ANSWER
        return SUPERVISOR_REVISE_TASK.format(task=self.task, previous=answer, feedback=feedback)
