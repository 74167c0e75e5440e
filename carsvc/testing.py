"""Run patterns against scripted agents in-process: no sidecar, no worker, no
network (docs/testing.md).

`PatternEnvironment` runs any pattern, built from its request message exactly
as the sidecar builds it, against the real run infrastructure (state scope,
budget, event log, mailbox, decisions: the domain's own classes, configured
from `Settings()`). Where the sidecar would hand an agent to a worker, a
`ScriptedDispatcher` asks a script instead: a function that receives a
`ScriptedAgent` (its name, task and step, and the runtime calls a worker's
`carsvc.worker.AgentContext` offers) and answers as a worker handler does:
with a `str`, a `carsvc.worker.Result` or an `AgentOutput`, or by raising.

    env = PatternEnvironment(lambda agent: f"{agent.name} read {agent.task}")
    outcome = await env.run(single(agent("writer"), "a haiku"))
    assert outcome.result.single.output.answer == "writer read a haiku"

The switches: budget limits (or a shared budget) and so budget refusals,
workers lost on the first attempts of chosen agents (re-dispatched, or failed
as the dispatcher fails them after `max_attempts`), cancelling the run from a
script or from outside, decisions for suspended tool calls, and every event
the pattern emitted. (temporalio's `testing.ActivityEnvironment` is the model.)
"""

from __future__ import annotations

import asyncio
import fnmatch
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, runs_pb2, types_pb2, worker_pb2
from carsvc.config import Settings
from carsvc.domain.budget import BudgetLimits, CoordinationBudget, LocalBudget
from carsvc.domain.convert import limits_from_proto, snapshot_to_proto
from carsvc.domain.decisions import Outcome, check_decisions
from carsvc.domain.errors import CarError, Code, FailedPrecondition, InvalidArgument
from carsvc.domain.eventlog import RunEventLog
from carsvc.domain.infra import RunInfra, RunningAgent
from carsvc.domain.mailbox import Mailbox
from carsvc.domain.overlay import StateStore
from carsvc.domain.registry import AgentRegistry
from carsvc.domain.runtime import Pattern, run_result
from carsvc.domain.specs import AgentResolver, Limits
from carsvc.domain.workers import (
    MAX_DEADLINE_S,
    Assignment,
    AssignmentObserver,
    Dispatcher,
    lost_output,
    timed_out_output,
)
from carsvc.patterns import BUILDERS
from carsvc.values import from_value, to_value
from carsvc.worker import Decision, Result, RuntimeCallError, handler_output

__all__ = [
    "DispatchedCall",
    "PatternEnvironment",
    "Reply",
    "RunOutcome",
    "Script",
    "ScriptedAgent",
    "ScriptedDispatcher",
    "approve",
    "reject",
]

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
RunEvent = events_pb2.RunEvent
ToolCallDecision = types_pb2.ToolCallDecision

# What a script answers with, as a worker handler does.
Reply: TypeAlias = "str | Result | AgentOutput"
# A script: called once per attempt of every agent the pattern runs.
Script: TypeAlias = "Callable[[ScriptedAgent], Reply | Awaitable[Reply]]"

SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED

# The reason a lost worker gives (what the sidecar says when a worker's stream ends).
LOST_REASON = "the worker closed its stream"
# Runtime calls a pattern serves, with the tool the caller's spec must list
# (None: the suspended tool itself), as services/calls.py checks them.
_HOOKED: dict[str, str | None] = {
    "delegate": "delegate",
    "spawn_subtask": "spawn_subtask",
    "consult_advisor": "consult_advisor",
    "suspend_tool_call": None,
}
_GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}
# A run request's pattern message type -> its member of StartRunRequest.pattern.
_MEMBERS = {
    f.message_type.full_name: f.name
    for f in runs_pb2.StartRunRequest.DESCRIPTOR.oneofs_by_name["pattern"].fields
    if f.message_type is not None
}


def approve(tool_call_id: str, result: Any = None, *, decision_id: str = "") -> ToolCallDecision:
    """A decision that resumes the suspended tool call `tool_call_id` with `result`."""
    d = ToolCallDecision(target_id=tool_call_id, decision_id=decision_id, action=types_pb2.DECISION_ACTION_RESUME)
    if result is not None:
        d.result.CopyFrom(to_value(result))
    return d


