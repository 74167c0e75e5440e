"""Protobuf <-> domain conversions that more than one servicer needs."""

from __future__ import annotations

import math

from carsvc._proto.car.v1 import types_pb2
from carsvc.domain.budget_types import BudgetLimits
from carsvc.domain.errors import InvalidArgument


def limits_from_proto(msg: types_pb2.BudgetLimits, field: str = "budget") -> BudgetLimits:
    cost: float | None = None
    if msg.HasField("max_cost_usd"):
        cost = msg.max_cost_usd
        if not math.isfinite(cost) or cost < 0:
            raise InvalidArgument(f"must be a finite, non-negative number, not {cost}", field=f"{field}.max_cost_usd")
    return BudgetLimits(
        max_input_tokens=msg.max_input_tokens if msg.HasField("max_input_tokens") else None,
        max_output_tokens=msg.max_output_tokens if msg.HasField("max_output_tokens") else None,
        max_total_tokens=msg.max_total_tokens if msg.HasField("max_total_tokens") else None,
        max_cost_usd=cost,
        max_agents=msg.max_agents if msg.HasField("max_agents") else None,
    )
