"""Advisor: a running agent consults a stronger advisor agent for a bounded verdict.

The agent's worker makes the `consult_advisor(prompt)` runtime call (the
pattern grants the `consult_advisor` tool on the spec it sends). Each
consultation runs a fresh advisor on ADVISOR_TASK, with no tools and a state
view whose writes are thrown away (it advises; it never acts). Its reply must be
one JSON object `{"verdict": continue|plan|correction|stop|uncertain, ...}`
with the verdict's text field (rationale | guidance | guidance | reason |
reason); anything else is `uncertain`. After `max_uses` consultations, the call
fails with RESOURCE_EXHAUSTED "advisor exhausted: used N of M allowed
consultations". See docs/patterns/advisor.md."""

from __future__ import annotations

from typing import Any, ClassVar

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, types_pb2, worker_pb2
from carsvc.domain.errors import Code, FailedPrecondition, InvalidArgument, ResourceExhausted
from carsvc.domain.infra import RunInfra, RunningAgent, succeeded
from carsvc.domain.overlay import Overlay
from carsvc.domain.runtime import CallScope, Job, PatternOutcome, error_text, run_gated
from carsvc.domain.specs import Limits, Resolver, check_distinct, check_text, copy_spec, require_ref
from carsvc.patterns.answers import extract_json
from carsvc.patterns.outcomes import agent_failure
from carsvc.patterns.prompts import ADVISOR_TASK

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
AdvisorVerdict = patterns_pb2.AdvisorVerdict
AdvisorConsultation = patterns_pb2.AdvisorConsultation
CONSULT_ADVISOR_TOOL = "consult_advisor"
UNCERTAIN = patterns_pb2.ADVISOR_VERDICT_KIND_UNCERTAIN
# verdict -> (kind, the field carrying its text)
VERDICTS = {
    "continue": (patterns_pb2.ADVISOR_VERDICT_KIND_CONTINUE, "rationale"),
    "plan": (patterns_pb2.ADVISOR_VERDICT_KIND_PLAN, "guidance"),
    "correction": (patterns_pb2.ADVISOR_VERDICT_KIND_CORRECTION, "guidance"),
    "stop": (patterns_pb2.ADVISOR_VERDICT_KIND_STOP, "reason"),
    "uncertain": (UNCERTAIN, "reason"),
}
EXCERPT_CHARS = 200


def parse_advice(reply: str) -> AdvisorVerdict:
    """The verdict in an advisor's reply; malformed or incomplete is uncertain."""
    data: Any = extract_json(reply)
    if isinstance(data, dict):
        name = data.get("verdict")
        if isinstance(name, str) and name.strip().lower() in VERDICTS:
            kind, field = VERDICTS[name.strip().lower()]
            text = data.get(field)
            if isinstance(text, str) and text.strip():
                return AdvisorVerdict(kind=kind, text=text)
    return AdvisorVerdict(kind=UNCERTAIN, text=f"malformed advisor verdict: {reply[:EXCERPT_CHARS]}")


class Advisor:
    name: ClassVar[str] = "advisor"

    def __init__(self, agent: AgentSpec, advisor: AgentSpec, task: str, max_uses: int) -> None:
        self.agent = agent
        self.advisor = advisor
        self.task = task
        self.max_uses = max_uses

    @classmethod
    def build(cls, msg: patterns_pb2.AdvisorRun, resolve: Resolver, limits: Limits) -> Advisor:
        agent = resolve(require_ref(msg, "agent", "advisor"), "advisor.agent")
        advisor = resolve(require_ref(msg, "advisor", "advisor"), "advisor.advisor")
        check_distinct(advisor, [agent], "advisor.advisor", "the advised agent")
        check_text(msg.task, "advisor.task", limits)
        if msg.max_uses == 0:
            raise InvalidArgument("must be at least 1", field="advisor.max_uses")
        return cls(agent, advisor, msg.task, msg.max_uses)

    def advisor_spec(self) -> AgentSpec:
        spec = copy_spec(self.advisor)
        del spec.tools[:]  # it advises; it does not act
        return spec

    async def run(self, infra: RunInfra) -> PatternOutcome:
        consultations: dict[int, AdvisorConsultation] = {}
        used = 0

        async def consult(ctx: RunningAgent, call: worker_pb2.ConsultAdvisorCall) -> AdvisorConsultation:
            nonlocal used
            if ctx.role != "agent":
                raise FailedPrecondition(
                    f"only the advised agent '{self.agent.name}' may consult the advisor", code=Code.PERMISSION_DENIED
                )
            if not call.prompt.strip():
                raise InvalidArgument("must not be empty", field="consult_advisor.prompt")
            if used >= self.max_uses:
                raise ResourceExhausted(
                    f"advisor exhausted: used {used} of {self.max_uses} allowed consultations"
                )
            used += 1
            index = used - 1
            spec = self.advisor_spec()
            # The advisor's writes land in an isolated overlay over a scratch layer
            # that is never merged: reads fall through, nothing it writes is kept.
            scratch = Overlay(ctx.state, spec.name)
            task = ADVISOR_TASK.format(task=self.task, prompt=call.prompt)
            job = Job(
                spec, task, role="advisor", step=f"advisor/{index}", index=index, isolated=True, parent_state=scratch
            )
            output = await run_gated(infra, job)
            if succeeded(output):
                verdict = parse_advice(output.answer)
            else:
                verdict = AdvisorVerdict(kind=UNCERTAIN, text=f"no advice: {error_text(output)}")
            consultation = consultations[index] = AdvisorConsultation(
                verdict=verdict, advisor_output=output, used=index + 1, max_uses=self.max_uses
            )
            infra.emit(
                events_pb2.RunEvent(
                    advisor_consulted=events_pb2.AdvisorConsulted(agent=ctx.name, consultation=consultation)
                )
            )
            return consultation

        output = await infra.admit(self.agent.name, role="agent", step="agent")
        if output is None:
            async with CallScope(infra) as calls:
                calls.install("consult_advisor", consult)
                spec = copy_spec(self.agent, add_tools=[CONSULT_ADVISOR_TOOL])
                output = await infra.run_agent(spec, self.task, role="agent", step="agent")
        result = patterns_pb2.AdvisorResult(
            task=self.task, output=output, consultations=[consultations[i] for i in sorted(consultations)]
        )
        if not succeeded(output):
            return agent_failure(result, output, "agent")
        return PatternOutcome(result)
