"""The backend interface: what a run depends on that a store outside the
process could hold (docs/architecture.md, "Backends").

The domain declares these protocols and calls only them; `carsvc.backends`
implements them (the in-memory backend with its SQLite journal is the default)
and the server hands one `Backend` to the RunManager. Nothing here imports a
backend.

Shaped for a networked store:

* writes a run makes as it goes (records, steps, events, state transitions,
  thread hand-overs) are fire-and-forget and ordered: the store batches them
  and commits them in the background; `barrier()` and `settle()` say when they
  are durable, so acknowledging waits for one commit, not one per write;
* what must be decided by the store itself (taking a thread, a shared budget's
  admission) is async, and batched where a pattern asks many times at once
  (`Budget.begin_agents`).

What lives with the run, not in the store: its event log's buffer and
watchers, its decisions, its mailboxes and its agents' state overlays are
objects of the replica that runs it (the run's owner). The store keeps what is
needed to rebuild them (events, steps, requests, state) and the replica that
resumes a run rebuilds them from `RunStore.load()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import events_pb2, runs_pb2, types_pb2
from carsvc.domain.budget_types import BudgetError, BudgetLimits, BudgetSnapshot


@dataclass
class Recovered:
    """What a run store held when the sidecar started."""

    # scope -> key -> (value, writer); deleted keys are absent.
    state: dict[str, dict[str, tuple[struct_pb2.Value, str]]] = field(default_factory=dict)
    # Run records in start order, with their events.
    runs: list[runs_pb2.Run] = field(default_factory=list)
    events: dict[str, list[events_pb2.RunEvent]] = field(default_factory=dict)
    # run_id -> seqs of events that could not be read back (the run's history is incomplete).
    skipped_events: dict[str, list[int]] = field(default_factory=dict)
    # Runs that may resume: run_id -> the StartRunRequest they were started with,
    # and the outputs their finished steps journaled (run_id -> step key -> output).
    requests: dict[str, bytes] = field(default_factory=dict)
    steps: dict[str, dict[str, types_pb2.AgentOutput]] = field(default_factory=dict)
    # Rows that could not be read back at all, by table.
    skipped_rows: dict[str, int] = field(default_factory=dict)
    # Run ordinals kept by the store (a shared store orders every replica's runs).
    ordinals: dict[str, int] = field(default_factory=dict)
    # Steps a shared budget admitted before the restart (run_id -> step keys).
    admitted: dict[str, set[str]] = field(default_factory=dict)


class RunStore(Protocol):
    """Durable run records, their step journal, event logs and state.

    Every write is queued and returns at once; writes are committed in the
    order they were queued. A record, step or event acknowledged after
    `settle()` (or `barrier()`) resolved survives a crash of the process."""

    def load(self) -> Recovered:
        """Everything held, read back before `start()`. A record that does not
        decode is skipped (and counted in `skipped_rows`), never fatal."""
        ...

    def start(self) -> None: ...

    def close(self) -> None:
        """Commits what is queued and stops (blocking: call it off the loop)."""
        ...

    def run(self, ordinal: int, record: runs_pb2.Run) -> None:
        """A run's record as it is now (replaces the previous one)."""
        ...

    def request(self, run_id: str, request: bytes) -> None:
        """The StartRunRequest a resumable run was started with."""
        ...

    def step(self, run_id: str, step: str, output: types_pb2.AgentOutput) -> None:
        """An accepted agent output under its step key (replayed on resume)."""
        ...

    def event(self, run_id: str, seq: int, data: bytes) -> None:
        """A run event, serialized once for watchers and store alike."""
        ...

    def state(self, scope: str, key: str, value: object, writer: str, time_ms: int) -> None:
        """A state transition (value None: the key was deleted)."""
        ...

    def run_ended(self, run_id: str) -> None:
        """The run will not resume: its request and steps may go."""
        ...

    def forget(self, run_id: str) -> None:
        """The run left retention: its record and events may go."""
        ...

    def barrier(self) -> asyncio.Future[None]:
        """Resolved once every write queued before the call is committed."""
        ...

    def settle(self) -> asyncio.Future[None] | None:
        """What a producer awaits before acknowledging: a barrier when the
        store promises commit-before-acknowledge (or lags), else None."""
        ...


