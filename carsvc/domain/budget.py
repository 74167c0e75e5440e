"""Coordination budget: the compiled (lock-free) twin when available, else pure Python.

Both implementations are importable by name: ``PyCoordinationBudget`` always,
``CCoordinationBudget`` when the extension is compiled. ``USING_EXTENSIONS``
says which one ``CoordinationBudget`` is. The limits, snapshot and error types
are re-exported from :mod:`carsvc.domain.budget_types`. See docs/hot-paths.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from carsvc._compat import USE_EXTENSIONS
from carsvc.domain._budget_py import CoordinationBudget as PyCoordinationBudget
from carsvc.domain.budget_types import (
    UNBOUNDED,
    AgentLimitReached,
    BudgetError,
    BudgetExhausted,
    BudgetLimits,
    BudgetSnapshot,
    usd_to_micros,
)

__all__ = [
    "UNBOUNDED",
    "USING_EXTENSIONS",
    "AgentLimitReached",
    "BudgetError",
    "BudgetExhausted",
    "BudgetLimits",
    "BudgetSnapshot",
    "CoordinationBudget",
    "LocalBudget",
    "PyCoordinationBudget",
    "usd_to_micros",
]

USING_EXTENSIONS: bool

if TYPE_CHECKING or not USE_EXTENSIONS:
    from carsvc.domain._budget_py import CoordinationBudget

    USING_EXTENSIONS = False
else:
    try:
        from carsvc.domain._budget import CoordinationBudget
    except ImportError as exc:
        logging.getLogger("carsvc").warning(
            "carsvc.domain._budget is not compiled (%s); using the pure-Python "
            "budget. Set CARSVC_NO_EXTENSIONS=1 to silence this.",
            exc,
        )
        from carsvc.domain._budget_py import CoordinationBudget

        USING_EXTENSIONS = False
    else:
        CCoordinationBudget = CoordinationBudget
        __all__ += ["CCoordinationBudget"]
        USING_EXTENSIONS = True

if TYPE_CHECKING:
    # Only for the type checker: both twins have the same API.
    CCoordinationBudget = PyCoordinationBudget


class LocalBudget:
    """A budget this process alone spends: the backend interface's `Budget`
    (carsvc.domain.backend) over a CoordinationBudget, the hot path. A run's own
    budget is always one; the in-memory backend's shared budgets are too."""

    __slots__ = ("counters",)

    def __init__(self, counters: CoordinationBudget) -> None:
        self.counters = counters

    @classmethod
    def of(cls, limits: BudgetLimits | None = None, budget_id: str = "") -> LocalBudget:
        return cls(CoordinationBudget(limits, budget_id))

    @property
    def budget_id(self) -> str:
        return self.counters.budget_id

    @property
    def limits(self) -> BudgetLimits:
        return self.counters.limits

    def snapshot(self) -> BudgetSnapshot:
        return self.counters.snapshot()

    async def begin_agents(
        self, count: int, *, run_id: str = "", steps: Sequence[str] = ()
    ) -> list[BudgetError | None]:
        verdicts: list[BudgetError | None] = []
        for _ in range(count):
            try:
                self.counters.begin_agent()
            except BudgetError as denied:
                verdicts.append(denied)
            else:
                verdicts.append(None)
        return verdicts

    async def record(self, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
        self.counters.record(input_tokens, output_tokens, cost_usd)
