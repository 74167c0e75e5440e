"""Pure-Python coordination budget: the reference implementation.

This module is the specification of the budget hot path. ``ext/_budget.pyx``
(compiled as ``carsvc.domain._budget``) keeps the same counters in C atomics
without a lock and must behave identically; the tests run on both and compare
them on random operation sequences. Import :class:`CoordinationBudget` from
:mod:`carsvc.domain.budget`, which picks the compiled twin unless
``CARSVC_NO_EXTENSIONS`` is set.

Semantics (DESIGN.md section 4, "Budget decisions"):

* spend is self-reported and only ever added (:meth:`CoordinationBudget.record`);
  cost is kept in integer micro-dollars;
* a spend limit is *reached* when the running total is ``>=`` the limit;
* :meth:`CoordinationBudget.begin_agent` is one atomic check-and-increment:
  spend limits first (:class:`BudgetExhausted`), then ``max_agents``
  (:class:`AgentLimitReached`); every denial counts in ``agents_denied``.
"""

from __future__ import annotations

import math
import threading
from typing import Final, final

from carsvc.domain.budget_types import (
    MICROS_PER_USD,
    UNBOUNDED,
    AgentLimitReached,
    BudgetExhausted,
    BudgetLimits,
    BudgetSnapshot,
    usd_to_micros,
)
from carsvc.domain.budget_types import (
    checked_cost_micros as _cost_micros,
)
from carsvc.domain.budget_types import (
    checked_tokens as _tokens,
)

__all__ = ["CoordinationBudget"]

# Counters are 64-bit signed integers in the compiled twin; both twins reject
# inputs that could not be represented there.
_INT64_MAX: Final = 2**63 - 1
_INT64_MIN: Final = -(2**63)
# "No limit": above every value a counter, or the sum of two counters, can
# take (they saturate at _INT64_MAX), so ``counter >= limit`` never fires.
_NO_LIMIT: Final = 2**64
# Costs below this convert to micro-dollars without overflowing an int64.
_FAST_COST_MAX: Final = 9e12


def _limit_int(name: str, value: object) -> int:
    if value is None:
        return _NO_LIMIT
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 0 or value > _INT64_MAX:
        raise ValueError(f"{name} must be between 0 and 2**63-1, got {value}")
    return value


def _limit_cost(value: object) -> int:
    if value is None:
        return _NO_LIMIT
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"max_cost_usd must be a float or None, not {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"max_cost_usd must be finite and >= 0, got {value!r}")
    micros = usd_to_micros(value)
    if micros > _INT64_MAX:
        raise ValueError(f"max_cost_usd is too large: {value!r}")
    return micros


def _micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


