"""Delegator: a main agent routes subtasks to fixed, named specialists.

The main agent's worker makes the `delegate(specialist, subtask)` runtime call
(the pattern grants the `delegate` tool on the spec it sends, and lists the
specialists' names in the spec's metadata under `specialists`). The sidecar
gates and runs the specialist on whichever worker serves it, records a
DelegationRecord, emits DelegationMade, and answers the call with the
specialist's output. An unknown specialist is a NOT_FOUND call error
("unknown specialist: 'x'") plus a failed record, never a crash; a specialist
the budget refuses is answered with its skipped output. Only the main agent
may delegate (depth 1). See docs/patterns/delegator.md."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, types_pb2, worker_pb2
from carsvc.domain.errors import Code, FailedPrecondition, NotFound
from carsvc.domain.infra import RunInfra, RunningAgent, succeeded
from carsvc.domain.runtime import CallScope, Job, PatternOutcome, run_recorded
from carsvc.domain.specs import Limits, Resolver, check_distinct, check_text, copy_spec, require_ref, resolve_agents
from carsvc.patterns.outcomes import agent_failure
from carsvc.values import to_value

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
DelegationRecord = patterns_pb2.DelegationRecord
DELEGATE_TOOL = "delegate"
SPECIALISTS_METADATA_KEY = "specialists"


class Delegator:
    name: ClassVar[str] = "delegator"

    def __init__(self, main: AgentSpec, specialists: list[AgentSpec], task: str) -> None:
        self.main = main
        self.specialists = {s.name: s for s in specialists}
        self.task = task

    @classmethod
    def build(cls, msg: patterns_pb2.DelegatorRun, resolve: Resolver, limits: Limits) -> Delegator:
        main = resolve(require_ref(msg, "main", "delegator"), "delegator.main")
        specialists = resolve_agents(msg.specialists, "delegator.specialists", resolve, limits)
        for i, spec in enumerate(specialists):
            check_distinct(spec, [main], f"delegator.specialists[{i}]", "the main agent")
        check_text(msg.task, "delegator.task", limits)
        return cls(main, specialists, msg.task)

    def main_spec(self) -> AgentSpec:
        """The main agent as sent: granted `delegate`, told the specialists' names."""
        spec = copy_spec(self.main, add_tools=[DELEGATE_TOOL])
        spec.metadata.fields[SPECIALISTS_METADATA_KEY].CopyFrom(to_value(list(self.specialists)))
        return spec

    async def run(self, infra: RunInfra) -> PatternOutcome:
        records: dict[int, DelegationRecord] = {}
        count = 0
        # How many delegations each specialist has had: the n of its step keys.
        delegated: Counter[str] = Counter()

        async def delegate(ctx: RunningAgent, call: worker_pb2.DelegateCall) -> AgentOutput:
            nonlocal count
            if ctx.role != "main":
                raise FailedPrecondition(
                    f"only the main agent '{self.main.name}' may delegate", code=Code.PERMISSION_DENIED
                )
            index = count
            count += 1
            record = records[index] = DelegationRecord(specialist=call.specialist, subtask=call.subtask)
            spec = self.specialists.get(call.specialist)
            if spec is None:
                record.error = f"unknown specialist: '{call.specialist}'"
                self._made(infra, record)
                raise NotFound(record.error + f" (known: {', '.join(sorted(self.specialists))})")
            step = f"delegate/{spec.name}/{delegated[spec.name]}"
            delegated[spec.name] += 1
            job = Job(spec, call.subtask, role="specialist", step=step, index=index, parent_state=ctx.state)
            output = await run_recorded(infra, job, record, lambda: self._made(infra, record))
            return output

        main_output = await infra.admit(self.main.name, role="main", step="main")
        if main_output is None:
            async with CallScope(infra) as calls:
                calls.install("delegate", delegate)
                main_output = await infra.run_agent(self.main_spec(), self.task, role="main", step="main")
        result = patterns_pb2.DelegatorResult(
            task=self.task,
            final_answer=main_output.answer if succeeded(main_output) else "",
            delegations=[records[i] for i in sorted(records)],
            main_output=main_output,
        )
        if not succeeded(main_output):
            return agent_failure(result, main_output, "main agent")
        return PatternOutcome(result)

    @staticmethod
    def _made(infra: RunInfra, record: DelegationRecord) -> None:
        infra.emit(events_pb2.RunEvent(delegation=events_pb2.DelegationMade(record=record)))
