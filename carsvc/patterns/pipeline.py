"""Pipeline: a sequential chain where each stage builds on the ones before.

As in car-multi, a pipeline is a sequential swarm without a synthesizer: stage
k gets SEQUENTIAL_TASK with the succeeded answers before it, each stage is
gated just before it starts, and a failed or refused stage does not stop the
chain. `final_answer` is the last stage's answer if it succeeded, else empty
(and the run fails: its product is missing)."""

from __future__ import annotations

from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import PatternOutcome
from carsvc.domain.specs import Limits, Resolver, check_text, resolve_agents
from carsvc.patterns.outcomes import agent_failure
from carsvc.patterns.swarm import run_chain


class Pipeline:
    name: ClassVar[str] = "pipeline"

    def __init__(self, stages: list[types_pb2.AgentSpec], task: str) -> None:
        self.stages = stages
        self.task = task

    @classmethod
    def build(cls, msg: patterns_pb2.PipelineRun, resolve: Resolver, limits: Limits) -> Pipeline:
        stages = resolve_agents(msg.stages, "pipeline.stages", resolve, limits)
        check_text(msg.task, "pipeline.task", limits)
        return cls(stages, msg.task)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        stages = await run_chain(infra, self.stages, self.task, role="stage", steps="pipeline")
        last = stages[-1]
        result = patterns_pb2.PipelineResult(
            task=self.task,
            stages=stages,
            final_answer=last.answer if succeeded(last) else "",
            all_succeeded=all(succeeded(o) for o in stages),
        )
        if not succeeded(last):
            return agent_failure(result, last, "last stage")
        return PatternOutcome(result)
