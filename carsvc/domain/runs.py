"""The run registry: one active run per thread, lookup by run and thread id,
owner checks, the run lifecycle, and bounded retention of finished runs.

PENDING -> RUNNING <-> WAITING -> SUCCEEDED | FAILED | CANCELLED. A run's life
never depends on anyone watching it: it runs in its own task."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from carsvc._proto.car.v1 import events_pb2, patterns_pb2, runs_pb2, types_pb2
from carsvc.domain.backend import Backend, Budget, Recovered
from carsvc.domain.budget import LocalBudget
from carsvc.domain.budget_types import BudgetLimits
from carsvc.domain.clock import now_ms
from carsvc.domain.convert import limits_from_proto, snapshot_to_proto
from carsvc.domain.decisions import Outcome, check_decisions
from carsvc.domain.errors import (
    AlreadyExists,
    CarError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from carsvc.domain.eventlog import RunEventLog, Subscription
from carsvc.domain.infra import RunInfra
from carsvc.domain.mailbox import Mailbox
from carsvc.domain.overlay import StateStore
from carsvc.domain.runtime import Pattern, PatternOutcome, run_result
from carsvc.domain.tracing import EMPTY, NO_TRACER, Tracer, incoming
from carsvc.domain.workers import Dispatcher
from carsvc.logs import ids

if TYPE_CHECKING:
    from carsvc.config import Settings

RunStatus = types_pb2.RunStatus
RunEvent = events_pb2.RunEvent
PENDING = types_pb2.RUN_STATUS_PENDING
RUNNING = types_pb2.RUN_STATUS_RUNNING
WAITING = types_pb2.RUN_STATUS_WAITING
SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
FAILED = types_pb2.RUN_STATUS_FAILED
CANCELLED = types_pb2.RUN_STATUS_CANCELLED
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

ON_BUSY_REJECT = runs_pb2.ON_BUSY_REJECT
ON_BUSY_INTERRUPT = runs_pb2.ON_BUSY_INTERRUPT
ON_BUSY_ENQUEUE = runs_pb2.ON_BUSY_ENQUEUE

log = logging.getLogger("carsvc.runs")

# Rebuilds a journaled run's pattern from its request (RunService.pattern_of).
Rebuild = Callable[[runs_pb2.StartRunRequest], Pattern]

# What a resumed run's status_changed event says, after a restart.
RESUMED = "resumed after the sidecar restarted"

# Reads of another replica's run record before giving up (50 ms apart).
REMOTE_RECORD_TRIES = 40

# Thread ids the sidecar generates (StartRun without thread_id).
_GENERATED_THREAD = re.compile(r"thread-[0-9a-f]{32}")


def _no_replicas(run_id: str, reason: str) -> None:
    raise AssertionError(f"run '{run_id}' is not this replica's, and there are no others")


class _Ended:
    """The pattern of a run that has ended (or was read back from the journal):
    only its name is kept, so a retained run does not hold its request."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self, infra: RunInfra) -> PatternOutcome:
        raise FailedPrecondition(f"run '{infra.run_id}' has ended and cannot run again")


