"""One agent, one task."""

from __future__ import annotations

from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.infra import RunInfra, succeeded
from carsvc.domain.runtime import PatternOutcome
from carsvc.domain.specs import Limits, Resolver, check_text, require_ref


class Single:
    name: ClassVar[str] = "single"

    def __init__(self, agent: types_pb2.AgentSpec, task: str) -> None:
        self.agent = agent
        self.task = task

    @classmethod
    def build(cls, msg: patterns_pb2.SingleRun, resolve: Resolver, limits: Limits) -> Single:
        agent = resolve(require_ref(msg, "agent", "single"), "single.agent")
        check_text(msg.task, "single.task", limits)
        return cls(agent, msg.task)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        output = await infra.admit(self.agent.name, role="agent", step="single")
        if output is None:
            output = await infra.run_agent(self.agent, self.task, role="agent", step="single")
            reason = "completed" if succeeded(output) else "agent_failed"
        else:
            reason = "budget_exhausted"
        result = patterns_pb2.SingleResult(task=self.task, output=output)
        if reason == "completed":
            return PatternOutcome(result)
        detail = output.error if output.HasField("error") else "the agent returned an empty answer"
        return PatternOutcome(result, failed=True, reason=reason, detail=detail)