def reject(tool_call_id: str, reason: str = "", *, decision_id: str = "") -> ToolCallDecision:
    """A decision that cancels the suspended tool call `tool_call_id`."""
    return ToolCallDecision(
        target_id=tool_call_id, decision_id=decision_id, action=types_pb2.DECISION_ACTION_CANCEL, reason=reason
    )


# -- the scripted agent ------------------------------------------------------------------------


def _call_error(err: CarError) -> RuntimeCallError:
    """What a worker's handler sees when the sidecar refuses its call."""
    return RuntimeCallError(_GRPC_CODES.get(int(err.code), grpc.StatusCode.UNKNOWN), str(err))


class ScriptedState:
    """The agent's state (its overlay when the pattern isolates it), with the
    API of `carsvc.worker.StateView`: plain Python values in and out."""

    def __init__(self, agent: ScriptedAgent) -> None:
        self._agent = agent

    def _store(self) -> Any:
        running = self._agent.running
        if running is None:
            raise _call_error(FailedPrecondition("the agent runs outside a run: it has no state"))
        return running.state

    async def get(self, key: str, default: Any = None) -> Any:
        _check_key(key)
        value = self._store().get(key)
        return from_value(value) if isinstance(value, struct_pb2.Value) else default

    async def set(self, key: str, value: Any) -> int:
        """Writes `key`; returns the transition index."""
        _check_key(key)
        t = self._store().set(key, to_value(value), self._agent.name)
        return int(t.index)

    async def delete(self, key: str) -> bool:
        """Deletes `key`; returns whether it existed."""
        _check_key(key)
        return self._store().delete(key, self._agent.name) is not None

    async def keys(self, prefix: str = "") -> list[str]:
        return list(self._store().keys(prefix))


def _check_key(key: str) -> None:
    if not key:
        raise _call_error(InvalidArgument("must not be empty", field="key"))