def status_name(status: int) -> str:
    return types_pb2.RunStatus.Name(types_pb2.RunStatus.ValueType(status))


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What the RunManager takes from the sidecar's Settings (carsvc/config.py,
    where each is explained and has its default)."""

    event_retention: int
    finished_run_retention: int
    max_queued_per_thread: int
    mailbox_depth: int
    mailbox_recv_timeout: float
    suspension_timeout: float
    max_unmatched_decisions: int
    cancel_ack_timeout: float
    agent_timeout: float | None  # None: no deadline
    max_watchers_per_run: int
    # A result larger than this, serialized, is not sent inline (GetRun, ListRuns,
    # run_finished, Submit): it is marked result_omitted and read with ReadRunResult.
    max_inline_result_bytes: int
    # State scopes the sidecar holds at once (each with at least one key, or in use).
    max_state_scopes: int
    # With a journal, active runs resume after a restart (unless a request opts out).
    resume_runs: bool

    @classmethod
    def from_settings(cls, s: Settings) -> RunSettings:
        return cls(
            event_retention=s.event_retention,
            finished_run_retention=s.finished_run_retention,
            max_queued_per_thread=s.max_queued_per_thread,
            mailbox_depth=s.mailbox_depth,
            mailbox_recv_timeout=s.mailbox_recv_timeout_s,
            suspension_timeout=s.suspension_timeout_s,
            max_unmatched_decisions=s.max_unmatched_decisions,
            cancel_ack_timeout=s.cancel_ack_timeout_s,
            agent_timeout=s.agent_timeout_s or None,
            max_watchers_per_run=s.max_watchers_per_run,
            max_inline_result_bytes=s.max_inline_result_bytes,
            max_state_scopes=s.max_state_scopes,
            resume_runs=s.resume_runs,
        )


@dataclass(eq=False)
class RunRecord:
    run_id: str
    thread_id: str
    agent_id: str
    pattern: Pattern
    infra: RunInfra
    state_scope: str
    labels: dict[str, str]
    timeout: float | None
    ordinal: int
    status: int = PENDING
    termination_reason: str = ""
    termination_detail: str = ""
    created_ms: int = field(default_factory=now_ms)
    started_ms: int = 0
    finished_ms: int = 0
    result: patterns_pb2.RunResult | None = None
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""
    timed_out: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The budget as the run ended (kept, so a shared budget's later spend does
    # not change a finished run's record).
    final_budget: types_pb2.BudgetSnapshot | None = None
    # Size of the serialized result, and whether that is too large to send inline.
    result_bytes: int = 0
    result_omitted: bool = False
    # Its end is decided (status, done and the thread handoff may still wait
    # for the journal to commit it: RunManager._finish).
    ending: bool = False
    # Some of its events could not be read back from the journal.
    history_incomplete: bool = False
    # Its request is journaled: after a restart it resumes (docs/runs.md).
    resumable: bool = False
    # Stopped for a restart without ending: it resumes when the sidecar is back.
    parked: bool = False

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def events(self) -> RunEventLog:
        return self.infra.events

    def finished_event(self, status: int | None = None) -> events_pb2.RunFinished:
        """The run_finished event of this (ended) run; `status` while its end waits for the journal."""
        finished = events_pb2.RunFinished(
            status=self.status if status is None else status,  # type: ignore[arg-type]
            reason=self.termination_reason,
            detail=self.termination_detail,
            budget=self.final_budget,
            result_bytes=self.result_bytes,
            result_omitted=self.result_omitted,
        )
        if self.result is not None and not self.result_omitted:
            finished.result.CopyFrom(self.result)
        return finished

    def set_result(self, result: patterns_pb2.RunResult | None, inline_limit: int) -> None:
        self.result = result
        self.result_bytes = result.ByteSize() if result is not None else 0
        self.result_omitted = self.result_bytes > inline_limit

    def serialized_result(self) -> bytes:
        """The finished run's result as ReadRunResult streams it."""
        if not self.finished:
            raise FailedPrecondition(
                f"run '{self.run_id}' has not finished ({status_name(self.status)}); it has no result yet",
                field="run_id",
            )
        if self.result is None:
            raise FailedPrecondition(f"run '{self.run_id}' ended without a result", field="run_id")
        return self.result.SerializeToString()

    def handle(self) -> types_pb2.RunHandle:
        return types_pb2.RunHandle(
            run_id=self.run_id,
            thread_id=self.thread_id,
            agent_id=self.agent_id,
            status=types_pb2.RunStatus.ValueType(self.status),
        )

    def to_proto(self, *, include_result: bool = True, whole: bool = False) -> runs_pb2.Run:
        """The run as clients see it; `whole` includes even an omitted result (the journal's copy)."""
        msg = runs_pb2.Run(
            run_id=self.run_id,
            thread_id=self.thread_id,
            agent_id=self.agent_id,
            status=self.status,  # type: ignore[arg-type]
            pattern=self.pattern.name,
            termination_reason=self.termination_reason,
            termination_detail=self.termination_detail,
            created_unix_ms=self.created_ms,
            started_unix_ms=self.started_ms,
            finished_unix_ms=self.finished_ms,
            budget=self.final_budget or snapshot_to_proto(self.infra.budget.snapshot()),
            last_seq=self.events.last_seq,
            labels=self.labels,
            state_scope=self.state_scope,
            result_bytes=self.result_bytes,
            result_omitted=self.result_omitted,
            history_incomplete=self.history_incomplete,
        )
        if self.result is not None and (whole or (include_result and not self.result_omitted)):
            msg.result.CopyFrom(self.result)
        return msg

    def check_owner(self, agent_id: str) -> None:
        check_owner(self.run_id, self.agent_id, agent_id)


def check_owner(run_id: str, owner: str, agent_id: str) -> None:
    """Only the agent_id that started a run may cancel it or decide for it."""
    if agent_id != owner:
        raise PermissionDenied(f"run '{run_id}' belongs to agent_id '{owner}', not '{agent_id}'", field="agent_id")


