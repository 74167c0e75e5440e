"""The tracing port: what runs, their agents and the agents' runtime calls tell
a tracer. The domain declares these hooks and calls them; carsvc/telemetry
implements them with OpenTelemetry, and the server installs that only when
tracing is on (docs/operations.md, "Traces").

Off, every hook is the shared no-op below: nothing is imported and nothing is
allocated, and a run, an agent step or a runtime call pays a method call that
returns at once.

Trace context travels as a *carrier*: W3C Trace Context keys (`traceparent`,
and `tracestate` when there is one) and their values, as in gRPC metadata and
in the worker contract's `Assignment.trace_context`."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, Protocol

from carsvc._proto.car.v1 import types_pb2

Carrier = Mapping[str, str]
EMPTY: Carrier = MappingProxyType({})

# The trace context a client sent with the call being served (its gRPC
# metadata), set by the telemetry's server interceptor: a run started by that
# call is its child.
incoming: ContextVar[Carrier] = ContextVar("carsvc_incoming_trace_context", default=EMPTY)


class CallSpan(Protocol):
    """A runtime call of a running agent (state, mailbox, delegate, spawn,
    advisor, a suspended tool call awaiting its decision)."""

    def agent(self, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int) -> AgentSpan:
        """The span of an agent this call runs (a delegate's specialist, a
        spawned sub-agent, the advisor): a child of the call."""
        ...

    def end(self, error: str = "", *, decision: types_pb2.ToolCallDecision | None = None) -> None: ...


class AgentSpan(Protocol):
    """One agent step of a run, from its assignment to its accepted output."""

    def carrier(self) -> Carrier:
        """The step's trace context for its worker (empty when not traced)."""
        ...

    def placed(self, worker_id: str, attempt: int) -> None: ...

    def redispatched(self, reason: str, previous_worker_id: str, attempt: int) -> None: ...

    def unplaced(self, notice: str) -> None: ...

    def call(self, op: str, arg: Any) -> CallSpan:
        """A runtime call `op` (the RuntimeCall's oneof name) with its argument message."""
        ...

    def end(self, output: types_pb2.AgentOutput) -> None: ...


class RunSpan(Protocol):
    """One run, from its start (or its resumption) to its end."""

    def agent(self, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int) -> AgentSpan: ...

    def skipped(self, name: str, reason: str) -> None:
        """The budget refused agent `name`: it never ran."""
        ...

    def end(self, status: str, reason: str, detail: str, budget: types_pb2.BudgetSnapshot | None) -> None: ...


class Tracer(Protocol):
    def run(
        self, *, run_id: str, thread_id: str, pattern: str, owner: str, parent: Carrier, resumed: bool = False
    ) -> RunSpan:
        """A run's span; `parent` is the trace context it was started under."""
        ...


class _Off:
    """Every hook of the port, doing nothing: what runs see when tracing is off."""

    __slots__ = ()

    def run(
        self, *, run_id: str, thread_id: str, pattern: str, owner: str, parent: Carrier, resumed: bool = False
    ) -> _Off:
        return self

    def agent(self, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int) -> _Off:
        return self

    def call(self, op: str, arg: Any) -> _Off:
        return self

    def carrier(self) -> Carrier:
        return EMPTY

    def placed(self, worker_id: str, attempt: int) -> None:
        pass

    def redispatched(self, reason: str, previous_worker_id: str, attempt: int) -> None:
        pass

    def unplaced(self, notice: str) -> None:
        pass

    def skipped(self, name: str, reason: str) -> None:
        pass

    def end(self, *args: Any, **kwargs: Any) -> None:
        pass


OFF = _Off()
NO_TRACER: Tracer = OFF
NO_RUN: RunSpan = OFF
NO_AGENT: AgentSpan = OFF
NO_CALL: CallSpan = OFF

# The runtime call being served in this task, if it is traced: agents a call
# runs (delegate, spawn_subtask, consult_advisor) are its children.
_calling: ContextVar[CallSpan | None] = ContextVar("carsvc_calling_span", default=None)


def serving(call: CallSpan) -> None:
    """Marks `call` as the runtime call the current task serves (services/calls.py
    runs each waiting call in a task of its own)."""
    if call is not OFF:
        _calling.set(call)


def parent_of(run: RunSpan) -> RunSpan | CallSpan:
    """What an agent started now is a child of: the runtime call this task
    serves, else its run."""
    if run is OFF:
        return run
    call = _calling.get()
    return run if call is None else call