class ScriptedAgent:
    """One attempt of one agent, as its script sees it: the attributes and
    runtime calls of a worker's `carsvc.worker.AgentContext` (so a worker's
    handler can be the script), plus `step` and `role`, its place in the
    pattern. A refused runtime call raises `carsvc.worker.RuntimeCallError`
    with the code and message a worker would get."""

    def __init__(
        self, assignment: Assignment, running: RunningAgent | None, environment: PatternEnvironment | None
    ) -> None:
        self.assignment_id = assignment.assignment_id
        self.attempt = assignment.attempt
        self.run_id = assignment.run_id
        self.thread_id = assignment.thread_id
        self.spec = assignment.spec
        self.name = assignment.spec.name
        self.agent = assignment.agent  # the name workers are matched on
        self.task = assignment.task
        self.running = running
        self.step = running.step if running is not None else ""
        self.role = running.role if running is not None else ""
        self.index = running.index if running is not None else 0
        self.environment = environment
        self.state = ScriptedState(self)
        # Why the agent was cancelled (the run's cancel, or its deadline), as
        # AgentContext.cancel_reason: set before its script is cancelled.
        self.cancel_reason = ""

    def _infra(self) -> RunInfra:
        if self.running is None:
            raise _call_error(FailedPrecondition(f"assignment '{self.assignment_id}' is not part of a run"))
        return self.running.infra

    async def _hooked(self, op: str, arg: Message) -> Any:
        running = self.running
        try:
            infra = self._infra()
            assert running is not None
            hook = infra.hooks.get(op)
            if hook is None:
                raise FailedPrecondition(
                    f"'{op}' is not available to agents of this run's pattern", field=f"calls[0].{op}"
                )
            tool = _HOOKED[op] or getattr(arg, "tool_name", "")
            if tool and tool not in running.tools:
                raise FailedPrecondition(
                    f"agent '{self.name}' may not use tool '{tool}' (not in its spec's tools)",
                    field=f"calls[0].{op}",
                    code=Code.PERMISSION_DENIED,
                )
            return await hook(running, arg)
        except CarError as err:
            raise _call_error(err) from None

    async def delegate(self, specialist: str, subtask: str) -> AgentOutput:
        """Hands `subtask` to a specialist (delegator pattern); its output."""
        output: AgentOutput = await self._hooked(
            "delegate", worker_pb2.DelegateCall(specialist=specialist, subtask=subtask)
        )
        return output

    async def spawn_subtask(self, task: str, tools: Iterable[str] = (), name: str = "") -> AgentOutput:
        """Spawns a sub-agent (spawn_subtask pattern); its output."""
        output: AgentOutput = await self._hooked(
            "spawn_subtask", worker_pb2.SpawnSubtaskCall(task=task, tools=list(tools), name=name)
        )
        return output

    async def consult_advisor(self, prompt: str) -> patterns_pb2.AdvisorConsultation:
        """Asks the run's advisor (advisor pattern) for a verdict."""
        consultation: patterns_pb2.AdvisorConsultation = await self._hooked(
            "consult_advisor", worker_pb2.ConsultAdvisorCall(prompt=prompt)
        )
        return consultation

    async def suspend_tool_call(
        self,
        tool_call_id: str,
        tool_name: str,
        arguments: Any = None,
        *,
        reason: str = "",
        timeout: float | None = None,
    ) -> Decision:
        """Suspends a tool call until a decision arrives (PatternEnvironment's
        `decisions`, or `submit` while it waits)."""
        call = worker_pb2.SuspendToolCall(
            tool_call_id=tool_call_id,
            tool_name=tool_name,
            reason=reason,
            timeout_ms=int(timeout * 1000) if timeout else 0,
        )
        if arguments is not None:
            call.arguments.CopyFrom(to_value(arguments))
        decision: ToolCallDecision = await self._hooked("suspend_tool_call", call)
        return Decision.from_proto(decision)

    async def send(self, to: str, payload: Any, kind: int = types_pb2.MESSAGE_KIND_CUSTOM) -> None:
        """Sends a message to another agent of the run."""
        if not to:
            raise _call_error(InvalidArgument("must name the recipient", field="message.to_agent"))
        self._mail(types_pb2.Message(to_agent=to, kind=kind, payload=to_value(payload)), broadcast=False)  # type: ignore[arg-type]

    async def broadcast(self, payload: Any, kind: int = types_pb2.MESSAGE_KIND_CUSTOM) -> None:
        self._mail(types_pb2.Message(kind=kind, payload=to_value(payload)), broadcast=True)  # type: ignore[arg-type]

    def _mail(self, message: types_pb2.Message, *, broadcast: bool) -> None:
        message.from_agent = self.name
        try:
            mailbox = self._infra().mailbox
            if broadcast:
                mailbox.broadcast(message)
            else:
                mailbox.send(message)
        except CarError as err:
            raise _call_error(err) from None

    async def recv(self, timeout: float | None = None) -> types_pb2.Message:
        """The next message to this agent (the run's default timeout when None)."""
        try:
            infra = self._infra()
            return await infra.mailbox.recv(self.name, timeout or infra.mailbox_recv_timeout)
        except CarError as err:
            raise _call_error(err) from None

    def emit(self, kind: str, payload: Any = None) -> None:
        """Appends a custom event to the run's events."""
        custom = events_pb2.CustomEvent(agent=self.name, assignment_id=self.assignment_id, kind=kind)
        if payload is not None:
            custom.payload.CopyFrom(to_value(payload))
        self._infra().emit(RunEvent(custom=custom))

    def progress(self, message: str, fraction: float | None = None) -> None:
        """Reports progress (an AgentProgress event)."""
        progress = events_pb2.AgentProgress(agent=self.name, assignment_id=self.assignment_id, message=message)
        if fraction is not None:
            progress.fraction = fraction
        self._infra().emit(RunEvent(progress=progress))

    def cancel_run(self, reason: str = "cancelled by the script") -> None:
        """Cancels the run this agent belongs to, as a client's CancelRun would
        (PatternEnvironment.cancel): this agent's own script is cancelled too."""
        if self.environment is None:
            raise RuntimeError("this agent does not run in a PatternEnvironment")
        self.environment.cancel(reason)


# -- the dispatcher ----------------------------------------------------------------------------


@dataclass(slots=True)
class DispatchedCall:
    """One agent the pattern ran, as the dispatcher saw it."""

    step: str  # its place in the pattern (docs/patterns/README.md#step-keys)
    agent: str  # the name workers are matched on
    name: str  # the instance's name (spec.name)
    task: str
    spec: AgentSpec
    attempts: int = 1
    output: AgentOutput | None = None  # None while it runs, or when it was cancelled
    cancelled: str = ""  # the reason the worker would be told, when cancelled


