"""What every pattern shares: the request checks, the agent resolver and the
outcome a pattern hands back to the run."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.domain.bounds import DEFAULT_MAX_VALUE_DEPTH, check_struct
from carsvc.domain.errors import FailedPrecondition, InvalidArgument
from carsvc.domain.infra import (
    BUDGET_SKIPPED_PREFIX,
    MAX_TIMEOUT_S,
    CallHook,
    RunInfra,
    RunningAgent,
    succeeded,
)
from carsvc.domain.overlay import Overlay, StateStore
from carsvc.patterns.prompts import ANSWER_LINE

AgentRef = patterns_pb2.AgentRef
AgentSpec = types_pb2.AgentSpec
RunResult = patterns_pb2.RunResult

MAX_NAME_CHARS = 256


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits every pattern enforces (configurable on the server)."""

    max_field_bytes: int = 1 << 20
    max_items: int = 100_000
    max_agents: int = 1_000
    max_value_depth: int = DEFAULT_MAX_VALUE_DEPTH


@dataclass(slots=True)
class PatternOutcome:
    """A finished pattern: its result, and whether the run counts as failed."""

    result: RunResult
    failed: bool = False
    reason: str = "completed"
    detail: str = ""


class Pattern(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self, infra: RunInfra) -> PatternOutcome: ...


# Resolves an AgentRef (inline spec or registered name) to a spec; `field` names
# the ref in error messages.
Resolver = Callable[[AgentRef, str], AgentSpec]


def check_spec(spec: AgentSpec, field: str) -> None:
    if not spec.name:
        raise InvalidArgument("must not be empty", field=f"{field}.name")
    if len(spec.name) > MAX_NAME_CHARS:
        raise InvalidArgument(
            f"is {len(spec.name)} characters; the limit is {MAX_NAME_CHARS}", field=f"{field}.name"
        )
    if any(c.isspace() for c in spec.name):
        raise InvalidArgument(f"'{spec.name}' must not contain whitespace", field=f"{field}.name")
    if spec.HasField("metadata"):
        check_timeout(spec.metadata.fields.get("timeout_secs"), f"{field}.metadata.timeout_secs")


def check_spec_bounds(spec: AgentSpec, field: str, limits: Limits) -> None:
    """check_spec, and every part of a client-given spec within the size and
    nesting limits (what a run request or the registry stores and re-sends)."""
    check_spec(spec, field)
    check_text(spec.system_prompt, f"{field}.system_prompt", limits)
    check_count(len(spec.tools), f"{field}.tools", limits.max_agents, "tools")
    for i, tool in enumerate(spec.tools):
        check_text(tool, f"{field}.tools[{i}]", limits)
    if spec.HasField("metadata"):
        size = spec.metadata.ByteSize()
        if size > limits.max_field_bytes:
            raise InvalidArgument(
                f"is {size} bytes; the limit is {limits.max_field_bytes} (max_field_bytes)", field=f"{field}.metadata"
            )
        check_struct(spec.metadata, f"{field}.metadata", limits.max_value_depth)
    if spec.ByteSize() > limits.max_field_bytes * 2:
        raise InvalidArgument(
            f"is {spec.ByteSize()} bytes in all; the limit is {limits.max_field_bytes * 2} (2 x max_field_bytes)",
            field=field,
        )


def check_timeout(value: struct_pb2.Value | None, field: str) -> None:
    """A spec's `metadata.timeout_secs`, when it is a number, must be finite and
    at most MAX_TIMEOUT_S (zero or less means no deadline of its own)."""
    if value is None or value.WhichOneof("kind") != "number_value":
        return
    seconds = value.number_value
    if not (math.isfinite(seconds) and seconds <= MAX_TIMEOUT_S):
        raise InvalidArgument(
            f"must be a finite number of seconds up to {MAX_TIMEOUT_S:.0f}, not {seconds}", field=field
        )


def check_text(value: str, field: str, limits: Limits) -> None:
    size = len(value.encode())
    if size > limits.max_field_bytes:
        raise InvalidArgument(
            f"is {size} bytes; the limit is {limits.max_field_bytes} (max_field_bytes)", field=field
        )


def require_ref(container: object, name: str, field: str) -> AgentRef:
    """The AgentRef field `name` of `container`, which must be set."""
    if not container.HasField(name):  # type: ignore[attr-defined]
        raise InvalidArgument("is required", field=f"{field}.{name}" if field else name)
    ref: AgentRef = getattr(container, name)
    return ref


