"""Swarm: a group of agents on one task, in parallel, in sequence or in a debate.

* parallel: every agent answers the task at once (one gated batch).
* sequential: one after another, each gated just before it starts; agent k
  gets SEQUENTIAL_TASK with the answers of the succeeded agents before it.
* debate: round 1 is a parallel batch on the plain task; round 2 is a second
  batch where each agent gets DEBATE_REVISE_TASK (its own and the others'
  round-1 answers); the synthesizer, if any, judges on DEBATE_JUDGE_TASK.

The synthesizer is an optional finalizer: absent or refused by the budget, the
final summary falls back (labelled answers; in sequential mode without one, the
last succeeded answer). With `isolated`, every agent writes to its own state
overlay, merged into the shared state only when that agent succeeds.
See docs/patterns/swarm.md for the decisions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, run_admitted, run_batch, run_gated
from carsvc.domain.specs import Limits, Resolver, check_text, resolve_agents, resolve_optional
from carsvc.patterns.answers import answer_lines
from carsvc.patterns.outcomes import agent_failure, no_output
from carsvc.patterns.prompts import (
    ANSWER_LINE,
    DEBATE_JUDGE_TASK,
    DEBATE_REVISE_TASK,
    NO_ANSWER,
    SEQUENTIAL_TASK,
    SYNTHESIZE_TASK,
)

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
PARALLEL = patterns_pb2.SWARM_MODE_PARALLEL
SEQUENTIAL = patterns_pb2.SWARM_MODE_SEQUENTIAL
DEBATE = patterns_pb2.SWARM_MODE_DEBATE
_MODES = {PARALLEL, SEQUENTIAL, DEBATE}


def sequential_task(task: str, earlier: Sequence[AgentOutput]) -> str:
    """The task of the next agent in a chain: the task alone, or SEQUENTIAL_TASK
    when agents before it succeeded."""
    answers = answer_lines(earlier)
    return SEQUENTIAL_TASK.format(task=task, answers=answers) if answers else task


async def run_chain(
    infra: RunInfra, agents: Sequence[AgentSpec], task: str, *, role: str, steps: str, isolated: bool = False
) -> list[AgentOutput]:
    """Runs `agents` one after another, each gated just before it starts, each
    task carrying the answers before it. A failed or refused agent does not
    stop the chain. Agent i's step key is `{steps}/{i}`."""
    outputs: list[AgentOutput] = []
    for i, spec in enumerate(agents):
        job = Job(spec, sequential_task(task, outputs), role=role, step=f"{steps}/{i}", index=i, isolated=isolated)
        outputs.append(await run_gated(infra, job))
    return outputs


def labelled(outputs: Sequence[AgentOutput]) -> str:
    """The fallback for a missing synthesizer: succeeded answers labelled by agent."""
    return answer_lines(outputs)


class Swarm:
    name: ClassVar[str] = "swarm"

    def __init__(
        self,
        agents: list[AgentSpec],
        mode: int,
        task: str,
        synthesizer: AgentSpec | None = None,
        isolated: bool = False,
    ) -> None:
        self.agents = agents
        self.mode = mode
        self.task = task
        self.synthesizer = synthesizer
        self.isolated = isolated

    @classmethod
    def build(cls, msg: patterns_pb2.SwarmRun, resolve: Resolver, limits: Limits) -> Swarm:
        if msg.mode not in _MODES:
            raise InvalidArgument(
                "must be SWARM_MODE_PARALLEL, SWARM_MODE_SEQUENTIAL or SWARM_MODE_DEBATE", field="swarm.mode"
            )
        minimum = 2 if msg.mode == DEBATE else 1
        agents = resolve_agents(msg.agents, "swarm.agents", resolve, limits, minimum=minimum)
        synthesizer = resolve_optional(msg, "synthesizer", "swarm", resolve)
        check_text(msg.task, "swarm.task", limits)
        return cls(agents, msg.mode, msg.task, synthesizer, msg.isolated)

    def _jobs(self, tasks: Sequence[str], role: str, step: str) -> list[Job]:
        """One job per agent; `step` is a template of its step key over `i`."""
        return [
            Job(spec, t, role=role, step=step.format(i=i), index=i, isolated=self.isolated)
            for i, (spec, t) in enumerate(zip(self.agents, tasks, strict=True))
        ]

    async def run(self, infra: RunInfra) -> PatternOutcome:
        result = patterns_pb2.SwarmResult(task=self.task)
        if self.mode == SEQUENTIAL:
            outputs = await run_chain(
                infra, self.agents, self.task, role="agent", steps="swarm", isolated=self.isolated
            )
        elif self.mode == PARALLEL:
            outputs = await run_batch(infra, self._jobs([self.task] * len(self.agents), "agent", "swarm/{i}"))
        else:
            plain = [self.task] * len(self.agents)
            first = await run_batch(infra, self._jobs(plain, "debate_round1", "debate/round-1/agent-{i}"))
            result.first_round.extend(first)
            revised = [self._revise_task(i, first) for i in range(len(first))]
            outputs = await run_batch(infra, self._jobs(revised, "debate_round2", "debate/round-2/agent-{i}"))
        result.outputs.extend(outputs)
        if not any(succeeded(o) for o in outputs):
            return no_output(result, outputs)

        if self.synthesizer is None:
            if self.mode == SEQUENTIAL:  # the chain's most refined answer
                result.final_summary = next(o.answer for o in reversed(outputs) if succeeded(o))
            else:
                result.final_summary = labelled(outputs)
            return PatternOutcome(result)
        role = "judge" if self.mode == DEBATE else "synthesizer"
        step = "debate/judge" if self.mode == DEBATE else "swarm/synthesizer"
        skipped = await infra.admit(self.synthesizer.name, role=role, step=step)
        if skipped is not None:
            result.synthesizer_output.CopyFrom(skipped)
            result.final_summary = labelled(outputs)
            return PatternOutcome(result)
        template = DEBATE_JUDGE_TASK if self.mode == DEBATE else SYNTHESIZE_TASK
        task = template.format(task=self.task, count=len(outputs), answers=answer_lines(outputs))
        job = Job(self.synthesizer, task, role=role, step=step, isolated=self.isolated)
        synth = await run_admitted(infra, job)
        result.synthesizer_output.CopyFrom(synth)
        if not succeeded(synth):
            return agent_failure(result, synth, role)
        result.final_summary = synth.answer
        return PatternOutcome(result)

    def _revise_task(self, i: int, first: Sequence[AgentOutput]) -> str:
        own = first[i].answer if succeeded(first[i]) else NO_ANSWER
        others = "\n".join(
            ANSWER_LINE.format(name=o.name, answer=o.answer) for j, o in enumerate(first) if j != i and succeeded(o)
        )
        return DEBATE_REVISE_TASK.format(task=self.task, own=own, others=others or NO_ANSWER)
