"""Fleet: independent agents, each on its own mission, at once.

No ordering and no review loop: every agent is gated (one parallel batch) and
runs on FleetRun.task, or, when that is empty, on its own system prompt (its
mission). With `agent_timeout_secs`, an agent still running after that long is
cancelled on its worker and its output says it timed out. `succeeded + failed`
is always the number of agents (refused ones count as failed).
See docs/patterns/fleet.md."""

from __future__ import annotations

import math
import time
from typing import ClassVar

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.infra import MAX_TIMEOUT_S, RunInfra, succeeded
from carsvc.domain.runtime import Job, PatternOutcome, run_batch
from carsvc.domain.specs import Limits, Resolver, check_text, resolve_agents
from carsvc.patterns.outcomes import no_output

AgentSpec = types_pb2.AgentSpec


class Fleet:
    name: ClassVar[str] = "fleet"

    def __init__(self, agents: list[AgentSpec], task: str = "", agent_timeout: float | None = None) -> None:
        self.agents = agents
        self.task = task
        self.agent_timeout = agent_timeout

    @classmethod
    def build(cls, msg: patterns_pb2.FleetRun, resolve: Resolver, limits: Limits) -> Fleet:
        agents = resolve_agents(msg.agents, "fleet.agents", resolve, limits)
        check_text(msg.task, "fleet.task", limits)
        timeout = None
        if msg.HasField("agent_timeout_secs"):
            timeout = msg.agent_timeout_secs
            if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
                raise InvalidArgument(
                    f"must be a positive number of seconds up to {MAX_TIMEOUT_S:.0f}, not {timeout}",
                    field="fleet.agent_timeout_secs",
                )
        return cls(agents, msg.task, timeout)

    async def run(self, infra: RunInfra) -> PatternOutcome:
        started = time.perf_counter()
        jobs = [
            Job(a, self.task or a.system_prompt, role="agent", step=f"fleet/{i}", index=i, timeout=self.agent_timeout)
            for i, a in enumerate(self.agents)
        ]
        outputs = await run_batch(infra, jobs)
        ok = sum(1 for o in outputs if succeeded(o))
        result = patterns_pb2.FleetResult(
            outputs=outputs,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            succeeded=ok,
            failed=len(outputs) - ok,
        )
        if not ok:
            return no_output(result, outputs)
        return PatternOutcome(result)