def _script_of(script: Script | Mapping[str, Reply | Script]) -> Script:
    if not isinstance(script, Mapping):
        return script
    table = dict(script)

    def pick(agent: ScriptedAgent) -> Reply | Awaitable[Reply]:
        for key in (agent.step, agent.name, agent.agent):
            if key in table:
                chosen = table[key]
                break
        else:
            globs = [k for k in table if fnmatch.fnmatchcase(agent.agent, k)]
            if not globs:
                raise LookupError(f"the script has no answer for agent '{agent.name}' (step '{agent.step}')")
            chosen = table[globs[0]]
        return chosen if isinstance(chosen, str | Result | AgentOutput) else chosen(agent)

    return pick


class ScriptedDispatcher:
    """A stand-in for `carsvc.domain.workers.Dispatcher` (the two methods a run
    calls: `execute`, same signature, and `run_ended`) whose "workers" are a
    script.

    `script` is a function of the agent (`ScriptedAgent`: name, task, step, and
    its runtime calls) answering as a worker handler does; or a mapping from a
    step key, an agent name or a glob over the matched name to a reply or such
    a function (step, then name, then the first matching glob).
    `lost_attempts` maps an agent name or a step key to how many of its first
    attempts lose their worker: each is re-dispatched (an AgentRedispatched
    event) until `max_attempts` (default `Settings().max_attempts`) is used up,
    and then the output carries the error the dispatcher gives. The script is
    not called for a lost attempt. Every agent is recorded in `calls`, in the
    order they started."""

    def __init__(
        self,
        script: Script | Mapping[str, Reply | Script],
        *,
        lost_attempts: Mapping[str, int] | None = None,
        max_attempts: int | None = None,
        worker_id: str = "scripted",
    ) -> None:
        self.script = _script_of(script)
        self.lost_attempts = dict(lost_attempts or {})
        self.max_attempts = max_attempts if max_attempts is not None else Settings().max_attempts
        self.worker_id = worker_id
        self.calls: list[DispatchedCall] = []
        self.environment: PatternEnvironment | None = None
        self._ids = (f"scripted-{n}" for n in itertools.count(1))

    @property
    def steps(self) -> list[str]:
        """The step keys of the agents dispatched, in the order they started."""
        return [c.step for c in self.calls]

    def call(self, step: str) -> DispatchedCall:
        """The agent dispatched at `step` (KeyError when there was none)."""
        for c in self.calls:
            if c.step == step:
                return c
        raise KeyError(step)

    def tasks(self, name: str) -> list[str]:
        """The tasks the agent `name` (instance or matched name) was given, in order."""
        return [c.task for c in self.calls if name in (c.name, c.agent)]

    def run_ended(self, run_id: str) -> None:
        """The run is over (nothing to forget here)."""

    async def execute(
        self,
        spec: AgentSpec,
        task: str,
        *,
        agent: str = "",
        run_id: str = "",
        thread_id: str = "",
        observer: AssignmentObserver | None = None,
        timeout: float | None = None,
        assignment_id: str = "",
        trace_context: Mapping[str, str] | None = None,
    ) -> AgentOutput:
        """Dispatcher.execute with the script as the worker: never raises for
        the agent's trouble (a raising script, a lost worker, a timeout come
        back as an output with `error`); cancelling the caller cancels the
        script and raises."""
        a = Assignment(
            assignment_id or next(self._ids),
            agent or spec.name,
            spec,
            task,
            run_id,
            thread_id,
            observer,
            asyncio.get_running_loop().create_future(),
        )
        running = observer if isinstance(observer, RunningAgent) else None
        record = DispatchedCall(running.step if running is not None else "", a.agent, spec.name, task, spec)
        self.calls.append(record)
        if observer is not None:
            observer.on_assigned(a)
        lost = max(self.lost_attempts.get(record.step, 0), self.lost_attempts.get(spec.name, 0))
        while True:
            worker = f"{self.worker_id}-{a.attempt}"
            if observer is not None:
                observer.on_placed(a, worker)
            record.attempts = a.attempt
            if a.attempt > lost:
                break
            if a.attempt >= self.max_attempts:
                record.output = lost_output(spec.name, worker, LOST_REASON, a.attempt, self.max_attempts)
                return record.output
            a.attempt += 1
            if observer is not None:
                observer.on_redispatched(a, LOST_REASON, worker)
        scripted = ScriptedAgent(a, running, self.environment)
        work = asyncio.ensure_future(self._answer(scripted))
        try:
            if timeout is not None and timeout > 0:
                timeout = min(timeout, MAX_DEADLINE_S)
                done, _ = await asyncio.wait({work}, timeout=timeout)
                if not done:
                    record.cancelled = scripted.cancel_reason = f"timed out after {timeout:g}s"
                    work.cancel()
                    await asyncio.wait({work})
                    record.output = timed_out_output(spec.name, timeout)
                    return record.output
            output = await asyncio.shield(work)
        except asyncio.CancelledError:
            reason = observer.cancel_reason if observer is not None else ""
            record.cancelled = scripted.cancel_reason = reason or "run cancelled"
            work.cancel()
            await asyncio.wait({work}, timeout=5.0)
            raise
        if not output.name:
            output.name = spec.name
        record.output = output
        return output

    async def _answer(self, agent: ScriptedAgent) -> AgentOutput:
        started = time.perf_counter()
        try:
            value = self.script(agent)
            if inspect.isawaitable(value):
                value = await value
            return handler_output(value, agent.name, (time.perf_counter() - started) * 1000)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            out = AgentOutput(name=agent.name, error=f"{type(err).__name__}: {err}")
            out.duration_ms = (time.perf_counter() - started) * 1000
            return out