class Budget(Protocol):
    """What a run's agents spend through: the run's own budget, or a shared
    one several runs draw on."""

    @property
    def budget_id(self) -> str: ...

    @property
    def limits(self) -> BudgetLimits: ...

    def snapshot(self) -> BudgetSnapshot:
        """The counters as this replica last saw them (exact for a budget only
        this replica spends)."""
        ...

    async def begin_agents(
        self, count: int, *, run_id: str = "", steps: Sequence[str] = ()
    ) -> list[BudgetError | None]:
        """Reserves a slot for each of `count` agents, in order, as one step:
        None for an admitted agent, else why it was refused. `steps` (one per
        agent) are the agents' step keys in run `run_id`: a store that outlives
        the process keeps the admitted ones, so a resumed run is not counted twice."""
        ...

    async def record(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        """Adds one agent's self-reported spend (ValueError for a bad value)."""
        ...


class BudgetStore(Protocol):
    """Shared budgets by id (BudgetService, StartRunRequest.budget_id)."""

    async def create(self, limits: BudgetLimits, budget_id: str) -> Budget:
        """AlreadyExists when the id is taken."""
        ...

    async def get(self, budget_id: str) -> Budget:
        """NotFound when there is no such budget."""
        ...


class ThreadLocks(Protocol):
    """One active run per thread. A thread is held by one run id at a time."""

    async def acquire(self, thread_id: str, run_id: str) -> str:
        """Takes the thread for `run_id` if it is free; returns the run that
        holds it now (`run_id` itself when taken)."""
        ...

    def hand_over(self, thread_id: str, holder: str, successor: str) -> None:
        """Passes the thread from `holder` to `successor` (its next queued run)."""
        ...

    def release(self, thread_id: str, holder: str) -> None:
        """Frees the thread if `holder` still holds it."""
        ...


@dataclass(frozen=True)
class Change:
    """Something another replica changed that every replica keeps a copy of:
    kind "state" (name: the scope, key, writer, data: a serialized Value, None
    when deleted), "agent" (name, data: a serialized AgentSpec, None when
    unregistered), or "resync" (changes may have been missed: read everything)."""

    kind: str
    name: str = ""
    key: str = ""
    writer: str = ""
    data: bytes | None = None


class ChangeFeed(Protocol):
    def agent_changed(self, name: str, spec: types_pb2.AgentSpec | None) -> None:
        """Stores a registered (None: unregistered) agent and tells the others."""
        ...

    async def agents(self) -> list[types_pb2.AgentSpec]: ...

    async def state(self) -> dict[str, dict[str, tuple[struct_pb2.Value, str]]]:
        """Every state scope as the shared store holds it."""
        ...

    def changes(self) -> AsyncIterator[Change]: ...


@dataclass(frozen=True)
class Peer:
    """Another replica, as the cluster directory says: what its workers serve."""

    replica_id: str
    agents: tuple[str, ...]
    capacity: int


class ClusterBus(Protocol):
    """How replicas sharing one backend reach each other (the assignment queue
    between them): each has an inbox, and a directory entry saying which
    agents its workers serve, which lapses unless renewed."""

    @property
    def replica_id(self) -> str: ...

    def post(self, replica_id: str, kind: str, data: bytes) -> None:
        """Queues a message for another replica (sent with the store's next batch)."""
        ...

    def receive(self) -> AsyncIterator[tuple[str, str, bytes]]:
        """This replica's messages as (sender, kind, data), in order, forever."""
        ...

    async def advertise(self, agents: list[str], capacity: int, ttl_ms: int) -> None: ...

    async def peers(self) -> list[Peer]:
        """The other replicas whose directory entry has not lapsed."""
        ...

    async def leave(self) -> None: ...


class RunDirectory(Protocol):
    """Runs across replicas: each active run is run by one replica, which holds
    a lease on it and renews it; when a lease lapses another replica claims the
    run and resumes it. Any replica reads any run's record and events."""

    @property
    def replica_id(self) -> str: ...

    async def renew(self, run_ids: list[str], lease_ms: int) -> list[str]:
        """Renews this replica's leases; returns the runs another replica holds now."""
        ...

    async def claimable(self) -> list[tuple[str, bool]]:
        """Active runs whose lease lapsed, or is this replica's (from before a
        restart): (run id, whether the lease is this replica's own)."""
        ...

    async def claim(self, run_id: str, lease_ms: int) -> bool: ...

    async def release(self, run_ids: list[str]) -> None:
        """Lets go of leases (a stopping replica's parked runs: another takes them at once)."""
        ...

    async def load(self, run_id: str) -> Recovered:
        """One run as the store holds it, to resume it here."""
        ...

    async def owner(self, run_id: str) -> str:
        """The replica running the run ('' when none holds it)."""
        ...

    async def record(self, run_id: str) -> runs_pb2.Run | None: ...

    async def thread_run(self, thread_id: str) -> str:
        """The run holding the thread ('' when it is free)."""
        ...

    async def newest(self, before: int, count: int) -> list[tuple[int, runs_pb2.Run]]:
        """Up to `count` runs with an ordinal below `before` (0: any), newest first."""
        ...

    def events(self, run_id: str, after_seq: int, *, follow: bool) -> AsyncIterator[list[events_pb2.RunEvent]]:
        """The run's events after `after_seq` in batches (with `follow`, until it ends)."""
        ...

    async def next_ordinal(self) -> int:
        """A run ordinal no replica has used (ListRuns' order and page tokens)."""
        ...

    async def trim(self, keep: int) -> int:
        """Drops the oldest ended runs beyond the newest `keep`, whichever
        replica ran them (finished_run_retention across the cluster)."""
        ...


class Backend(Protocol):
    """Everything a sidecar keeps outside its runs' own objects."""

    @property
    def name(self) -> str:
        """'memory' or 'redis' (logs, metrics)."""
        ...

    @property
    def store(self) -> RunStore | None:
        """None: nothing is durable (no --data-dir); runs end with the process."""
        ...

    @property
    def budgets(self) -> BudgetStore: ...

    @property
    def threads(self) -> ThreadLocks: ...

    @property
    def bus(self) -> ClusterBus | None:
        """None: this is the only replica."""
        ...

    @property
    def directory(self) -> RunDirectory | None:
        """None: every run is this replica's."""
        ...

    @property
    def changes(self) -> ChangeFeed | None:
        """None: nobody else changes this replica's state or registry."""
        ...

    def describe(self) -> str:
        """Where it keeps things, for logs (no secrets)."""
        ...

    async def close(self) -> None:
        """Lets go of connections (after the store is closed)."""
        ...
