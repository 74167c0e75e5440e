"""Worker sessions and the dispatcher that hands assignments to them.

An assignment belongs to one worker session at a time (its lease) until the
worker returns a result, the session ends, or its heartbeat lapses. Then it is
handed to another worker with `attempt + 1`, up to `max_attempts`; a result
from a superseded attempt is ignored. Each session holds at most
`max_in_flight` unfinished assignments, and new work goes to the least-loaded
session that serves the agent.

Finished assignments are remembered so that a late or duplicate result gets a
clear answer instead of "unknown": every finished assignment of a run while
the run is active, and the most recent FINISHED_MEMORY of ended runs (see
docs/worker-protocol.md, "What the sidecar remembers").
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import itertools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.clock import now_ms
from carsvc.domain.errors import InvalidArgument, Unavailable, shown
from carsvc.logs import ids

if TYPE_CHECKING:
    from carsvc.config import Settings

AgentOutput = types_pb2.AgentOutput
AgentSpec = types_pb2.AgentSpec
# The longest deadline a timer is set for (a year); callers check their inputs,
# this keeps the dispatcher safe from any that did not.
MAX_DEADLINE_S = 365 * 24 * 3600.0

log = logging.getLogger("carsvc.workers")

# What a worker whose hello names no max_in_flight may hold at once.
DEFAULT_MAX_IN_FLIGHT = 1
# Agents named in an unplaced notice (the rest are counted).
NOTICE_AGENTS = 10
# Finished assignment ids of ended runs (or of work outside a run) remembered to
# tell a late or duplicate result from an unknown one; those of active runs are
# all kept until their run ends.
FINISHED_MEMORY = 4_096


class State(enum.IntEnum):
    QUEUED = 0
    RUNNING = 1
    CANCELLING = 2  # cancel sent; the worker still holds a slot until it answers
    DONE = 3


class Verdict(enum.Enum):
    """What became of a result a worker sent."""

    ACCEPTED = "accepted"
    CANCEL_ACKNOWLEDGED = "cancel_acknowledged"
    SUPERSEDED = "superseded"  # a late result of an attempt that was handed out again
    FINISHED = "finished"  # the attempt's assignment already ended (a duplicate or late result)
    NOT_HELD = "not_held"  # the current attempt, but another session holds it (or none yet)
    WRONG_ATTEMPT = "wrong_attempt"  # an attempt that was never dispatched
    UNKNOWN = "unknown"


class Ending(enum.Enum):
    """How a finished assignment ended (told to a worker whose result came after)."""

    ACCEPTED = "its result was accepted"
    CANCELLED = "it was cancelled"
    LOST = "its worker was lost on the last attempt"
    UNPLACED = "no worker served its agent"
    UNANSWERED = "its cancel was never answered and its slot was freed"


@dataclass(frozen=True, slots=True)
class Finished:
    """What is remembered of a finished assignment."""

    attempt: int
    ending: Ending


class AssignmentObserver(Protocol):
    """What the dispatcher tells the one who asked for an assignment, and asks
    of it. The dispatcher declares these hooks and calls them; the run's side
    (domain/infra.py's RunningAgent) implements them, so this module never
    imports the layer above it."""

    @property
    def cancel_reason(self) -> str:
        """Why the caller is being cancelled, sent to the worker in
        AssignmentCancel.reason (empty: "run cancelled")."""
        ...

    def on_assigned(self, a: Assignment) -> None:
        """The assignment exists (it has its id; it is not placed yet)."""

    def on_placed(self, a: Assignment, worker_id: str) -> None:
        """The assignment's current attempt went to `worker_id`."""

    def on_redispatched(self, a: Assignment, reason: str, previous_worker_id: str) -> None:
        """The worker holding the assignment was lost (`reason`); it is queued
        again as attempt `a.attempt`."""

    def on_unplaced(self, a: Assignment, notice: str) -> None:
        """No connected worker serves the assignment's agent; `notice` says so,
        names the agents that are served and how long the assignment waits."""


class Assignment:
    """One agent run handed to workers, possibly over several attempts."""

    __slots__ = (
        "ack_timer",
        "agent",
        "assignment_id",
        "attempt",
        "deadline_ms",
        "future",
        "observer",
        "run_id",
        "session",
        "spec",
        "state",
        "task",
        "thread_id",
        "timer",
        "trace_context",
        "unplaced_timer",
    )

    def __init__(
        self,
        assignment_id: str,
        agent: str,
        spec: AgentSpec,
        task: str,
        run_id: str,
        thread_id: str,
        observer: AssignmentObserver | None,
        future: asyncio.Future[AgentOutput],
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.assignment_id = assignment_id
        self.agent = agent
        self.spec = spec
        self.task = task
        self.run_id = run_id
        self.thread_id = thread_id
        self.observer = observer
        self.future = future
        self.attempt = 1
        self.state = State.QUEUED
        self.session: WorkerSession | None = None
        self.deadline_ms = 0
        self.timer: asyncio.TimerHandle | None = None  # the agent's deadline
        self.unplaced_timer: asyncio.TimerHandle | None = None  # "no worker serves it"
        self.ack_timer: asyncio.TimerHandle | None = None  # waiting for a cancel's answer
        # The agent step's W3C trace context, sent to the worker (empty: not traced).
        self.trace_context = trace_context


class WorkerSession:
    """One connected worker stream and what it holds."""

    __slots__ = (
        "_exact",
        "_globs",
        "_serves_cache",
        "agents",
        "close_reason",
        "closed",
        "completed",
        "connected_ms",
        "drain_notice",
        "in_flight",
        "labels",
        "last_seen",
        "last_seen_ms",
        "max_in_flight",
        "outbox_assignments",
        "outbox_cancels",
        "outbox_replies",
        "remote",
        "sdk",
        "session_id",
        "wakeup",
        "worker_id",
    )

    def __init__(
        self,
        session_id: str,
        worker_id: str,
        agents: list[str],
        max_in_flight: int,
        labels: dict[str, str],
        sdk: str,
    ) -> None:
        self.session_id = session_id
        self.worker_id = worker_id
        self.max_in_flight = max_in_flight
        self.labels = labels
        self.sdk = sdk
        self.in_flight: dict[str, Assignment] = {}
        self.outbox_assignments: list[Assignment] = []
        self.outbox_cancels: list[tuple[str, str]] = []
        self.outbox_replies: list[object] = []
        self.drain_notice: tuple[str, int] | None = None
        self.wakeup = asyncio.Event()
        self.closed = False
        self.close_reason = ""
        self.completed = 0
        self.connected_ms = now_ms()
        self.last_seen = time.monotonic()
        self.last_seen_ms = self.connected_ms
        self.set_agents(agents)
        # Another replica's workers, reached through the cluster bus: used only
        # when no worker connected here has a free slot.
        self.remote = False

    def set_agents(self, agents: list[str]) -> None:
        self.agents = agents
        self._exact = {a for a in agents if not _is_glob(a)}
        self._globs = [a for a in agents if _is_glob(a)]
        self._serves_cache: dict[str, bool] = {}

    def serves(self, agent: str) -> bool:
        hit = self._serves_cache.get(agent)
        if hit is None:
            hit = agent in self._exact or any(fnmatch.fnmatchcase(agent, g) for g in self._globs)
            self._serves_cache[agent] = hit
        return hit

    @property
    def draining(self) -> bool:
        return self.drain_notice is not None

    @property
    def free_slots(self) -> int:
        return self.max_in_flight - len(self.in_flight)

    def touch(self) -> None:
        self.last_seen = time.monotonic()
        self.last_seen_ms = now_ms()

    def reply(self, item: object) -> None:
        """Queues a call result or frame error for the next outgoing frame."""
        self.outbox_replies.append(item)
        self.wakeup.set()

    def take_outbox(
        self,
    ) -> tuple[list[Assignment], list[tuple[str, str]], list[object]]:
        out = (self.outbox_assignments, self.outbox_cancels, self.outbox_replies)
        self.outbox_assignments, self.outbox_cancels, self.outbox_replies = [], [], []
        return out


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def cancelled_output(name: str, reason: str) -> AgentOutput:
    return AgentOutput(name=name, error=f"cancelled: {reason}")


def lost_output(name: str, worker_id: str, reason: str, attempt: int, max_attempts: int) -> AgentOutput:
    """The output of an assignment whose worker was lost on its last attempt."""
    return AgentOutput(
        name=name,
        error=f"worker '{worker_id}' was lost ({reason}) on attempt {attempt} of {max_attempts}; giving up",
    )


def timed_out_output(name: str, seconds: float) -> AgentOutput:
    out = AgentOutput(name=name, error=f"timed out after {seconds:g}s")
    out.outcome.status = types_pb2.OUTCOME_STATUS_TIMEOUT
    out.outcome.summary = out.error
    return out


# What a worker's hello may carry: it is kept for the session's life, listed by
# ListWorkers and logged, so a stranger's megabyte id must not get that far.
MAX_HELLO_ID_CHARS = 256  # worker_id, sdk, each agent name or glob
MAX_HELLO_AGENTS = 1_000
MAX_HELLO_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 1_024


def check_hello_sizes(worker_id: str, agents: list[str], labels: dict[str, str], sdk: str) -> None:
    """InvalidArgument naming the hello's field that is too long or has too many entries."""
    for name, value in (("worker_id", worker_id), ("sdk", sdk)):
        if len(value) > MAX_HELLO_ID_CHARS:
            raise InvalidArgument(
                f"is {len(value):,} characters, more than {MAX_HELLO_ID_CHARS}", field=f"hello.{name}"
            )
    if len(agents) > MAX_HELLO_AGENTS:
        raise InvalidArgument(f"names {len(agents):,} agents, more than {MAX_HELLO_AGENTS:,}", field="hello.agents")
    for i, agent in enumerate(agents):
        if len(agent) > MAX_HELLO_ID_CHARS:
            raise InvalidArgument(
                f"is {len(agent):,} characters, more than {MAX_HELLO_ID_CHARS}", field=f"hello.agents[{i}]"
            )
    if len(labels) > MAX_HELLO_LABELS:
        raise InvalidArgument(f"has {len(labels):,} entries, more than {MAX_HELLO_LABELS}", field="hello.labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS:
            raise InvalidArgument(
                f"key '{shown(key, 40)}' is {len(key):,} characters, more than {MAX_LABEL_KEY_CHARS}",
                field="hello.labels",
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument(
                f"is {len(value):,} characters, more than {MAX_LABEL_VALUE_CHARS}",
                field=f"hello.labels[{shown(key, 40)}]",
            )


class Dispatcher:
    """Places assignments on worker sessions and keeps their leases."""

    def __init__(
        self,
        *,
        max_attempts: int,
        unplaced_timeout: float,
        heartbeat_timeout: float,
        cancel_ack_timeout: float,
    ) -> None:
        self.max_attempts = max_attempts
        self.unplaced_timeout = unplaced_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.cancel_ack_timeout = cancel_ack_timeout
        self.sessions: dict[str, WorkerSession] = {}
        self._active: dict[str, Assignment] = {}
        self._pending: dict[str, deque[Assignment]] = {}
        self._serving: dict[str, list[WorkerSession]] = {}
        # Finished assignments: all of each active run's (with the ids by run, to
        # forget them when it ends), and the latest FINISHED_MEMORY of the rest.
        self._finished_active: dict[str, Finished] = {}
        self._finished_by_run: dict[str, list[str]] = {}
        self._finished: OrderedDict[str, Finished] = OrderedDict()
        prefix = os.urandom(3).hex()
        self._ids = (f"{prefix}-{n:x}" for n in itertools.count(1))
        self._session_ids = (f"s-{prefix}-{n:x}" for n in itertools.count(1))
        self.accepting = True
        # Cancelled assignments whose workers have not answered yet, by run.
        self._cancelling: dict[str, set[Assignment]] = {}
        self._acknowledged: dict[str, asyncio.Event] = {}
        # Counters for metrics and tests.
        self.dispatched = 0
        self.redispatched = 0
        self.accepted = 0
        self.superseded = 0

    @classmethod
    def from_settings(cls, s: Settings) -> Dispatcher:
        return cls(
            max_attempts=s.max_attempts,
            unplaced_timeout=s.unplaced_timeout_s,
            heartbeat_timeout=s.heartbeat_timeout_s,
            cancel_ack_timeout=s.cancel_ack_timeout_s,
        )

    # -- sessions ---------------------------------------------------------------

    def open_session(
        self,
        worker_id: str,
        agents: Iterable[str],
        max_in_flight: int,
        labels: dict[str, str] | None = None,
        sdk: str = "",
        *,
        remote: bool = False,
    ) -> WorkerSession:
        agents = list(agents)
        if not worker_id:
            raise InvalidArgument("must not be empty", field="hello.worker_id")
        if not agents:
            raise InvalidArgument("must name at least one agent or glob", field="hello.agents")
        check_hello_sizes(worker_id, agents, labels or {}, sdk)
        for i, agent in enumerate(agents):
            if not agent or any(c.isspace() for c in agent):
                raise InvalidArgument(
                    f"'{shown(agent)}' is not an agent name or glob", field=f"hello.agents[{i}]"
                )
        if not self.accepting:
            raise Unavailable("the sidecar is draining and takes no new workers")
        session = WorkerSession(
            next(self._session_ids),
            worker_id,
            agents,
            max_in_flight or DEFAULT_MAX_IN_FLIGHT,
            dict(labels or {}),
            sdk,
        )
        session.remote = remote
        self.sessions[session.session_id] = session
        self._serving.clear()
        self._pump(session)
        log.info(
            "worker %s connected as %s serving %s (max_in_flight=%d)",
            worker_id, session.session_id, agents, session.max_in_flight,
            extra=ids(worker_id=worker_id, session_id=session.session_id),
        )
        return session

    def update_session(self, session: WorkerSession, agents: list[str], max_in_flight: int) -> None:
        """A peer replica's session whose workers changed: what it serves and holds."""
        if agents != session.agents:
            session.set_agents(agents)
            self._serving.clear()
        grew = max_in_flight > session.max_in_flight
        session.max_in_flight = max_in_flight
        if grew:
            self._pump(session)

    def close_session(self, session: WorkerSession, reason: str) -> None:
        """Ends a session; what it held goes to other workers (or fails after
        `max_attempts`)."""
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        session.wakeup.set()
        self.sessions.pop(session.session_id, None)
        self._serving.clear()
        held = list(session.in_flight.values())
        session.in_flight.clear()
        if held:
            log.warning(
                "worker %s (%s) lost with %d assignment(s): %s",
                session.worker_id, session.session_id, len(held), reason,
                extra=ids(worker_id=session.worker_id, session_id=session.session_id),
            )
        for a in held:
            a.session = None
            if a.state is State.CANCELLING:
                self._retire(a, Ending.CANCELLED)
                continue
            where = ids(run_id=a.run_id, assignment_id=a.assignment_id, worker_id=session.worker_id)
            if a.attempt >= self.max_attempts:
                log.warning(
                    "run %s: assignment %s (%s) failed: its worker was lost on attempt %d of %d",
                    a.run_id, a.assignment_id, a.spec.name, a.attempt, self.max_attempts, extra=where,
                )
                self._retire(a, Ending.LOST)
                self._resolve(a, lost_output(a.spec.name, session.worker_id, reason, a.attempt, self.max_attempts))
                continue
            log.info(
                "run %s: assignment %s (%s) re-dispatched as attempt %d",
                a.run_id, a.assignment_id, a.spec.name, a.attempt + 1, extra=where,
            )
            a.attempt += 1
            a.state = State.QUEUED
            self.redispatched += 1
            if a.observer is not None:
                a.observer.on_redispatched(a, reason, session.worker_id)
            self._place(a, front=True)

    def check_heartbeats(self) -> list[WorkerSession]:
        """Closes sessions silent for longer than the heartbeat timeout."""
        limit = time.monotonic() - self.heartbeat_timeout
        lapsed = [s for s in self.sessions.values() if s.last_seen < limit]
        for s in lapsed:
            self.close_session(s, f"no frame for over {self.heartbeat_timeout:g}s (heartbeat lapsed)")
        return lapsed

    def drain(self, reason: str, grace_ms: int) -> None:
        """Stops placing work; tells every worker to finish what it holds."""
        self.accepting = False
        for s in self.sessions.values():
            s.drain_notice = (reason, grace_ms)
            s.wakeup.set()

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.sessions.values())

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._pending.values())

    # -- assignments --------------------------------------------------------------

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
        """Runs `spec` on `task` on some worker and returns its output.
        `assignment_id`: a stable id (a run's step keeps its id across a restart);
        one is made when empty. `trace_context`: the step's trace context,
        handed to the worker with every attempt.

        Never raises for worker trouble: lost workers, timeouts and refusals
        come back as an output with `error` set. Cancelling the caller cancels
        the assignment on its worker."""
        loop = asyncio.get_running_loop()
        a = Assignment(
            assignment_id or next(self._ids), agent or spec.name, spec, task, run_id, thread_id, observer,
            loop.create_future(), trace_context,
        )
        self._active[a.assignment_id] = a
        if run_id:
            self._finished_by_run.setdefault(run_id, [])
        if observer is not None:
            observer.on_assigned(a)
        if timeout is not None and timeout > 0:
            timeout = min(timeout, MAX_DEADLINE_S)  # inf or absurd values: no OverflowError
            a.deadline_ms = now_ms() + int(timeout * 1000)
            a.timer = loop.call_later(timeout, self._expire, a, timeout)
        self._place(a)
        try:
            return await a.future
        except asyncio.CancelledError:
            # The reason the client gave (CancelRun, a Session's cancel, an
            # interrupting run) reaches the worker in AssignmentCancel.reason.
            reason = observer.cancel_reason if observer is not None else ""
            self.cancel(a, reason or "run cancelled")
            raise
        finally:
            if a.timer is not None:
                a.timer.cancel()
                a.timer = None
            if a.unplaced_timer is not None:
                a.unplaced_timer.cancel()
                a.unplaced_timer = None

    def awaiting_acknowledgement(self, run_id: str) -> int:
        """Cancelled assignments of a run whose workers have not answered yet."""
        return len(self._cancelling.get(run_id, ()))

    async def wait_acknowledged(self, run_id: str, timeout: float) -> bool:
        """Waits until every worker has answered the cancels of `run_id`'s
        assignments (or lost its lease); False if `timeout` passed first."""
        if run_id not in self._cancelling:
            return True
        done = self._acknowledged.setdefault(run_id, asyncio.Event())
        try:
            await asyncio.wait_for(done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def running(self, session: WorkerSession, assignment_id: str) -> Assignment | None:
        """The assignment if `session` holds it now and it is still running."""
        a = self._active.get(assignment_id)
        if a is None or a.session is not session or a.state is not State.RUNNING:
            return None
        return a

    def active(self, assignment_id: str) -> Assignment | None:
        """The assignment while it is queued, running or being cancelled."""
        return self._active.get(assignment_id)

    def finished(self, assignment_id: str) -> Finished | None:
        """What is remembered of a finished assignment, if it still is."""
        done = self._finished_active.get(assignment_id)
        return done if done is not None else self._finished.get(assignment_id)

    @property
    def remembered(self) -> int:
        """Finished assignment ids remembered (for tests and metrics)."""
        return len(self._finished_active) + len(self._finished)

    def run_ended(self, run_id: str) -> None:
        """Forgets the finished assignments of an ended run but its latest ones
        (a late result right after the end still gets a clear answer)."""
        ids = self._finished_by_run.pop(run_id, None)
        if not ids:
            return
        for assignment_id in ids[:-FINISHED_MEMORY]:
            self._finished_active.pop(assignment_id, None)
        for assignment_id in ids[-FINISHED_MEMORY:]:
            done = self._finished_active.pop(assignment_id, None)
            if done is not None:
                self._remember(assignment_id, done)

    def complete(
        self, session: WorkerSession, assignment_id: str, attempt: int, output: AgentOutput
    ) -> Verdict:
        """Takes a worker's result. Anything but ACCEPTED and CANCEL_ACKNOWLEDGED
        changes nothing; the caller tells the worker why (see `active`, `finished`)."""
        a = self._active.get(assignment_id)
        if a is not None:
            current = a.attempt
        else:
            done = self.finished(assignment_id)
            if done is None:
                return Verdict.UNKNOWN
            current = done.attempt
        if attempt < current:
            self.superseded += 1
            return Verdict.SUPERSEDED
        if attempt > current:
            return Verdict.WRONG_ATTEMPT
        if a is None:
            return Verdict.FINISHED
        if a.session is not session:
            return Verdict.NOT_HELD
        del session.in_flight[assignment_id]
        a.session = None
        if a.state is State.CANCELLING:
            self._retire(a, Ending.CANCELLED)
            self._pump(session)
            return Verdict.CANCEL_ACKNOWLEDGED
        self._retire(a, Ending.ACCEPTED)
        if not output.name:
            output.name = a.spec.name
        self._resolve(a, output)
        session.completed += 1
        self.accepted += 1
        if self._pending:
            self._pump(session)
        return Verdict.ACCEPTED

    def cancel(self, a: Assignment, reason: str) -> None:
        """Stops an assignment wherever it is; its output says cancelled."""
        if a.state is State.QUEUED:
            self._retire(a, Ending.CANCELLED)  # left in its pending queue; _pump skips retired ones
        elif a.state is State.RUNNING and a.session is not None:
            a.state = State.CANCELLING
            self._cancelling.setdefault(a.run_id, set()).add(a)
            session = a.session
            session.outbox_cancels.append((a.assignment_id, reason))
            session.wakeup.set()
            a.ack_timer = asyncio.get_running_loop().call_later(
                self.cancel_ack_timeout, self._ack_expired, a
            )
        self._resolve(a, cancelled_output(a.spec.name, reason))

    # -- placement ---------------------------------------------------------------

    def _serving_sessions(self, agent: str) -> list[WorkerSession]:
        found = self._serving.get(agent)
        if found is None:
            found = [s for s in self.sessions.values() if s.serves(agent)]
            self._serving[agent] = found
        return found

    def _place(self, a: Assignment, *, front: bool = False) -> None:
        best: WorkerSession | None = None
        best_load = 2.0
        serving = self._serving_sessions(a.agent)
        for s in serving:
            if s.drain_notice is not None or len(s.in_flight) >= s.max_in_flight:
                continue
            load = len(s.in_flight) / s.max_in_flight + s.remote  # local workers first
            if load < best_load:
                best, best_load = s, load
        if best is not None:
            self._send(best, a)
            return
        queue = self._pending.get(a.agent)
        if queue is None:
            queue = self._pending[a.agent] = deque()
        if front:
            queue.appendleft(a)
        else:
            queue.append(a)
        if not serving and a.unplaced_timer is None:
            notice = self.unplaced_notice(a.agent)
            log.info("run %s: assignment %s: %s", a.run_id, a.assignment_id, notice,
                     extra=ids(run_id=a.run_id, assignment_id=a.assignment_id))
            if a.observer is not None:
                a.observer.on_unplaced(a, notice)
            if self.unplaced_timeout > 0:
                a.unplaced_timer = asyncio.get_running_loop().call_later(
                    self.unplaced_timeout, self._unplaced_expired, a
                )

    def unplaced_notice(self, agent: str) -> str:
        """What a run is told at once when no connected worker serves `agent`."""
        if self.unplaced_timeout > 0:
            wait = f"the agent fails if none that serves it connects within {self.unplaced_timeout:g}s"
            wait += " (unplaced_timeout_s)"
        else:
            wait = "the agent waits until one that serves it connects"
        served = sorted({name for s in self.sessions.values() for name in s.agents})
        if not served:
            return f"no connected worker serves agent '{agent}' (no worker is connected); {wait}"
        listed = ", ".join(f"'{name}'" for name in served[:NOTICE_AGENTS])
        if len(served) > NOTICE_AGENTS:
            listed += f" and {len(served) - NOTICE_AGENTS:,} more"
        return f"no connected worker serves agent '{agent}' (connected workers serve {listed}); {wait}"

    def _send(self, session: WorkerSession, a: Assignment) -> None:
        a.state = State.RUNNING
        a.session = session
        session.in_flight[a.assignment_id] = a
        session.outbox_assignments.append(a)
        session.wakeup.set()
        self.dispatched += 1
        if a.observer is not None:
            a.observer.on_placed(a, session.worker_id)

    def _pump(self, session: WorkerSession) -> None:
        """Fills `session`'s free slots from the pending queues it serves."""
        if session.drain_notice is not None or session.closed:
            return
        for agent in list(self._pending):
            if session.free_slots <= 0:
                return
            if not session.serves(agent):
                continue
            queue = self._pending[agent]
            while queue and session.free_slots > 0:
                a = queue.popleft()
                if a.state is State.QUEUED:
                    if a.unplaced_timer is not None:
                        a.unplaced_timer.cancel()
                        a.unplaced_timer = None
                    self._send(session, a)
            if not queue:
                del self._pending[agent]

    # -- endings -------------------------------------------------------------------

    def _retire(self, a: Assignment, ending: Ending) -> None:
        if a.state is State.CANCELLING:
            waiting = self._cancelling.get(a.run_id)
            if waiting is not None:
                waiting.discard(a)
                if not waiting:
                    del self._cancelling[a.run_id]
                    done = self._acknowledged.pop(a.run_id, None)
                    if done is not None:
                        done.set()
        a.state = State.DONE
        if a.ack_timer is not None and a.session is None:
            a.ack_timer.cancel()
            a.ack_timer = None
        if self._active.pop(a.assignment_id, None) is not None:
            finished = Finished(a.attempt, ending)
            by_run = self._finished_by_run.get(a.run_id) if a.run_id else None
            if by_run is not None:
                by_run.append(a.assignment_id)
                self._finished_active[a.assignment_id] = finished
            else:
                self._remember(a.assignment_id, finished)

    def _remember(self, assignment_id: str, done: Finished) -> None:
        self._finished[assignment_id] = done
        if len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    @staticmethod
    def _resolve(a: Assignment, output: AgentOutput) -> None:
        if not a.future.done():
            a.future.set_result(output)

    def _expire(self, a: Assignment, seconds: float) -> None:
        a.timer = None
        if a.state in (State.QUEUED, State.RUNNING):
            log.warning(
                "run %s: assignment %s (%s) timed out after %gs",
                a.run_id, a.assignment_id, a.spec.name, seconds,
                extra=ids(run_id=a.run_id, assignment_id=a.assignment_id),
            )
            self._resolve(a, timed_out_output(a.spec.name, seconds))
            self.cancel(a, f"timed out after {seconds:g}s")

    def _unplaced_expired(self, a: Assignment) -> None:
        a.unplaced_timer = None
        if a.state is State.QUEUED and not self._serving_sessions(a.agent):
            log.warning(
                "run %s: assignment %s failed: no connected worker serves agent '%s' (waited %gs)",
                a.run_id, a.assignment_id, a.agent, self.unplaced_timeout,
                extra=ids(run_id=a.run_id, assignment_id=a.assignment_id),
            )
            self._retire(a, Ending.UNPLACED)
            self._resolve(
                a,
                AgentOutput(
                    name=a.spec.name,
                    error=(
                        f"no connected worker serves agent '{a.agent}' "
                        f"(waited {self.unplaced_timeout:g}s)"
                    ),
                ),
            )

    def _ack_expired(self, a: Assignment) -> None:
        """A cancelled assignment whose worker never answered frees its slot."""
        a.ack_timer = None
        session = a.session
        if a.state is State.CANCELLING and session is not None:
            log.warning(
                "run %s: worker %s never acknowledged the cancel of assignment %s; its slot is freed",
                a.run_id, session.worker_id, a.assignment_id,
                extra=ids(run_id=a.run_id, assignment_id=a.assignment_id, worker_id=session.worker_id),
            )
            session.in_flight.pop(a.assignment_id, None)
            a.session = None
            self._retire(a, Ending.UNANSWERED)
            self._pump(session)
