"""What the agents of one run share (car-multi's SharedInfra), and each agent's
view of it while it runs on a worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, types_pb2, worker_pb2
from carsvc.domain.backend import Budget
from carsvc.domain.budget_types import BudgetError
from carsvc.domain.convert import snapshot_to_proto
from carsvc.domain.decisions import DecisionBox
from carsvc.domain.eventlog import RunEventLog
from carsvc.domain.mailbox import Mailbox
from carsvc.domain.overlay import Overlay, StateStore
from carsvc.domain.tracing import NO_AGENT, NO_RUN, AgentSpan, RunSpan, parent_of
from carsvc.domain.workers import Assignment, Dispatcher, cancelled_output

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
RunEvent = events_pb2.RunEvent
log = logging.getLogger("carsvc.runs")

BUDGET_SKIPPED_PREFIX = "coordination budget exhausted: "

# The longest deadline an agent may be given (a spec's metadata.timeout_secs,
# fleet's agent_timeout_secs): a year.
MAX_TIMEOUT_S = 365 * 24 * 3600.0

# What a runtime-call hook answers with: a domain value, which services/calls.py
# wraps in the call's CallResult (an output for delegate and spawn_subtask, a
# consultation for consult_advisor, a decision for suspend_tool_call).
CallAnswer = types_pb2.AgentOutput | patterns_pb2.AdvisorConsultation | types_pb2.ToolCallDecision
# A hook a pattern installs for a runtime call it supports (delegate, spawn, ...):
# it receives the calling agent and the call's arguments.
CallHook = Callable[["RunningAgent", Any], Awaitable[CallAnswer]]


def skipped_output(name: str, error: BudgetError) -> AgentOutput:
    """The output of a load-bearing agent the budget refused: it never ran."""
    return AgentOutput(name=name, error=f"{BUDGET_SKIPPED_PREFIX}{error}")


def succeeded(output: AgentOutput) -> bool:
    """car-multi's rule: no error and a non-empty answer."""
    return not output.HasField("error") and bool(output.answer)


