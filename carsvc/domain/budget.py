"""Coordination budget: the compiled (lock-free) twin when available, else pure Python.

Both implementations are importable by name: ``PyCoordinationBudget`` always,
``CCoordinationBudget`` when the extension is compiled. ``USING_EXTENSIONS``
says which one ``CoordinationBudget`` is. The limits, snapshot and error types
are re-exported from :mod:`carsvc.domain.budget_types`. See docs/hot-paths.md.
"""

from __future__ import annotations

import logging
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
