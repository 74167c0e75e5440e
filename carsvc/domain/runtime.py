"""How a pattern runs its agents: what a pattern is to the run, the agents it
wants run (Job), the budget gate before each, parallel batches, and the
runtime-call hooks it serves while it runs. Patterns build on this; the run
(domain/runs.py) only knows Pattern and PatternOutcome."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import Message

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.errors import FailedPrecondition
from carsvc.domain.infra import CallHook, RunInfra, RunningAgent, succeeded
from carsvc.domain.overlay import Overlay, StateStore

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
RunResult = patterns_pb2.RunResult
log = logging.getLogger("carsvc.patterns")


@dataclass(slots=True)
class PatternOutcome:
    """A finished pattern: its own result message (SingleResult, MapReduceResult,
    ...), and whether the run counts as failed. The run wraps the result into
    its RunResult once (run_result)."""

    result: Message
    failed: bool = False
    reason: str = "completed"
    detail: str = ""


class Pattern(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self, infra: RunInfra) -> PatternOutcome: ...


# RunResult's `result` oneof: a pattern's result message type -> its member's name.
_RESULT_MEMBERS = {
    f.message_type.full_name: f.name
    for f in RunResult.DESCRIPTOR.oneofs_by_name["result"].fields
    if f.message_type is not None
}


def run_result(result: Message) -> RunResult:
    """A pattern's own result as the run's result: the RunResult whose member
    of that type holds it."""
    member = _RESULT_MEMBERS.get(result.DESCRIPTOR.full_name)
    if member is None:
        raise TypeError(f"{result.DESCRIPTOR.full_name} is not a member of {RunResult.DESCRIPTOR.full_name}")
    wrapped = RunResult()
    getattr(wrapped, member).CopyFrom(result)
    return wrapped


def error_text(output: AgentOutput) -> str:
    """Why `output` did not succeed: its error, or that its answer is empty."""
    return output.error if output.HasField("error") else "the agent returned an empty answer"


@dataclass(slots=True)
class Job:
    """One agent a pattern wants to run.

    `step` is the agent's place in the pattern ("map/17", "pipeline/2",
    "supervisor/round-1/review"; docs/patterns/README.md): unique within the
    run and the same whenever the run reaches that agent again."""

    spec: AgentSpec
    task: str
    role: str
    step: str
    index: int = 0
    agent: str = ""  # the name workers are matched on, when the instance is renamed
    isolated: bool = False
    timeout: float | None = None
    parent_state: StateStore | Overlay | None = None


async def run_admitted(infra: RunInfra, job: Job) -> AgentOutput:
    """Runs an agent the budget already admitted. A bug in the sidecar becomes
    the agent's error instead of tearing down its siblings."""
    try:
        return await infra.run_agent(
            job.spec,
            job.task,
            role=job.role,
            step=job.step,
            index=job.index,
            agent=job.agent,
            isolated=job.isolated,
            parent_state=job.parent_state,
            timeout=job.timeout,
        )
    except Exception as exc:
        log.exception("%s '%s' of run %s failed inside the sidecar", job.role, job.spec.name, infra.run_id)
        return AgentOutput(name=job.spec.name, error=f"internal error: {exc}")


async def run_gated(infra: RunInfra, job: Job) -> AgentOutput:
    """The budget gate, then the agent: its output, or its skipped output."""
    skipped = await infra.admit(job.spec.name, role=job.role, index=job.index, step=job.step)
    if skipped is not None:
        return skipped
    return await run_admitted(infra, job)


async def run_batch(infra: RunInfra, jobs: Sequence[Job]) -> list[AgentOutput]:
    """Runs `jobs` as one parallel batch: every agent is gated in order before
    any starts (a refused one keeps its position as a skipped output), then the
    admitted ones run at once. Outputs are in job order."""
    outputs = await infra.admit_all([(j.spec.name, j.role, j.index, j.step) for j in jobs])

    async def one(i: int) -> None:
        outputs[i] = await run_admitted(infra, jobs[i])

    async with asyncio.TaskGroup() as group:
        for i, out in enumerate(outputs):
            if out is None:
                group.create_task(one(i))
    return [o for o in outputs if o is not None]


class ChildRecord(Protocol):
    """What DelegationRecord and SubtaskRecord share."""

    result: str
    success: bool
    error: str


async def run_recorded(
    infra: RunInfra, job: Job, record: ChildRecord, publish: Callable[[], object]
) -> AgentOutput:
    """Runs an agent started by a runtime call (delegate, spawn), fills in its
    record from the output, and publishes the record, also when cancelled."""
    try:
        output = await run_gated(infra, job)
    except asyncio.CancelledError:
        record.error = "cancelled: the main agent finished or the run was cancelled"
        publish()
        raise
    record.result = output.answer
    record.success = succeeded(output)
    if not record.success:
        record.error = error_text(output)
    publish()
    return output


class CallScope:
    """The runtime-call hooks a pattern serves while it runs.

    `install` puts a hook on RunInfra.hooks; leaving the scope removes the
    hooks and cancels the calls still in flight (the sub-agents they started are
    cancelled on their workers), so nothing a run started outlives it."""

    def __init__(self, infra: RunInfra) -> None:
        self.infra = infra
        self._ops: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def install(self, op: str, hook: CallHook) -> None:
        async def guarded(ctx: RunningAgent, arg: Any) -> Any:
            if self._closed:
                raise FailedPrecondition(f"'{op}' is no longer available: the pattern has finished")
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            try:
                return await hook(ctx, arg)
            finally:
                if task is not None:
                    self._tasks.discard(task)

        self._ops.append(op)
        self.infra.hooks[op] = guarded

    async def __aenter__(self) -> CallScope:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closed = True
        for op in self._ops:
            self.infra.hooks.pop(op, None)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