class RunInfra:
    """The state scope, event log, budget, mailbox and worker pool of one run."""

    def __init__(
        self,
        *,
        run_id: str,
        thread_id: str,
        state: StateStore,
        budget: Budget,
        events: RunEventLog,
        mailbox: Mailbox,
        dispatcher: Dispatcher,
        mailbox_recv_timeout: float,
        suspension_timeout: float,
        max_unmatched_decisions: int,
        agent_timeout: float | None,
    ) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.state = state
        self.budget = budget
        self.events = events
        self.mailbox = mailbox
        self.dispatcher = dispatcher
        self.mailbox_recv_timeout = mailbox_recv_timeout
        # The deadline of an agent whose spec sets none (None: no deadline).
        self.agent_timeout = agent_timeout
        self.decisions = DecisionBox(
            self.emit, max_unmatched=max_unmatched_decisions, default_timeout=suspension_timeout
        )
        # Runtime-call hooks: every run serves "suspend_tool_call"; a pattern adds
        # "delegate", "spawn_subtask" or "consult_advisor" when it offers them.
        self.hooks: dict[str, CallHook] = {"suspend_tool_call": self._suspend_tool_call}
        # Resuming after a restart (RunManager): step outputs journaled before it,
        # returned instead of dispatching the step again, and the steps whose
        # agent_finished event the restored log already holds.
        self.replay: dict[str, AgentOutput] = {}
        self.reported: set[str] = set()
        # Whether replayed steps' spend counts again: yes for the run's own budget
        # (rebuilt from nothing); no for a shared one kept in a store, which also
        # remembers the steps it admitted (`counted`: not asked again).
        self.recount = True
        self.counted: set[str] = set()
        # Told about every accepted step output (the journal, for resumable runs).
        self.on_step: Callable[[str, AgentOutput], None] | None = None
        # Work started on behalf of the run outside its own task (runtime calls
        # that run agents or wait); cancelled when the run ends.
        self._children: set[asyncio.Task[Any]] = set()
        # Told about every spawn the budget refused (the sidecar counts them).
        self.on_denied: Callable[[], None] = lambda: None
        # Why the run is being cancelled (set by RunManager before it cancels the
        # run's task): what workers read in AssignmentCancel.reason.
        self.cancel_reason = ""
        # The run's span (carsvc/domain/tracing.py; a no-op unless tracing is on).
        self.span: RunSpan = NO_RUN

    async def _suspend_tool_call(
        self, ctx: RunningAgent, call: worker_pb2.SuspendToolCall
    ) -> types_pb2.ToolCallDecision:
        return await self.decisions.suspend(ctx.name, ctx.assignment_id, call)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Ties `task` to the run: it is cancelled when the run ends."""
        self._children.add(task)
        task.add_done_callback(self._children.discard)

    def end(self) -> None:
        """The run is over: waiting tool calls are cancelled, and so is every
        child task (delegated or spawned agents still running on workers)."""
        self.decisions.close()
        if not self.cancel_reason:
            self.cancel_reason = "the run ended"
        for task in list(self._children):
            task.cancel()
        self.dispatcher.run_ended(self.run_id)

    # -- events ------------------------------------------------------------------

    def emit(self, event: RunEvent) -> RunEvent:
        return self.events.append(event)

    def budget_updated(self) -> None:
        self.emit(
            RunEvent(budget_updated=events_pb2.BudgetUpdated(budget=snapshot_to_proto(self.budget.snapshot())))
        )

    # -- the pattern skeleton: gate, run, record -------------------------------------

    async def admit(self, name: str, *, role: str, index: int = 0, step: str = "") -> AgentOutput | None:
        """Reserves a budget slot for one agent (at `step`, its place in the
        pattern). None means it may run; otherwise the skipped output to put at
        its position (an AgentSkipped event is emitted)."""
        (admitted,) = await self.admit_all([(name, role, index, step)])
        return admitted

    async def admit_all(self, agents: list[tuple[str, str, int, str]]) -> list[AgentOutput | None]:
        """`admit` for several agents (name, role, index, step) in order, with
        one request to the budget. Steps a shared budget admitted before a
        restart (`counted`) are admitted without asking it again."""
        asking = [a for a in agents if a[3] not in self.counted]
        verdicts = iter(
            await self.budget.begin_agents(len(asking), run_id=self.run_id, steps=[a[3] for a in asking])
            if asking
            else []
        )
        return [
            self._admitted(None if step in self.counted else next(verdicts), name, role, index)
            for name, role, index, step in agents
        ]

    def _admitted(self, denied: BudgetError | None, name: str, role: str, index: int) -> AgentOutput | None:
        if denied is None:
            self.budget_updated()
            return None
        self.on_denied()
        out = skipped_output(name, denied)
        self.span.skipped(name, str(denied))
        self.emit(RunEvent(agent_skipped=events_pb2.AgentSkipped(output=out, role=role, index=index)))
        self.budget_updated()
        return out

    async def record(self, output: AgentOutput) -> None:
        """Adds an output's self-reported spend to the budget."""
        if output.HasField("tokens"):
            t = output.tokens
            try:
                await self.budget.record(t.input_tokens, t.output_tokens, t.cost_usd)
            except ValueError as bad:
                log.warning("run %s: ignored spend of %s: %s", self.run_id, output.name, bad)
                return
            self.budget_updated()

    async def run_agent(
        self,
        spec: AgentSpec,
        task: str,
        *,
        role: str,
        step: str,
        index: int = 0,
        agent: str = "",
        isolated: bool = False,
        parent_state: StateStore | Overlay | None = None,
        timeout: float | None = None,
    ) -> AgentOutput:
        """Runs one admitted agent on a worker and records its spend.

        `step` is the agent's place in the pattern (Job.step). With `isolated`,
        the agent writes to its own overlay, merged into the parent state only
        when it succeeds."""
        journaled = self.replay.pop(step, None) if self.replay else None
        if journaled is not None:
            return await self._replayed(step, journaled, role=role, index=index)
        base: StateStore | Overlay = parent_state if parent_state is not None else self.state
        view: StateStore | Overlay = Overlay(base, spec.name) if isolated else base
        ctx = RunningAgent(self, spec, view, role=role, step=step, index=index)
        ctx.span = span = parent_of(self.span).agent(spec, step=step, role=role, index=index)
        self.mailbox.register(spec.name)
        if timeout is None:
            timeout = spec_timeout(spec) or self.agent_timeout
        started = time.perf_counter()
        try:
            output = await self.dispatcher.execute(
                spec,
                task,
                agent=agent or spec.name,
                run_id=self.run_id,
                thread_id=self.thread_id,
                observer=ctx,
                timeout=timeout,
                assignment_id=f"{self.run_id}:{step}",
                trace_context=span.carrier(),
            )
        except asyncio.CancelledError:
            span.end(cancelled_output(spec.name, self.cancel_reason or "cancelled"))
            raise
        finally:
            self.mailbox.unregister(spec.name)
        if not output.duration_ms:
            output.duration_ms = (time.perf_counter() - started) * 1000.0
        span.end(output)
        if isinstance(view, Overlay):
            if succeeded(output):
                view.merge_to_parent()
            else:
                view.discard()
        await self.record(output)
        if self.on_step is not None:
            self.on_step(step, output)  # journaled before its event: see _replayed
        self.emit(
            RunEvent(
                agent_finished=events_pb2.AgentFinished(
                    assignment_id=ctx.assignment_id,
                    output=output,
                    worker_id=ctx.worker_id,
                    attempt=ctx.attempt,
                    role=role,
                    index=index,
                    step=step,
                )
            )
        )
        return output

    async def _replayed(self, step: str, output: AgentOutput, *, role: str, index: int) -> AgentOutput:
        """A step whose output was journaled before a restart: no worker runs it
        again. Its spend counts again (the run's own budget is rebuilt by the
        replay; a shared one kept in a store counted it already), its
        state writes are already in the scope, and its agent_finished event is
        emitted only if the crash lost it (the step was journaled first)."""
        if self.recount:
            await self.record(output)
        if step not in self.reported:
            self.emit(
                RunEvent(
                    agent_finished=events_pb2.AgentFinished(
                        assignment_id=f"{self.run_id}:{step}", output=output, role=role, index=index, step=step
                    )
                )
            )
        return output