# -- the environment ---------------------------------------------------------------------------


@dataclass(slots=True)
class RunOutcome:
    """A finished run, with the field names of `runs_pb2.Run` where they have
    one: `status` (a RunStatus), `termination_reason`, `termination_detail`,
    `result` (the RunResult: `outcome.result.swarm`, ...), `budget` (a
    BudgetSnapshot), `pattern`. `events` holds every event the pattern emitted
    (the run's own run_started / status / run_finished events are the
    RunManager's and are not among them)."""

    pattern: str
    status: int
    termination_reason: str
    termination_detail: str
    result: patterns_pb2.RunResult
    budget: types_pb2.BudgetSnapshot
    events: list[RunEvent] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def events_of(self, kind: str) -> list[Any]:
        """The events of one kind (a RunEvent `kind` member, e.g. "agent_finished"), unwrapped."""
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]


class PatternEnvironment:
    """Runs patterns in-process against scripted agents.

    `script`: a ScriptedDispatcher, or what one takes (`lost_attempts` and
    `max_attempts` are passed on). `budget`: limits (BudgetLimits or its
    message), a fresh budget for each run; or a CoordinationBudget shared by
    every run. `decisions`: handed to each run before it starts (a tool call
    that suspends later takes its decision at once). `registered`: specs an
    AgentRef may name with `registered_name`. `state`: the state scope, kept
    across runs (a thread's scope). Everything else comes from `settings`
    (default `Settings()`), as the sidecar configures a run."""

    def __init__(
        self,
        script: ScriptedDispatcher | Script | Mapping[str, Reply | Script],
        *,
        budget: BudgetLimits | types_pb2.BudgetLimits | CoordinationBudget | None = None,
        decisions: Iterable[ToolCallDecision] = (),
        registered: Iterable[AgentSpec] = (),
        state: StateStore | None = None,
        lost_attempts: Mapping[str, int] | None = None,
        max_attempts: int | None = None,
        settings: Settings | None = None,
        run_id: str = "run",
        thread_id: str = "thread",
    ) -> None:
        self.settings = s = settings or Settings()
        if isinstance(script, ScriptedDispatcher):
            self.dispatcher = script
        else:
            self.dispatcher = ScriptedDispatcher(
                script, lost_attempts=lost_attempts, max_attempts=max_attempts or s.max_attempts
            )
        self.dispatcher.environment = self
        self.budget = budget
        self.decisions = list(decisions)
        if self.decisions:
            check_decisions(self.decisions)
        self.registry = AgentRegistry()
        for spec in registered:
            self.registry.register(spec)
        self.limits = Limits(
            max_field_bytes=s.max_field_bytes,
            max_items=s.max_items,
            max_agents=s.max_agents_per_pattern,
            max_value_depth=s.max_value_depth,
        )
        self.resolve = AgentResolver(self.registry, self.limits)
        self.state = state if state is not None else StateStore()
        self.run_id = run_id
        self.thread_id = thread_id
        # The run in progress (or the last one): its infrastructure.
        self.infra: RunInfra | None = None
        # True while one of the run's tool calls waits for a decision (WAITING).
        self.waiting = False
        self._task: asyncio.Task[Any] | None = None
        self._cancelled = False

    @property
    def calls(self) -> list[DispatchedCall]:
        """Every agent dispatched so far (ScriptedDispatcher.calls)."""
        return self.dispatcher.calls

    @property
    def events(self) -> list[RunEvent]:
        """The events of the run in progress (or the last one) so far."""
        return self.infra.events.since(0) if self.infra is not None else []

    def build(self, request: Message) -> Pattern:
        """The pattern a request message asks for (a SwarmRun, a VoteRun, ...,
        or a StartRunRequest), checked and resolved as the sidecar does: bad
        input raises the CarError the client would get as a status."""
        which: str | None
        if isinstance(request, runs_pb2.StartRunRequest):
            which = request.WhichOneof("pattern")
            if which is None:
                raise InvalidArgument("exactly one pattern must be set", field="pattern")
            request = getattr(request, which)
        else:
            which = _MEMBERS.get(request.DESCRIPTOR.full_name)
            if which is None:
                raise TypeError(f"{request.DESCRIPTOR.full_name} is not a pattern request")
        return BUILDERS[which](request, self.resolve, self.limits)

    def _budget(self, request: Message | Pattern) -> LocalBudget:
        if isinstance(request, runs_pb2.StartRunRequest) and request.HasField("budget"):
            return LocalBudget.of(limits_from_proto(request.budget))
        budget = self.budget
        if isinstance(budget, CoordinationBudget):
            return LocalBudget(budget)
        if isinstance(budget, types_pb2.BudgetLimits):
            return LocalBudget.of(limits_from_proto(budget))
        return LocalBudget.of(budget)

    def _infra(self, budget: LocalBudget) -> RunInfra:
        s = self.settings
        infra = RunInfra(
            run_id=self.run_id,
            thread_id=self.thread_id,
            state=self.state,
            budget=budget,
            events=RunEventLog(self.run_id, s.event_retention),
            mailbox=Mailbox(s.mailbox_depth),
            # execute and run_ended are all a run calls of its dispatcher
            dispatcher=cast(Dispatcher, self.dispatcher),
            mailbox_recv_timeout=s.mailbox_recv_timeout_s,
            suspension_timeout=s.suspension_timeout_s,
            max_unmatched_decisions=s.max_unmatched_decisions,
            agent_timeout=s.agent_timeout_s or None,
        )
        infra.decisions.on_waiting = self._set_waiting
        return infra

    def _set_waiting(self, waiting: bool) -> None:
        self.waiting = waiting

    async def run(self, request: Message | Pattern) -> RunOutcome:
        """Runs a pattern to its end: built from `request` (see `build`), or a
        Pattern as is. A pattern that raises a CarError ends FAILED with reason
        "error", as on the sidecar; any other exception is a bug and is raised."""
        pattern = request if not isinstance(request, Message) else self.build(request)
        infra = self.infra = self._infra(self._budget(request))
        decisions = list(self.decisions)
        if isinstance(request, runs_pb2.StartRunRequest):
            decisions += list(request.initial_decisions)
        if decisions:
            infra.decisions.submit(decisions)
        self._cancelled = False
        self.waiting = False
        task = self._task = asyncio.ensure_future(pattern.run(infra))
        status, reason, detail = FAILED, "error", ""
        result = patterns_pb2.RunResult()
        try:
            outcome = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._cancelled or (current is not None and current.cancelling()):
                raise
            status, reason, detail = CANCELLED, "cancelled", infra.cancel_reason
        except CarError as err:
            detail = str(err)
        else:
            result = run_result(outcome.result)
            status = FAILED if outcome.failed else SUCCEEDED
            reason, detail = outcome.reason, outcome.detail
        finally:
            self._task = None
            infra.end()
        return RunOutcome(
            pattern=pattern.name,
            status=status,
            termination_reason=reason,
            termination_detail=detail,
            result=result,
            budget=snapshot_to_proto(infra.budget.snapshot()),
            events=infra.events.since(0),
        )

    def cancel(self, reason: str = "cancelled by the test") -> None:
        """Cancels the run in progress, as CancelRun does: its agents' scripts
        are cancelled (their calls record `cancelled`), and `run` returns a
        CANCELLED outcome whose detail is `reason`."""
        task = self._task
        if task is None or task.done() or self.infra is None:
            raise RuntimeError("no run is in progress")
        self._cancelled = True
        self.infra.cancel_reason = reason
        task.cancel(reason)

    def submit(self, *decisions: ToolCallDecision) -> Outcome:
        """Delivers decisions to the run in progress (SubmitDecisions)."""
        if self.infra is None:
            raise RuntimeError("no run has started")
        check_decisions(list(decisions))
        return self.infra.decisions.submit(list(decisions))
