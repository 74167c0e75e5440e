"""Every conversion between a domain type and its protobuf message, in one place.

Protobuf *data* messages (AgentSpec, AgentOutput, RunEvent, Value, results)
are the domain's own vocabulary and pass through unconverted; the domain types
below are plain Python and meet the wire only here. Wire envelopes (CallResult,
ConnectResponse, the RPC responses) are built in carsvc/services."""

from __future__ import annotations

import math

from google.protobuf import struct_pb2

from carsvc._proto.car.v1 import registry_pb2, state_pb2, types_pb2
from carsvc.domain.budget_types import BudgetLimits, BudgetSnapshot, usd_to_micros
from carsvc.domain.errors import InvalidArgument
from carsvc.domain.overlay import StateTransition
from carsvc.domain.workers import WorkerSession

# The budget keeps tokens and micro-dollars in int64 counters.
MAX_BUDGET_COUNT = 2**63 - 1


def limits_from_proto(msg: types_pb2.BudgetLimits, field: str = "budget") -> BudgetLimits:
    """BudgetLimits from its message; a bad cost is INVALID_ARGUMENT naming `field`."""
    cost: float | None = None
    if msg.HasField("max_cost_usd"):
        cost = msg.max_cost_usd
        if not math.isfinite(cost) or cost < 0:
            raise InvalidArgument(f"must be a finite, non-negative number, not {cost}", field=f"{field}.max_cost_usd")
        if usd_to_micros(cost) > MAX_BUDGET_COUNT:
            raise InvalidArgument(
                f"must be at most {MAX_BUDGET_COUNT // 1_000_000} (int64 micro-dollars), not {cost}",
                field=f"{field}.max_cost_usd",
            )
    for name in ("max_input_tokens", "max_output_tokens", "max_total_tokens"):
        if msg.HasField(name) and getattr(msg, name) > MAX_BUDGET_COUNT:
            raise InvalidArgument(f"must be at most 2**63-1, not {getattr(msg, name)}", field=f"{field}.{name}")
    return BudgetLimits(
        max_input_tokens=msg.max_input_tokens if msg.HasField("max_input_tokens") else None,
        max_output_tokens=msg.max_output_tokens if msg.HasField("max_output_tokens") else None,
        max_total_tokens=msg.max_total_tokens if msg.HasField("max_total_tokens") else None,
        max_cost_usd=cost,
        max_agents=msg.max_agents if msg.HasField("max_agents") else None,
    )


def snapshot_to_proto(snap: BudgetSnapshot) -> types_pb2.BudgetSnapshot:
    msg = types_pb2.BudgetSnapshot(
        input_tokens=snap.input_tokens,
        output_tokens=snap.output_tokens,
        total_tokens=snap.total_tokens,
        cost_usd=snap.cost_usd,
        agents_started=snap.agents_started,
        exhausted=snap.exhausted,
        budget_id=snap.budget_id,
        agents_denied=snap.agents_denied,
    )
    lim = snap.limits
    if lim.max_input_tokens is not None:
        msg.limits.max_input_tokens = lim.max_input_tokens
    if lim.max_output_tokens is not None:
        msg.limits.max_output_tokens = lim.max_output_tokens
    if lim.max_total_tokens is not None:
        msg.limits.max_total_tokens = lim.max_total_tokens
    if lim.max_cost_usd is not None:
        msg.limits.max_cost_usd = lim.max_cost_usd
    if lim.max_agents is not None:
        msg.limits.max_agents = lim.max_agents
    return msg


def transition_to_proto(t: StateTransition) -> state_pb2.StateTransition:
    msg = state_pb2.StateTransition(index=t.index, key=t.key, writer=t.writer, time_unix_ms=t.time_unix_ms)
    if isinstance(t.old, struct_pb2.Value):
        msg.old_value.CopyFrom(t.old)
    if isinstance(t.new, struct_pb2.Value):
        msg.new_value.CopyFrom(t.new)
    return msg


def worker_to_proto(session: WorkerSession) -> registry_pb2.WorkerInfo:
    """A connected worker session as ListWorkers shows it."""
    return registry_pb2.WorkerInfo(
        worker_id=session.worker_id,
        session_id=session.session_id,
        agents=session.agents,
        max_in_flight=session.max_in_flight,
        in_flight=len(session.in_flight),
        labels=session.labels,
        sdk=session.sdk,
        connected_unix_ms=session.connected_ms,
        last_seen_unix_ms=session.last_seen_ms,
        completed=session.completed,
        draining=session.draining,
    )