def spec_timeout(spec: AgentSpec) -> float | None:
    """A per-agent deadline from `metadata.timeout_secs`, if the spec sets one."""
    if spec.HasField("metadata"):
        value = spec.metadata.fields.get("timeout_secs")
        if value is not None and value.WhichOneof("kind") == "number_value" and value.number_value > 0:
            # check_spec refuses what is out of range; never hand on a deadline
            # a timer cannot hold.
            return min(float(value.number_value), MAX_TIMEOUT_S)
    return None


class RunningAgent:
    """One agent of a run while a worker runs it, as the sidecar sees it: the
    state it reads and writes (an overlay when isolated), its mailbox name and
    the tools it may use. (Not the worker SDK's `carsvc.worker.AgentContext`.)

    It is its assignment's AssignmentObserver: the dispatcher tells it where
    the assignment went, and it turns that into the run's events."""

    __slots__ = (
        "assignment_id",
        "attempt",
        "index",
        "infra",
        "name",
        "role",
        "span",
        "spec",
        "state",
        "step",
        "tools",
        "worker_id",
    )

    def __init__(
        self,
        infra: RunInfra,
        spec: AgentSpec,
        state: StateStore | Overlay,
        *,
        role: str,
        step: str,
        index: int,
    ) -> None:
        self.infra = infra
        self.spec = spec
        self.name = spec.name
        self.state = state
        self.tools = frozenset(spec.tools)
        self.role = role
        self.step = step  # its place in the pattern (Job.step)
        self.index = index
        self.assignment_id = ""
        self.worker_id = ""
        self.attempt = 1
        # Its step's span (a no-op unless tracing is on); runtime calls are its children.
        self.span: AgentSpan = NO_AGENT

    # -- AssignmentObserver ------------------------------------------------------

    @property
    def cancel_reason(self) -> str:
        return self.infra.cancel_reason

    def on_assigned(self, a: Assignment) -> None:
        self.assignment_id = a.assignment_id
        self.infra.emit(
            RunEvent(
                agent_started=events_pb2.AgentStarted(
                    agent=self.name, assignment_id=a.assignment_id, role=self.role, index=self.index, step=self.step
                )
            )
        )

    def on_placed(self, a: Assignment, worker_id: str) -> None:
        self.worker_id = worker_id
        self.attempt = a.attempt
        self.span.placed(worker_id, a.attempt)

    def on_redispatched(self, a: Assignment, reason: str, previous_worker_id: str) -> None:
        self.span.redispatched(reason, previous_worker_id, a.attempt)
        self.infra.emit(
            RunEvent(
                agent_redispatched=events_pb2.AgentRedispatched(
                    agent=self.name,
                    assignment_id=a.assignment_id,
                    attempt=a.attempt,
                    reason=reason,
                    previous_worker_id=previous_worker_id,
                )
            )
        )

    def on_unplaced(self, a: Assignment, notice: str) -> None:
        # A progress event without a fraction: the agent is waiting for a worker.
        self.span.unplaced(notice)
        self.infra.emit(
            RunEvent(progress=events_pb2.AgentProgress(agent=self.name, assignment_id=a.assignment_id, message=notice))
        )
