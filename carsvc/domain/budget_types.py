"""Budget limits, snapshots and denials shared by both budget implementations."""

from __future__ import annotations

import math
from dataclasses import dataclass

MICROS_PER_USD = 1_000_000
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def usd_to_micros(cost_usd: float) -> int:
    """Cost in integer micro-dollars (the unit the counters keep)."""
    return round(cost_usd * MICROS_PER_USD)


def checked_tokens(name: str, value: int) -> int:
    """A self-reported token count: TypeError for a wrong type, ValueError for
    any bad value (a caller handling untrusted spend needs one except clause)."""
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if value > INT64_MAX or value < INT64_MIN:
        raise ValueError(f"{name} is out of range: {value}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def checked_cost_micros(cost_usd: float) -> int:
    """A self-reported cost in micro-dollars (TypeError / ValueError as checked_tokens)."""
    if isinstance(cost_usd, float):
        cost = cost_usd
    elif isinstance(cost_usd, int):
        try:
            cost = float(cost_usd)
        except OverflowError:
            raise ValueError(f"cost_usd is too large: {cost_usd!r}") from None
    else:
        raise TypeError(f"cost_usd must be float, not {type(cost_usd).__name__}")
    if not math.isfinite(cost):
        raise ValueError(f"cost_usd must be finite, got {cost_usd!r}")
    if cost < 0:
        raise ValueError(f"cost_usd must be >= 0, got {cost_usd!r}")
    micros = usd_to_micros(cost)
    if micros > INT64_MAX:
        raise ValueError(f"cost_usd is too large: {cost_usd!r}")
    return micros



@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """Every limit is optional; None is unbounded. A spend limit is reached when
    the running total is >= the limit."""

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_total_tokens: int | None = None
    max_cost_usd: float | None = None
    max_agents: int | None = None

    def is_unbounded(self) -> bool:
        return (
            self.max_input_tokens is None
            and self.max_output_tokens is None
            and self.max_total_tokens is None
            and self.max_cost_usd is None
            and self.max_agents is None
        )


UNBOUNDED = BudgetLimits()


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float
    agents_started: int
    limits: BudgetLimits
    # True once a spend limit is reached; max_agents alone never sets it.
    exhausted: bool
    agents_denied: int = 0
    budget_id: str = ""


class BudgetError(Exception):
    """The budget refused to start an agent."""


class BudgetExhausted(BudgetError):
    """A token or cost limit was reached before this agent could start."""

    def __init__(self, reason: str, snapshot: BudgetSnapshot) -> None:
        super().__init__(reason)
        self.reason = reason
        self.snapshot = snapshot


class AgentLimitReached(BudgetError):
    """Starting another agent would exceed max_agents."""

    def __init__(self, max_agents: int, started: int) -> None:
        super().__init__(f"max_agents reached: {started} of {max_agents} agents already started")
        self.max_agents = max_agents
        self.started = started