def check_count(count: int, field: str, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidArgument(f"has {count} {what}; the limit is {limit}", field=field)


# -- helpers the patterns share ------------------------------------------------------------

log = logging.getLogger("carsvc.patterns")
AgentOutput = types_pb2.AgentOutput
MAX_ROUNDS = 1_000


def resolve_agents(
    refs: Sequence[AgentRef], field: str, resolve: Resolver, limits: Limits, *, minimum: int = 1
) -> list[AgentSpec]:
    """Resolves a repeated AgentRef field: at least `minimum`, at most
    `limits.max_agents`, and no two with the same name."""
    if len(refs) < minimum:
        what = "one agent" if minimum == 1 else f"{minimum} agents"
        raise InvalidArgument(f"must hold at least {what}", field=field)
    check_count(len(refs), field, limits.max_agents, "agents")
    specs: list[AgentSpec] = []
    seen: dict[str, int] = {}
    for i, ref in enumerate(refs):
        spec = resolve(ref, f"{field}[{i}]")
        if spec.name in seen:
            raise InvalidArgument(
                f"duplicate agent name '{spec.name}' (also {field}[{seen[spec.name]}])", field=f"{field}[{i}]"
            )
        seen[spec.name] = i
        specs.append(spec)
    return specs


def resolve_optional(container: object, name: str, field: str, resolve: Resolver) -> AgentSpec | None:
    """The AgentRef field `name` of `container` resolved, or None when unset."""
    if not container.HasField(name):  # type: ignore[attr-defined]
        return None
    return resolve(getattr(container, name), f"{field}.{name}")


def check_distinct(spec: AgentSpec, others: Sequence[AgentSpec], field: str, what: str) -> None:
    """`spec` (at `field`) must not share its name with any of `others`."""
    for other in others:
        if other.name == spec.name:
            raise InvalidArgument(f"'{spec.name}' must not also be {what}", field=field)


def copy_spec(spec: AgentSpec, *, name: str = "", add_tools: Sequence[str] = ()) -> AgentSpec:
    """A copy of `spec`, renamed when `name` is given, with `add_tools` granted."""
    copy = AgentSpec()
    copy.CopyFrom(spec)
    if name:
        copy.name = name
    for tool in add_tools:
        if tool not in copy.tools:
            copy.tools.append(tool)
    return copy


def is_skipped(output: AgentOutput) -> bool:
    """Whether `output` is the skipped output of an agent the budget refused."""
    return output.HasField("error") and output.error.startswith(BUDGET_SKIPPED_PREFIX)


def error_text(output: AgentOutput) -> str:
    return output.error if output.HasField("error") else "the agent returned an empty answer"


def answer_lines(outputs: Iterable[AgentOutput]) -> str:
    """One ANSWER_LINE per succeeded output, joined by newlines."""
    return "\n".join(ANSWER_LINE.format(name=o.name, answer=o.answer) for o in outputs if succeeded(o))


def agent_failure(result: RunResult, output: AgentOutput, what: str) -> PatternOutcome:
    """The outcome of a run whose product depended on `output`, which failed:
    budget_exhausted when the budget refused the agent, else agent_failed."""
    reason = "budget_exhausted" if is_skipped(output) else "agent_failed"
    detail = f"{what} '{output.name}' failed: {error_text(output)}"
    return PatternOutcome(result, failed=True, reason=reason, detail=detail)


def no_output(result: RunResult, outputs: Sequence[AgentOutput]) -> PatternOutcome:
    """The outcome of a run none of whose agents produced an answer (car-multi's
    NoOutput): budget_exhausted when the budget refused every one of them."""
    reason = "budget_exhausted" if outputs and all(is_skipped(o) for o in outputs) else "agent_failed"
    return PatternOutcome(result, failed=True, reason=reason, detail="no agents produced output")


@dataclass(slots=True)
class Job:
    """One agent a pattern wants to run."""

    spec: AgentSpec
    task: str
    role: str
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
    skipped = infra.admit(job.spec.name, role=job.role, index=job.index)
    if skipped is not None:
        return skipped
    return await run_admitted(infra, job)


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


async def run_batch(infra: RunInfra, jobs: Sequence[Job]) -> list[AgentOutput]:
    """Runs `jobs` as one parallel batch: every agent is gated in order before
    any starts (a refused one keeps its position as a skipped output), then the
    admitted ones run at once. Outputs are in job order."""
    outputs: list[AgentOutput | None] = [infra.admit(j.spec.name, role=j.role, index=j.index) for j in jobs]

    async def one(i: int) -> None:
        outputs[i] = await run_admitted(infra, jobs[i])

    async with asyncio.TaskGroup() as group:
        for i, out in enumerate(outputs):
            if out is None:
                group.create_task(one(i))
    return [o for o in outputs if o is not None]


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


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The JSON value in an agent's answer: the whole answer, a fenced block, or
    the outermost {...} / [...] span. None when there is none."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            candidates.append(text[start : end + 1])
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None