class RunManager:
    """Starts runs, keeps them reachable by run and thread id, and ends them."""

    def __init__(self, dispatcher: Dispatcher, settings: RunSettings, backend: Backend) -> None:
        self.dispatcher = dispatcher
        self.backend = backend
        # Where runs, steps, events and state are kept durably (None: nowhere).
        self.journal = backend.store
        self.threads = backend.threads
        # With several replicas: where other replicas' runs are read, and how a
        # run interrupting one of them asks for its cancel (set by the services).
        self.directory = backend.directory
        self.cancel_elsewhere: Callable[[str, str], None] = _no_replicas
        self.settings = settings
        self.runs: OrderedDict[str, RunRecord] = OrderedDict()
        self._active_by_thread: dict[str, RunRecord] = {}
        self._queued_by_thread: dict[str, deque[RunRecord]] = {}
        self._finished_order: deque[str] = deque()
        self.scopes: dict[str, StateStore] = {}
        # Scope retention (docs/runs.md, "State scopes"): active or queued runs and
        # state watchers using a scope, and retained run records naming it.
        self._scope_users: Counter[str] = Counter()
        self._scope_runs: Counter[str] = Counter()
        self._ordinal = 0
        # For metrics: finished runs by status, and spawns the budgets refused.
        self.finished_by_status: Counter[int] = Counter()
        self.budget_denials = 0
        # Applying another replica's state write: not stored again.
        self._copying = False
        # Spans of runs and their agents (carsvc/telemetry when tracing is on).
        self.tracer: Tracer = NO_TRACER

    # -- shared resources -----------------------------------------------------------

    def scope(self, name: str) -> StateStore:
        store = self.scopes.get(name)
        if store is None:
            if len(self.scopes) >= self.settings.max_state_scopes:
                raise ResourceExhausted(
                    f"the sidecar already holds {len(self.scopes)} state scopes (max_state_scopes); "
                    "delete the keys of scopes no longer needed",
                    field="state_scope",
                )
            store = self.scopes[name] = StateStore()
            self._journal_scope(name, store)
        return store

    def hold_scope(self, name: str) -> StateStore:
        """The scope, kept while held (a state watcher holds the scope it watches)."""
        store = self.scope(name)
        self._scope_users[name] += 1
        return store

    def release_scope(self, name: str) -> None:
        """Lets a held scope go; one left with no keys and no user is dropped."""
        users = self._scope_users[name] - 1
        if users > 0:
            self._scope_users[name] = users
            return
        del self._scope_users[name]
        store = self.scopes.get(name)
        if store is not None and len(store) == 0:
            del self.scopes[name]

    def _forget_scope_run(self, record: RunRecord) -> None:
        """A run record left retention. The scope of a thread the sidecar named
        (nobody else can know it unless told) goes with the last run naming it."""
        name = record.state_scope
        left = self._scope_runs[name] - 1
        if left > 0:
            self._scope_runs[name] = left
            return
        del self._scope_runs[name]
        if name in self._scope_users or not _GENERATED_THREAD.fullmatch(name):
            return
        store = self.scopes.pop(name, None)
        if store is not None and self.journal is not None:
            for key in store.keys(""):  # every key (StateStore.keys takes a prefix)
                self.journal.state(name, key, None, "retention", now_ms())

    def _infra(self, run_id: str, thread_id: str, state_scope: str, budget: Budget) -> RunInfra:
        return RunInfra(
            run_id=run_id,
            thread_id=thread_id,
            state=self.scope(state_scope),
            budget=budget,
            events=RunEventLog(
                run_id,
                self.settings.event_retention,
                self._event_sink(run_id),
                # With a journal, watchers see an event once it is committed.
                barrier=self.journal.barrier if self.journal is not None else None,
            ),
            mailbox=Mailbox(self.settings.mailbox_depth),
            dispatcher=self.dispatcher,
            mailbox_recv_timeout=self.settings.mailbox_recv_timeout,
            suspension_timeout=self.settings.suspension_timeout,
            max_unmatched_decisions=self.settings.max_unmatched_decisions,
            agent_timeout=self.settings.agent_timeout,
        )

    def _event_sink(self, run_id: str) -> Callable[[int, bytes], None] | None:
        journal = self.journal
        if journal is None:
            return None
        return lambda seq, data: journal.event(run_id, seq, data)

    def _journal_scope(self, name: str, store: StateStore) -> None:
        journal = self.journal
        if journal is not None:
            store.subscribe(
                lambda t: None if self._copying else journal.state(name, t.key, t.new, t.writer, t.time_unix_ms)
            )

    def copy_state(self, scope: str, key: str, value: struct_pb2.Value | None, writer: str) -> None:
        """Another replica's state write, kept here as a copy (it stored it
        itself). Watchers here see it as any write."""
        try:
            store = self.scope(scope)
        except ResourceExhausted as full:
            log.warning("a state write from another replica to scope %r was not copied: %s", scope[:200], full)
            return
        self._copying = True
        try:
            if value is None:
                store.delete(key, writer)
            elif store.get(key) != value:
                store.set(key, value, writer)
        finally:
            self._copying = False

    def copy_all_state(self, stored: dict[str, dict[str, tuple[struct_pb2.Value, str]]]) -> None:
        """Makes this replica's state what the shared store holds (after a gap
        in the change feed)."""
        for scope in set(self.scopes) | set(stored):
            keys = stored.get(scope, {})
            local = self.scopes.get(scope)
            for key in local.keys("") if local is not None else ():
                if key not in keys:
                    self.copy_state(scope, key, None, "resync")
            for key, (value, writer) in keys.items():
                self.copy_state(scope, key, value, writer)

    async def create_budget(self, limits: BudgetLimits, budget_id: str = "") -> Budget:
        return await self.backend.budgets.create(limits, budget_id or f"budget-{uuid.uuid4().hex}")

    async def budget(self, budget_id: str) -> Budget:
        return await self.backend.budgets.get(budget_id)

    # -- starting -------------------------------------------------------------------------

    async def start(
        self,
        pattern: Pattern,
        *,
        thread_id: str = "",
        agent_id: str = "",
        run_id: str = "",
        on_busy: int = ON_BUSY_REJECT,
        limits: BudgetLimits | None = None,
        budget_id: str = "",
        state_scope: str = "",
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
        initial_decisions: list[types_pb2.ToolCallDecision] | None = None,
        request: runs_pb2.StartRunRequest | None = None,
    ) -> RunRecord:
        """Starts (or queues) a run of `pattern`. With a journal, `request` (the
        StartRunRequest it came from) is journaled so the run can resume after a
        restart, unless it opts out (request.resume, else the resume_runs setting)."""
        if not self.dispatcher.accepting:
            # Draining (Sidecar.stop): a run started now would only be cancelled.
            raise Unavailable(
                "the sidecar is draining (shutting down) and starts no new runs: retry against another "
                "sidecar or after it restarts"
            )
        run_id = run_id or uuid.uuid4().hex
        if run_id in self.runs:
            raise AlreadyExists(f"run '{run_id}' already exists", field="run_id")
        thread_id = thread_id or f"thread-{uuid.uuid4().hex}"
        # Checked before the thread is taken: a refused start must not hold it.
        budget = await self.budget(budget_id) if budget_id else LocalBudget.of(limits)
        if initial_decisions:
            check_decisions(initial_decisions, "initial_decisions")
        holder, ordinal = await self._take_thread(thread_id, run_id)
        if run_id in self.runs:  # started while this one awaited
            if holder == run_id:
                self.threads.release(thread_id, run_id)
            raise AlreadyExists(f"run '{run_id}' already exists", field="run_id")
        active = None if holder == run_id else self.runs.get(holder)
        elsewhere = None
        if holder != run_id and active is None:
            elsewhere = await self._remote_holder(thread_id, holder, need_owner=on_busy == ON_BUSY_INTERRUPT)
        self._ordinal = max(self._ordinal, ordinal)
        try:
            return self._start(
                pattern, active or elsewhere, run_id=run_id, thread_id=thread_id, agent_id=agent_id,
                on_busy=on_busy, budget=budget, state_scope=state_scope, labels=labels, timeout=timeout,
                initial_decisions=initial_decisions, request=request, ordinal=ordinal,
            )
        except BaseException:
            if holder == run_id:
                self.threads.release(thread_id, run_id)
            raise

    async def _take_thread(self, thread_id: str, run_id: str) -> tuple[str, int]:
        """The thread's holder after trying to take it for `run_id`, and the new
        run's ordinal; with a shared store both are asked at once (one round
        trip), and a thread taken for a start that then fails is let go."""
        if self.directory is None:
            return await self.threads.acquire(thread_id, run_id), self._ordinal + 1
        holder, ordinal = await asyncio.gather(
            self.threads.acquire(thread_id, run_id), self.directory.next_ordinal(), return_exceptions=True
        )
        if isinstance(ordinal, BaseException):
            if holder == run_id:
                self.threads.release(thread_id, run_id)
            raise ordinal
        if isinstance(holder, BaseException):
            raise holder
        return holder, ordinal

    async def _remote_holder(self, thread_id: str, holder: str, *, need_owner: bool) -> runs_pb2.Run:
        """The run another replica holds the thread for: its stored record when
        its owner must be checked (an interrupt), else just its id."""
        if not need_owner or self.directory is None:
            return runs_pb2.Run(run_id=holder, thread_id=thread_id)
        for _ in range(REMOTE_RECORD_TRIES):  # its record may still be on its way to the store
            record = await self.directory.record(holder)
            if record is not None:
                return record
            await asyncio.sleep(0.05)
        raise Unavailable(f"thread '{thread_id}' is held by run '{holder}', whose record cannot be read; retry")

    def _start(
        self,
        pattern: Pattern,
        active: RunRecord | runs_pb2.Run | None,
        *,
        run_id: str,
        thread_id: str,
        agent_id: str,
        on_busy: int,
        budget: Budget,
        state_scope: str,
        labels: dict[str, str] | None,
        timeout: float | None,
        initial_decisions: list[types_pb2.ToolCallDecision] | None,
        request: runs_pb2.StartRunRequest | None,
        ordinal: int,
    ) -> RunRecord:
        """`active`: the run holding the thread (its record here, or its stored
        record when another replica runs it), None when `run_id` took it."""
        if active is not None and on_busy == ON_BUSY_REJECT:
            raise FailedPrecondition(
                f"thread '{thread_id}' already has an active run '{active.run_id}' "
                "(set on_busy to INTERRUPT or ENQUEUE to run after it)",
                field="thread_id",
            )
        if active is not None and on_busy == ON_BUSY_INTERRUPT:
            check_owner(active.run_id, active.agent_id, agent_id)  # interrupting is cancelling: the owner's call
        queue = self._queued_by_thread.get(thread_id)
        if active is not None and len(queue or ()) >= self.settings.max_queued_per_thread:
            raise ResourceExhausted(
                f"thread '{thread_id}' already has {self.settings.max_queued_per_thread} queued "
                "runs (max_queued_per_thread)",
                field="thread_id",
            )
        state_scope = state_scope or thread_id
        record = RunRecord(
            run_id=run_id,
            thread_id=thread_id,
            agent_id=agent_id,
            pattern=pattern,
            infra=self._infra(run_id, thread_id, state_scope, budget),
            state_scope=state_scope,
            labels=dict(labels or {}),
            timeout=timeout,
            ordinal=ordinal,
        )
        self._hook(record)
        record.infra.span = self.tracer.run(
            run_id=run_id, thread_id=thread_id, pattern=pattern.name, owner=agent_id, parent=incoming.get()
        )
        if initial_decisions:
            record.infra.decisions.submit(initial_decisions)
        self.runs[run_id] = record
        self._scope_runs[state_scope] += 1
        self._scope_users[state_scope] += 1
        if request is not None and self._may_resume(request):
            self._make_resumable(record, request.SerializeToString(), {})
        if active is None:
            self._launch(record)
            return record
        self._journal_run(record)
        if queue is None:
            queue = self._queued_by_thread[thread_id] = deque()
        if on_busy == ON_BUSY_INTERRUPT:
            queue.appendleft(record)
            if isinstance(active, RunRecord):
                self._request_cancel(active, f"interrupted by run '{run_id}'")
            else:
                self.cancel_elsewhere(active.run_id, f"interrupted by run '{run_id}'")
        else:
            queue.append(record)
        return record

    # -- resuming after a restart -----------------------------------------------------

    def _may_resume(self, request: runs_pb2.StartRunRequest) -> bool:
        # The in-memory backend's shared budgets are not journaled; Redis keeps them.
        if self.journal is None or (request.budget_id and self.directory is None):
            return False
        return request.resume if request.HasField("resume") else self.settings.resume_runs

    def _make_resumable(
        self, record: RunRecord, request: bytes | None, steps: dict[str, types_pb2.AgentOutput]
    ) -> None:
        """Journals the run's request (None: it is there already) and every step
        output it accepts; `steps` are outputs a resumed run returns without a worker."""
        journal = self.journal
        assert journal is not None
        run_id = record.run_id
        if request is not None:
            journal.request(run_id, request)
        record.resumable = True
        record.infra.replay = steps
        record.infra.on_step = lambda step, output: journal.step(run_id, step, output)

    def _park(self, record: RunRecord) -> None:
        """Stops a resumable run for a restart without ending it: its workers are
        told why, its journal record stays active, and it resumes on start-up."""
        record.parked = True
        record.infra.cancel_reason = "the sidecar is restarting; the run resumes after it"
        record.infra.end()
        record.infra.span.end("RUN_STATUS_RUNNING", "parked", record.infra.cancel_reason, None)
        if record.task is not None:
            record.task.cancel(record.infra.cancel_reason)

    def _resume(self, record: RunRecord, why: str = RESUMED) -> None:
        """Runs a restored run's pattern again from the top (journaled steps replay)."""
        resumed = events_pb2.RunStatusChanged(
            status=types_pb2.RUN_STATUS_RUNNING, reason=why
        )
        self._run(record, RunEvent(status_changed=resumed))

    def _launch(self, record: RunRecord) -> None:
        record.started_ms = now_ms()
        started = events_pb2.RunStarted(
            thread_id=record.thread_id, agent_id=record.agent_id, pattern=record.pattern.name
        )
        self._run(record, RunEvent(run_started=started))

    def _run(self, record: RunRecord, first: RunEvent) -> None:
        """Makes `record` its thread's active run and drives its pattern in a task."""
        self._active_by_thread[record.thread_id] = record
        record.status = RUNNING
        record.events.append(first)
        record.task = asyncio.get_running_loop().create_task(self._drive(record), name=f"run-{record.run_id}")
        record.task.add_done_callback(lambda _: self._ensure_finished(record))
        self._journal_run(record)

    def _hook(self, record: RunRecord) -> None:
        """Connects the run's decisions and budget refusals to the manager."""
        record.infra.decisions.on_waiting = lambda waiting: self._set_waiting(record, waiting)
        record.infra.on_denied = self._count_denial

    def _journal_run(self, record: RunRecord) -> None:
        if self.journal is not None:
            self.journal.run(record.ordinal, record.to_proto(whole=True))

    def _ensure_finished(self, record: RunRecord) -> None:
        # A task cancelled before its first step never runs _drive's handlers.
        if not record.ending and not record.parked:
            self._finish(record, CANCELLED, "cancelled", record.cancel_reason or "cancelled")

    async def _drive(self, record: RunRecord) -> None:
        status, reason, detail = FAILED, "error", ""
        timer = None
        if record.timeout:
            timer = asyncio.get_running_loop().call_later(record.timeout, self._time_out, record)
        try:
            outcome = await record.pattern.run(record.infra)
            record.set_result(run_result(outcome.result), self.settings.max_inline_result_bytes)
            status = FAILED if outcome.failed else SUCCEEDED
            reason, detail = outcome.reason, outcome.detail
        except asyncio.CancelledError:
            if record.parked:
                return  # stopped for a restart: it resumes from the journal, it does not end
            if record.timed_out:
                reason, detail = "timeout", record.infra.cancel_reason
            else:
                status, reason = CANCELLED, "cancelled"
                detail = record.cancel_reason or "cancelled"
        except CarError as err:
            detail = str(err)
        except Exception as err:
            log.exception("run %s failed inside the sidecar", record.run_id, extra=ids(run_id=record.run_id))
            detail = f"internal error: {err!r}"
        finally:
            if timer is not None:
                timer.cancel()
        self._finish(record, status, reason, detail)

    @staticmethod
    def _time_out(record: RunRecord) -> None:
        """The run's timeout_ms passed: its agents are cancelled with that reason."""
        if record.task is None or record.task.done() or record.cancel_reason:
            return
        record.timed_out = True
        record.infra.cancel_reason = f"the run did not finish within {record.timeout:g}s"
        record.task.cancel(record.infra.cancel_reason)

    def _count_denial(self) -> None:
        self.budget_denials += 1

    def _set_waiting(self, record: RunRecord, waiting: bool) -> None:
        if record.ending:
            return
        record.status = WAITING if waiting else RUNNING
        record.events.append(
            RunEvent(
                status_changed=events_pb2.RunStatusChanged(
                    status=types_pb2.RunStatus.ValueType(record.status),
                    reason="a tool call waits for a decision" if waiting else "every tool call has its decision",
                )
            )
        )
        self._journal_run(record)  # other replicas read its status from the store

    def _finish(
        self,
        record: RunRecord,
        status: int,
        reason: str,
        detail: str,
        *,
        at_once: bool = False,
        budget: types_pb2.BudgetSnapshot | None = None,
    ) -> None:
        """Ends a run: its run_finished event and final record go to the journal
        first; what shows the end to clients (status, `done`, the thread's next
        run) follows at once, or, in strict mode and while the journal lags,
        once the journal has committed it. `budget`: its final budget, when
        this replica's counters do not know it (a run ended after a restart)."""
        if record.ending:
            return
        record.ending = True
        record.infra.end()
        record.termination_reason = reason
        record.termination_detail = detail
        record.finished_ms = now_ms()
        record.final_budget = budget or snapshot_to_proto(record.infra.budget.snapshot())
        record.infra.span.end(status_name(status), reason, detail, record.final_budget)
        record.events.append(RunEvent(run_finished=record.finished_event(status)))
        record.events.close()
        record.pattern = _Ended(record.pattern.name)  # its request messages can go
        journal = self.journal
        if journal is not None:
            ended = record.to_proto(whole=True)
            ended.status = status  # type: ignore[assignment]
            journal.run(record.ordinal, ended)
            if record.resumable:
                journal.run_ended(record.run_id)
            commit = None if at_once else journal.settle()
            if commit is not None:
                commit.add_done_callback(lambda done: self._ended(record, status, done))
                return
        self._ended(record, status)

    def _ended(self, record: RunRecord, status: int, commit: asyncio.Future[None] | None = None) -> None:
        if commit is not None and commit.exception() is not None:
            log.error("the end of run %s is not journaled: %s", record.run_id, commit.exception())
        record.status = status
        self.finished_by_status[status] += 1
        record.done.set()
        # Successes are routine (thousands a second under load); anything else is news.
        log.log(
            logging.DEBUG if status == SUCCEEDED else logging.INFO,
            "run %s %s: %s %s", record.run_id, status_name(status), record.termination_reason,
            record.termination_detail,
            extra=ids(run_id=record.run_id, thread_id=record.thread_id),
        )
        if self._active_by_thread.get(record.thread_id) is record:
            del self._active_by_thread[record.thread_id]
            if not self._start_next(record):
                self.threads.release(record.thread_id, record.run_id)
        self._retain(record)

    def _start_next(self, previous: RunRecord) -> bool:
        """Hands `previous`'s thread to its next queued run and starts it;
        False when none is queued. If workers still owe answers to `previous`'s
        cancels, the next run holds the thread and starts once they have
        answered (or the ack timeout passed)."""
        thread_id = previous.thread_id
        queue = self._queued_by_thread.get(thread_id)
        while queue:
            nxt = queue.popleft()
            if nxt.status != PENDING or nxt.parked:
                continue  # parked: the sidecar is stopping, it starts after the restart
            if not queue:
                del self._queued_by_thread[thread_id]
            self.threads.hand_over(thread_id, previous.run_id, nxt.run_id)
            if not self.dispatcher.awaiting_acknowledgement(previous.run_id):
                self._launch(nxt)
                return True
            self._active_by_thread[thread_id] = nxt
            asyncio.get_running_loop().create_task(self._launch_after_acks(previous.run_id, nxt))
            return True
        self._queued_by_thread.pop(thread_id, None)
        return False

    async def _launch_after_acks(self, previous_run_id: str, nxt: RunRecord) -> None:
        await self.dispatcher.wait_acknowledged(previous_run_id, self.settings.cancel_ack_timeout)
        if nxt.status == PENDING and not nxt.parked and self._active_by_thread.get(nxt.thread_id) is nxt:
            self._launch(nxt)

    def _retain(self, record: RunRecord) -> None:
        self.release_scope(record.state_scope)
        self._finished_order.append(record.run_id)
        while len(self._finished_order) > self.settings.finished_run_retention:
            dropped = self._finished_order.popleft()
            gone = self.runs.pop(dropped, None)
            if gone is not None:
                self._forget_scope_run(gone)
            if self.journal is not None:
                self.journal.forget(dropped)

    # -- recovery -------------------------------------------------------------------------

    async def restore(
        self, recovered: Recovered, rebuild: Rebuild | None = None, *, because: str = RESUMED
    ) -> None:
        """Puts back what a journal held: state scopes, and runs with their
        events. Runs that were active when the sidecar stopped resume (their
        pattern rebuilt from the journaled request by `rebuild`; docs/runs.md),
        or, when they cannot, end FAILED with reason `sidecar_restarted`."""
        resumed: list[RunRecord] = []
        for name, keys in recovered.state.items():
            store = self.scopes[name] = StateStore()
            for key, (value, writer) in keys.items():
                store.set(key, value, writer)
            self._journal_scope(name, store)
        for run in recovered.runs:
            limits = run.budget.limits
            self._ordinal = max(self._ordinal + 1, recovered.ordinals.get(run.run_id, 0))
            record = RunRecord(
                run_id=run.run_id,
                thread_id=run.thread_id,
                agent_id=run.agent_id,
                pattern=_Ended(run.pattern),
                infra=self._infra(
                    run.run_id,
                    run.thread_id,
                    run.state_scope or run.thread_id,
                    LocalBudget.of(limits_from_proto(limits)),
                ),
                state_scope=run.state_scope or run.thread_id,
                labels=dict(run.labels),
                timeout=None,
                ordinal=recovered.ordinals.get(run.run_id, self._ordinal),
                status=run.status,
                termination_reason=run.termination_reason,
                termination_detail=run.termination_detail,
                created_ms=run.created_unix_ms,
                started_ms=run.started_unix_ms,
                finished_ms=run.finished_unix_ms,
                final_budget=run.budget,
            )
            record.set_result(run.result if run.HasField("result") else None, self.settings.max_inline_result_bytes)
            record.events.restore(recovered.events.get(run.run_id, []))
            skipped = recovered.skipped_events.get(run.run_id, [])
            record.history_incomplete = run.history_incomplete or bool(skipped)
            # A seq that was used (even by an event that could not be read back) is never used again.
            record.events.last_seq = max(record.events.last_seq, run.last_seq, *skipped)
            self.runs[run.run_id] = record
            self._scope_runs[record.state_scope] += 1
            if not record.finished:
                self._scope_users[record.state_scope] += 1  # released as it ends below
            if record.finished:
                record.ending = True
                record.events.close()
                record.done.set()
                self._finished_order.append(record.run_id)
            else:
                why = await self._restore_active(record, recovered, rebuild)
                if not why:
                    resumed.append(record)
                    continue
                # Not served yet: a crash before this end is committed ends the run the same way again.
                # Its spend as last reported (the counters here start from nothing).
                spent = [e.budget_updated.budget for e in record.events.since(0) if e.HasField("budget_updated")]
                self._finish(
                    record, FAILED, "sidecar_restarted", why, at_once=True, budget=spent[-1] if spent else run.budget
                )
        for record in resumed:
            if await self.threads.acquire(record.thread_id, record.run_id) != record.run_id:
                record.status = PENDING
                self._queued_by_thread.setdefault(record.thread_id, deque()).append(record)
            elif record.status == PENDING:
                self._launch(record)
            else:
                self._resume(record, because)
        if resumed:
            log.info("resuming %d run(s) after the restart", len(resumed))

    async def _restore_active(self, record: RunRecord, recovered: Recovered, rebuild: Rebuild | None) -> str:
        """Makes a restored active run ready to resume; returns why it cannot
        (empty when it can)."""
        data = recovered.requests.get(record.run_id)
        if data is None or rebuild is None:
            return "the sidecar restarted while the run was active (the run does not resume)"
        try:
            request = runs_pb2.StartRunRequest.FromString(data)
            pattern = rebuild(request)
            if request.budget_id:  # the shared budget, which counted its admitted steps already
                record.infra.budget = await self.budget(request.budget_id)
                record.infra.recount = False
                record.infra.counted = recovered.admitted.get(record.run_id, set())
        except (DecodeError, CarError) as err:
            log.error("run %s cannot resume: %s", record.run_id, err, extra=ids(run_id=record.run_id))
            return f"the sidecar restarted while the run was active, and it cannot resume: {err}"
        record.pattern = pattern
        record.timeout = request.timeout_ms / 1000 if request.timeout_ms else None
        self._hook(record)
        record.infra.span = self.tracer.run(
            run_id=record.run_id, thread_id=record.thread_id, pattern=pattern.name, owner=record.agent_id,
            parent=EMPTY, resumed=True,
        )
        if request.initial_decisions:
            record.infra.decisions.submit(list(request.initial_decisions))
        self._make_resumable(record, None, dict(recovered.steps.get(record.run_id, {})))
        record.infra.reported = {
            e.agent_finished.step for e in record.events.since(0) if e.WhichOneof("kind") == "agent_finished"
        }
        return ""

    # -- several replicas ----------------------------------------------------------------

    def active_ids(self) -> list[str]:
        """The runs this replica runs or has queued (it holds their leases)."""
        return [r.run_id for r in self.runs.values() if not r.finished and not r.parked]

    def let_go(self, run_id: str, reason: str) -> None:
        """Another replica runs `run_id` now (this one lost its lease): it stops
        here without ending, and is forgotten here."""
        record = self.runs.get(run_id)
        if record is None or record.finished or record.ending:
            return
        log.warning("run %s: %s; it stops here", run_id, reason, extra=ids(run_id=run_id))
        if record.task is not None and not record.task.done():
            self._park(record)
        record.parked = True
        record.events.close()
        del self.runs[run_id]
        if self._active_by_thread.get(record.thread_id) is record:
            del self._active_by_thread[record.thread_id]
        queue = self._queued_by_thread.get(record.thread_id)
        if queue is not None and record in queue:
            queue.remove(record)
        self.release_scope(record.state_scope)
        self._forget_scope_run(record)

    async def take_freed_threads(self) -> None:
        """Runs queued here behind another replica's run start once that run has
        let its thread go (the first of each queue)."""
        for thread_id in list(self._queued_by_thread):
            queue = self._queued_by_thread.get(thread_id)
            if not queue or thread_id in self._active_by_thread:
                continue
            nxt = queue[0]
            if nxt.status != PENDING or nxt.parked:
                continue
            if await self.threads.acquire(thread_id, nxt.run_id) != nxt.run_id:
                continue
            queue = self._queued_by_thread.get(thread_id)
            if queue and queue[0] is nxt and nxt.status == PENDING and thread_id not in self._active_by_thread:
                queue.popleft()
                if not queue:
                    del self._queued_by_thread[thread_id]
                self._launch(nxt)
            else:
                self.threads.release(thread_id, nxt.run_id)

    # -- lookup -------------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            raise NotFound(f"no run '{run_id}' (unknown, or no longer retained)", field="run_id")
        return record

    def by_thread(self, thread_id: str) -> RunRecord:
        """The thread's active run, else its newest queued or retained run."""
        active = self._active_by_thread.get(thread_id)
        if active is not None:
            return active
        for record in reversed(self.runs.values()):
            if record.thread_id == thread_id:
                return record
        raise NotFound(f"no run on thread '{thread_id}'", field="thread_id")

    def locate(self, run_id: str, thread_id: str) -> RunRecord:
        """Exactly one of run_id and thread_id must be given."""
        if run_id and thread_id:
            raise InvalidArgument("give run_id or thread_id, not both", field="run_id")
        if run_id:
            return self.get(run_id)
        if thread_id:
            return self.by_thread(thread_id)
        raise InvalidArgument("give run_id or thread_id", field="run_id")

    async def acknowledged(self) -> None:
        """Returns once what was just journaled may be acknowledged: at once, or
        after its commit in strict mode and while the journal lags."""
        journal = self.journal
        if journal is not None and (commit := journal.settle()) is not None:
            await commit

    def active_run(self, thread_id: str) -> RunRecord | None:
        return self._active_by_thread.get(thread_id)

    def select(
        self, *, thread_id: str = "", status: int = 0, agent_id: str = "", before: int = 0
    ) -> Iterator[RunRecord]:
        """Runs newest first, optionally filtered; `before` is an ordinal cursor."""
        for record in reversed(self.runs.values()):
            if before and record.ordinal >= before:
                continue
            if thread_id and record.thread_id != thread_id:
                continue
            if status and record.status != status:
                continue
            if agent_id and record.agent_id != agent_id:
                continue
            yield record

    def watch(
        self, record: RunRecord, after_seq: int, buffer: int, *, max_bytes: int = 1 << 62, follow: bool = True
    ) -> Subscription:
        """A new watcher of `record`'s events (followers are bounded by
        max_watchers_per_run); it may fall `buffer` events or `max_bytes` bytes
        behind. Without `follow`, it ends at the log's current end."""
        return record.events.subscribe(
            after_seq, buffer, self.settings.max_watchers_per_run, max_bytes=max_bytes, follow=follow
        )

    # -- control ------------------------------------------------------------------------

    async def cancel(self, record: RunRecord, reason: str, *, wait: bool = False) -> bool:
        """Cancels a run; returns False when it had already finished."""
        if record.ending:
            await record.done.wait()  # its end is being journaled
            return False
        self._request_cancel(record, reason)
        if wait:
            await record.done.wait()
            await self.dispatcher.wait_acknowledged(record.run_id, self.settings.cancel_ack_timeout)
        return True

    def submit_decisions(
        self, record: RunRecord, decisions: list[types_pb2.ToolCallDecision]
    ) -> Outcome:
        check_decisions(decisions)
        if record.finished:
            raise FailedPrecondition(
                f"run '{record.run_id}' has finished ({status_name(record.status)}); "
                "no tool call waits for a decision",
                field="run_id",
            )
        return record.infra.decisions.submit(decisions)

    def _request_cancel(self, record: RunRecord, reason: str) -> None:
        record.cancel_reason = reason or "cancelled by request"
        record.infra.cancel_reason = record.cancel_reason
        if record.status == PENDING:
            queue = self._queued_by_thread.get(record.thread_id)
            if queue is not None and record in queue:
                queue.remove(record)
                if not queue:
                    del self._queued_by_thread[record.thread_id]
            self._finish(record, CANCELLED, "cancelled", record.cancel_reason)
        elif record.task is not None and not record.task.done():
            record.task.cancel(record.cancel_reason)

    async def shutdown(self, grace: float) -> None:
        """Lets active runs finish within `grace` seconds, then cancels the rest."""
        active = [r for r in self.runs.values() if not r.finished]
        if not active:
            return
        waiters = [asyncio.ensure_future(r.done.wait()) for r in active]
        _, pending = await asyncio.wait(waiters, timeout=grace)
        for w in pending:
            w.cancel()
        for r in active:
            if r.finished or r.ending:
                continue
            if r.resumable and r.status == PENDING and r.task is None:
                r.parked = True  # queued: it stays PENDING in the journal and starts after the restart
            elif r.resumable and r.task is not None and not r.task.done():
                self._park(r)
            else:
                self._request_cancel(r, "the sidecar is shutting down")
        remaining = [r.done.wait() for r in active if not r.finished and not r.parked]
        if remaining:
            await asyncio.wait([asyncio.ensure_future(c) for c in remaining], timeout=5.0)
