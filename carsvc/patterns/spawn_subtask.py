"""SpawnSubtask: a main agent spawns ephemeral sub-agents with a subset of its tools.

The main agent's worker makes the `spawn_subtask(task, tools, name)` runtime
call (the pattern grants the `spawn_subtask` tool on the spec it sends). The
sidecar checks `tools` against the main agent's own tools (privilege
de-escalation: anything else is refused with PERMISSION_DENIED, and
`spawn_subtask` itself is never granted, so depth is 1), gates the spawn on the
budget, runs the sub-agent on a worker serving `{main}.subtask`, records a
SubtaskRecord, emits SubtaskSpawned and answers with the sub-agent's output.
Calls are served concurrently, so concurrent spawns run concurrently.
See docs/patterns/spawn_subtask.md."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, types_pb2, worker_pb2
from carsvc.domain.errors import Code, FailedPrecondition, InvalidArgument, PermissionDenied
from carsvc.domain.infra import RunInfra, RunningAgent, succeeded
from carsvc.domain.runtime import CallScope, Job, PatternOutcome, run_recorded
from carsvc.domain.specs import MAX_NAME_CHARS, Limits, Resolver, check_text, copy_spec, require_ref
from carsvc.patterns.outcomes import agent_failure
from carsvc.patterns.prompts import SUBTASK_SYSTEM_PROMPT

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
SubtaskRecord = patterns_pb2.SubtaskRecord
SPAWN_SUBTASK_TOOL = "spawn_subtask"
# The agent name sub-agents are dispatched under (workers serve it, or a glob).
SUBTASK_AGENT = "{parent}.subtask"
# A sub-agent's instance name when the call gives none; `index` counts spawns from 0.
SUBTASK_NAME = "{parent}.subtask_{index}"


class SpawnSubtask:
    name: ClassVar[str] = "spawn_subtask"

    def __init__(self, main: AgentSpec, task: str) -> None:
        self.main = main
        self.task = task
        # The tools a sub-agent may be given: the main agent's own, never the spawn tool.
        self.grantable = [t for t in dict.fromkeys(main.tools) if t != SPAWN_SUBTASK_TOOL]

    @classmethod
    def build(cls, msg: patterns_pb2.SpawnSubtaskRun, resolve: Resolver, limits: Limits) -> SpawnSubtask:
        main = resolve(require_ref(msg, "main", "spawn_subtask"), "spawn_subtask.main")
        check_text(msg.task, "spawn_subtask.task", limits)
        return cls(main, msg.task)

    def check_tools(self, tools: list[str]) -> list[str]:
        """The requested tools, deduplicated, if all are the main agent's own."""
        wanted = list(dict.fromkeys(tools))
        for tool in wanted:
            if tool == SPAWN_SUBTASK_TOOL:
                raise PermissionDenied(
                    f"'{SPAWN_SUBTASK_TOOL}' is never granted to a sub-agent (delegation depth is 1)",
                    field="spawn_subtask.tools",
                )
            if tool not in self.grantable:
                raise PermissionDenied(
                    f"tool '{tool}' is not one of the main agent's tools "
                    f"({', '.join(self.grantable) or 'it has none'})",
                    field="spawn_subtask.tools",
                )
        return wanted

    def sub_spec(self, name: str, tools: list[str]) -> AgentSpec:
        spec = AgentSpec(
            name=name,
            system_prompt=SUBTASK_SYSTEM_PROMPT.format(parent=self.main.name),
            tools=tools,
            max_turns=self.main.max_turns,
            cache_control=self.main.cache_control,
        )
        if self.main.HasField("metadata"):
            spec.metadata.CopyFrom(self.main.metadata)  # same provider / model settings
        return spec

    async def run(self, infra: RunInfra) -> PatternOutcome:
        records: dict[int, SubtaskRecord] = {}
        used_names = {self.main.name}
        count = 0
        # How many sub-agents each caller (by its step key) has spawned: the n of their step keys.
        spawned: Counter[str] = Counter()

        async def spawn(ctx: RunningAgent, call: worker_pb2.SpawnSubtaskCall) -> AgentOutput:
            nonlocal count
            if ctx.role != "main":
                raise FailedPrecondition(
                    f"'{SPAWN_SUBTASK_TOOL}' is never granted to a sub-agent (delegation depth is 1)",
                    code=Code.PERMISSION_DENIED,
                )
            if not call.task.strip():
                raise InvalidArgument("must not be empty", field="spawn_subtask.task")
            tools = self.check_tools(list(call.tools))
            name = self._name(call.name, count, used_names)
            index = count
            count += 1
            used_names.add(name)
            record = records[index] = SubtaskRecord(name=name, task=call.task, tools=tools)
            step = f"spawn/{ctx.step}/{spawned[ctx.step]}"
            spawned[ctx.step] += 1
            job = Job(
                self.sub_spec(name, tools),
                call.task,
                role="subtask",
                step=step,
                index=index,
                agent=SUBTASK_AGENT.format(parent=self.main.name),
                parent_state=ctx.state,
            )
            output = await run_recorded(infra, job, record, lambda: self._spawned(infra, record))
            return output

        main_output = await infra.admit(self.main.name, role="main", step="main")
        if main_output is None:
            async with CallScope(infra) as calls:
                calls.install("spawn_subtask", spawn)
                spec = copy_spec(self.main, add_tools=[SPAWN_SUBTASK_TOOL])
                main_output = await infra.run_agent(spec, self.task, role="main", step="main")
        result = patterns_pb2.SpawnSubtaskResult(
            task=self.task,
            final_answer=main_output.answer if succeeded(main_output) else "",
            subtasks=[records[i] for i in sorted(records)],
            main_output=main_output,
        )
        if not succeeded(main_output):
            return agent_failure(result, main_output, "main agent")
        return PatternOutcome(result)

    def _name(self, requested: str, index: int, used: set[str]) -> str:
        if not requested:
            name = SUBTASK_NAME.format(parent=self.main.name, index=index)
            while name in used:
                name += "_"
            return name
        field = "spawn_subtask.name"
        if len(requested) > MAX_NAME_CHARS or any(c.isspace() for c in requested):
            raise InvalidArgument(
                f"'{requested[:64]}' is not an agent name (at most {MAX_NAME_CHARS} characters, no whitespace)",
                field=field,
            )
        if requested in used:
            raise InvalidArgument(f"'{requested}' is already used by another agent of this run", field=field)
        return requested

    @staticmethod
    def _spawned(infra: RunInfra, record: SubtaskRecord) -> None:
        infra.emit(events_pb2.RunEvent(subtask_spawned=events_pb2.SubtaskSpawned(record=record)))
