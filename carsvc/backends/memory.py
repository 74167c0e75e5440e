"""The embedded backend: shared budgets and thread locks in this process, and
the SQLite journal as the run store when a data directory is given."""

from __future__ import annotations

from carsvc.backends.journal import Journal
from carsvc.domain.backend import Budget, RunStore
from carsvc.domain.budget import BudgetLimits, LocalBudget
from carsvc.domain.errors import AlreadyExists, NotFound


class MemoryBudgets:
    def __init__(self) -> None:
        self._budgets: dict[str, LocalBudget] = {}

    async def create(self, limits: BudgetLimits, budget_id: str) -> Budget:
        if budget_id in self._budgets:
            raise AlreadyExists(f"budget '{budget_id}' already exists", field="budget_id")
        budget = self._budgets[budget_id] = LocalBudget.of(limits, budget_id)
        return budget

    async def get(self, budget_id: str) -> Budget:
        budget = self._budgets.get(budget_id)
        if budget is None:
            raise NotFound(f"no budget '{budget_id}'", field="budget_id")
        return budget

    def __len__(self) -> int:
        return len(self._budgets)


class MemoryThreadLocks:
    def __init__(self) -> None:
        self._holders: dict[str, str] = {}

    async def acquire(self, thread_id: str, run_id: str) -> str:
        return self._holders.setdefault(thread_id, run_id)

    def hand_over(self, thread_id: str, holder: str, successor: str) -> None:
        if self._holders.get(thread_id) == holder:
            self._holders[thread_id] = successor

    def release(self, thread_id: str, holder: str) -> None:
        if self._holders.get(thread_id) == holder:
            del self._holders[thread_id]

    def __len__(self) -> int:
        return len(self._holders)


class MemoryBackend:
    """One process; durable only through `store` (the journal) when given."""

    name = "memory"

    def __init__(self, store: RunStore | None = None) -> None:
        self._store = store
        self._budgets = MemoryBudgets()
        self._threads = MemoryThreadLocks()

    @property
    def store(self) -> RunStore | None:
        return self._store

    @property
    def budgets(self) -> MemoryBudgets:
        return self._budgets

    @property
    def threads(self) -> MemoryThreadLocks:
        return self._threads

    @property
    def bus(self) -> None:
        return None

    @property
    def directory(self) -> None:
        return None

    @property
    def changes(self) -> None:
        return None

    def describe(self) -> str:
        store = self._store
        if isinstance(store, Journal):
            return f"journal {store.path} (sync {store.sync})"
        return "memory"

    async def close(self) -> None:
        """Nothing to close (the journal is closed as the store)."""