@final
class CoordinationBudget:
    """A shared ceiling on agents started and self-reported spend.

    Thread-safe: every method takes one ``threading.Lock`` (the compiled twin
    uses C atomics instead and is lock-free).
    """

    __slots__ = (
        "_budget_id",
        "_cost_micros",
        "_denied",
        "_has_spend_limit",
        "_input",
        "_limits",
        "_lock",
        "_max_agents",
        "_max_cost_micros",
        "_max_input",
        "_max_output",
        "_max_total",
        "_output",
        "_started",
    )

    def __init__(self, limits: BudgetLimits | None = None, budget_id: str = "") -> None:
        if limits is None:
            limits = UNBOUNDED
        elif not isinstance(limits, BudgetLimits):
            raise TypeError(f"limits must be BudgetLimits or None, not {type(limits).__name__}")
        if not isinstance(budget_id, str):
            raise TypeError(f"budget_id must be str, not {type(budget_id).__name__}")
        self._limits = limits
        self._budget_id = budget_id
        self._max_input = _limit_int("max_input_tokens", limits.max_input_tokens)
        self._max_output = _limit_int("max_output_tokens", limits.max_output_tokens)
        self._max_total = _limit_int("max_total_tokens", limits.max_total_tokens)
        self._max_cost_micros = _limit_cost(limits.max_cost_usd)
        self._max_agents = _limit_int("max_agents", limits.max_agents)
        self._has_spend_limit = (
            self._max_input != _NO_LIMIT
            or self._max_output != _NO_LIMIT
            or self._max_total != _NO_LIMIT
            or self._max_cost_micros != _NO_LIMIT
        )
        self._input = 0
        self._output = 0
        self._cost_micros = 0
        self._started = 0
        self._denied = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    # -- read-only configuration and counters ---------------------------------

    @property
    def limits(self) -> BudgetLimits:
        return self._limits

    @property
    def budget_id(self) -> str:
        return self._budget_id

    @property
    def agents_started(self) -> int:
        return self._started

    @property
    def agents_denied(self) -> int:
        return self._denied

    def is_unbounded(self) -> bool:
        return self._limits.is_unbounded()

    # -- the hot path ---------------------------------------------------------

    def begin_agent(self) -> None:
        """Reserve one agent slot, or raise why not.

        Raises :class:`BudgetExhausted` when a spend limit is reached, else
        :class:`AgentLimitReached` when ``max_agents`` agents already started.
        """
        with self._lock:
            if self._has_spend_limit:
                spent_in = self._input
                spent_out = self._output
                if (
                    spent_in >= self._max_input
                    or spent_out >= self._max_output
                    or spent_in + spent_out >= self._max_total
                    or self._cost_micros >= self._max_cost_micros
                ):
                    self._denied += 1
                    reason = self._spend_reason(spent_in, spent_out, self._cost_micros)
                    snapshot = self._snapshot(
                        spent_in, spent_out, self._cost_micros, self._started, self._denied
                    )
                    assert reason is not None  # one of the checks above matched
                    raise BudgetExhausted(reason, snapshot)
            started = self._started
            if started >= self._max_agents:
                self._denied += 1
                raise AgentLimitReached(self._max_agents, started)
            self._started = started + 1

    def record(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        """Add one agent's self-reported spend (cost in USD, kept as micro-dollars)."""
        # Fast paths for the common types; the helpers give the exact errors.
        if not (type(input_tokens) is int and 0 <= input_tokens <= _INT64_MAX):
            input_tokens = _tokens("input_tokens", input_tokens)
        if not (type(output_tokens) is int and 0 <= output_tokens <= _INT64_MAX):
            output_tokens = _tokens("output_tokens", output_tokens)
        if type(cost_usd) is float and 0.0 <= cost_usd <= _FAST_COST_MAX:
            micros = usd_to_micros(cost_usd)
        else:
            micros = _cost_micros(cost_usd)
        with self._lock:
            # Totals saturate at 2**63-1 (the compiled twin's int64 counters).
            total = self._input + input_tokens
            self._input = total if total <= _INT64_MAX else _INT64_MAX
            total = self._output + output_tokens
            self._output = total if total <= _INT64_MAX else _INT64_MAX
            total = self._cost_micros + micros
            self._cost_micros = total if total <= _INT64_MAX else _INT64_MAX

    def snapshot(self) -> BudgetSnapshot:
        with self._lock:
            return self._snapshot(
                self._input, self._output, self._cost_micros, self._started, self._denied
            )

    # -- helpers (pure functions of the values passed in) ---------------------

    def _spend_reason(self, input_tokens: int, output_tokens: int, cost_micros: int) -> str | None:
        """Why a spend limit is reached, or None. Checked in a fixed order."""
        if input_tokens >= self._max_input:
            return f"max_input_tokens reached: {input_tokens} of {self._max_input}"
        if output_tokens >= self._max_output:
            return f"max_output_tokens reached: {output_tokens} of {self._max_output}"
        total = min(input_tokens + output_tokens, _INT64_MAX)
        if total >= self._max_total:
            return f"max_total_tokens reached: {total} of {self._max_total}"
        if cost_micros >= self._max_cost_micros:
            return (
                f"max_cost_usd reached: {_micros_to_usd(cost_micros)} "
                f"of {_micros_to_usd(self._max_cost_micros)}"
            )
        return None

    def _snapshot(
        self, input_tokens: int, output_tokens: int, cost_micros: int, started: int, denied: int
    ) -> BudgetSnapshot:
        exhausted = self._has_spend_limit and (
            self._spend_reason(input_tokens, output_tokens, cost_micros) is not None
        )
        return BudgetSnapshot(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=min(input_tokens + output_tokens, _INT64_MAX),
            cost_usd=_micros_to_usd(cost_micros),
            agents_started=started,
            limits=self._limits,
            exhausted=exhausted,
            agents_denied=denied,
            budget_id=self._budget_id,
        )

    def __repr__(self) -> str:
        return (
            f"<CoordinationBudget id={self._budget_id!r} started={self._started} "
            f"denied={self._denied} unbounded={self.is_unbounded()}>"
        )
