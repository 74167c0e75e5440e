"""Coordination budget: every test runs on the compiled and the pure-Python twin."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest

from carsvc.domain.budget_types import (
    UNBOUNDED,
    AgentLimitReached,
    BudgetError,
    BudgetExhausted,
    BudgetLimits,
    BudgetSnapshot,
)


def test_unbounded_by_default(budget_cls: Any) -> None:
    budget = budget_cls()
    assert budget.is_unbounded()
    assert budget.limits == UNBOUNDED
    assert budget.budget_id == ""
    for _ in range(1000):
        budget.begin_agent()
    budget.record(10**12, 10**12, 1e6)
    budget.begin_agent()
    assert budget.agents_started == 1001
    assert budget.agents_denied == 0
    assert budget.snapshot() == BudgetSnapshot(
        input_tokens=10**12,
        output_tokens=10**12,
        total_tokens=2 * 10**12,
        cost_usd=1e6,
        agents_started=1001,
        limits=UNBOUNDED,
        exhausted=False,
        agents_denied=0,
        budget_id="",
    )


def test_limits_and_id_are_kept(budget_cls: Any) -> None:
    limits = BudgetLimits(max_agents=3)
    budget = budget_cls(limits, budget_id="shared-1")
    assert budget.limits is limits
    assert budget.budget_id == "shared-1"
    assert not budget.is_unbounded()
    assert budget.snapshot().budget_id == "shared-1"


def test_max_agents_is_a_hard_cap(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_agents=2))
    budget.begin_agent()
    budget.begin_agent()
    for attempt in range(3):
        with pytest.raises(AgentLimitReached) as info:
            budget.begin_agent()
        assert (info.value.max_agents, info.value.started) == (2, 2)
        assert str(info.value) == "max_agents reached: 2 of 2 agents already started"
        assert isinstance(info.value, BudgetError)
        assert budget.agents_denied == attempt + 1
    snapshot = budget.snapshot()
    assert snapshot.agents_started == 2
    assert snapshot.agents_denied == 3
    # max_agents alone never marks the budget exhausted.
    assert snapshot.exhausted is False


def test_max_agents_zero_denies_everything(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_agents=0))
    with pytest.raises(AgentLimitReached) as info:
        budget.begin_agent()
    assert (info.value.max_agents, info.value.started) == (0, 0)
    assert budget.agents_started == 0


@pytest.mark.parametrize(
    ("limits", "spend", "reason"),
    [
        (BudgetLimits(max_input_tokens=100), (100, 0, 0.0), "max_input_tokens reached: 100 of 100"),
        (BudgetLimits(max_output_tokens=50), (0, 70, 0.0), "max_output_tokens reached: 70 of 50"),
        (
            BudgetLimits(max_total_tokens=1000),
            (700, 500, 0.0),
            "max_total_tokens reached: 1200 of 1000",
        ),
        (BudgetLimits(max_cost_usd=1.0), (0, 0, 1.0), "max_cost_usd reached: 1.0 of 1.0"),
        (BudgetLimits(max_cost_usd=0.25), (0, 0, 0.3), "max_cost_usd reached: 0.3 of 0.25"),
        (BudgetLimits(max_total_tokens=0), (0, 0, 0.0), "max_total_tokens reached: 0 of 0"),
    ],
)
def test_spend_limit_reached_at_greater_or_equal(
    budget_cls: Any, limits: BudgetLimits, spend: tuple[int, int, float], reason: str
) -> None:
    budget = budget_cls(limits, budget_id="b")
    budget.record(*spend)
    with pytest.raises(BudgetExhausted) as info:
        budget.begin_agent()
    assert info.value.reason == reason
    assert str(info.value) == reason
    snapshot = info.value.snapshot
    assert snapshot.exhausted is True
    assert (snapshot.input_tokens, snapshot.output_tokens) == spend[:2]
    assert snapshot.total_tokens == spend[0] + spend[1]
    assert snapshot.cost_usd == spend[2]
    assert snapshot.agents_started == 0
    assert snapshot.agents_denied == 1
    assert snapshot.budget_id == "b"
    assert snapshot.limits is limits
    assert budget.snapshot() == snapshot


def test_just_below_the_limit_admits(budget_cls: Any) -> None:
    budget = budget_cls(
        BudgetLimits(max_input_tokens=100, max_output_tokens=100, max_total_tokens=150,
                     max_cost_usd=1.0)
    )
    budget.record(99, 50, 0.999999)
    budget.begin_agent()
    assert budget.snapshot().exhausted is False
    budget.record(0, 0, 0.000001)  # exactly $1.00 in micro-dollars
    with pytest.raises(BudgetExhausted, match=r"max_cost_usd reached: 1\.0 of 1\.0"):
        budget.begin_agent()


def test_spend_checks_come_before_max_agents(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_agents=1, max_total_tokens=10))
    budget.begin_agent()
    budget.record(5, 5, 0.0)
    with pytest.raises(BudgetExhausted, match="max_total_tokens"):
        budget.begin_agent()


def test_spend_limits_are_checked_in_a_fixed_order(budget_cls: Any) -> None:
    budget = budget_cls(
        BudgetLimits(max_input_tokens=1, max_output_tokens=1, max_total_tokens=1, max_cost_usd=0.0)
    )
    budget.record(5, 5, 1.0)
    with pytest.raises(BudgetExhausted, match=r"^max_input_tokens"):
        budget.begin_agent()


def test_zero_cost_limit_is_reached_immediately(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_cost_usd=0.0))
    assert budget.snapshot().exhausted is True
    with pytest.raises(BudgetExhausted, match=r"max_cost_usd reached: 0\.0 of 0\.0"):
        budget.begin_agent()


def test_record_adds_and_keeps_cost_in_micro_dollars(budget_cls: Any) -> None:
    budget = budget_cls()
    for _ in range(10):
        budget.record(1, 2, 0.1)
    snapshot = budget.snapshot()
    assert (snapshot.input_tokens, snapshot.output_tokens, snapshot.total_tokens) == (10, 20, 30)
    # 10 x 0.1 in floats is 0.9999999999999999; in micro-dollars it is exact.
    assert snapshot.cost_usd == 1.0
    budget.record(0, 0, 0.0000004)  # rounds to 0 micro-dollars
    budget.record(0, 0, 0.0000006)  # rounds to 1
    assert budget.snapshot().cost_usd == 1.000001
    budget.record(True, False, 1)  # bool and int are accepted, like int() would
    assert budget.snapshot().input_tokens == 11


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((0, 0, -0.01), ValueError),
        ((0, 0, math.nan), ValueError),
        ((0, 0, math.inf), ValueError),
        ((0, 0, -math.inf), ValueError),
        ((0, 0, 1e300), ValueError),
        ((0, 0, 10**400), ValueError),
        ((0, 0, "1.0"), TypeError),
        ((0, 0, None), TypeError),
        ((-1, 0, 0.0), ValueError),
        ((0, -1, 0.0), ValueError),
        ((1.5, 0, 0.0), TypeError),
        ((0, "3", 0.0), TypeError),
        # Every bad value is a ValueError (one except clause for untrusted spend).
        ((2**63, 0, 0.0), ValueError),
        ((2**64 - 1, 0, 0.0), ValueError),  # the largest uint64 a worker can send
        ((-(2**64), 0, 0.0), ValueError),
    ],
)
def test_record_rejects_bad_input(
    budget_cls: Any, args: tuple[object, object, object], exc: type[Exception]
) -> None:
    budget = budget_cls()
    budget.record(1, 1, 0.5)
    with pytest.raises(exc):
        budget.record(*args)
    snapshot = budget.snapshot()
    assert (snapshot.input_tokens, snapshot.output_tokens, snapshot.cost_usd) == (1, 1, 0.5)


def test_negative_zero_cost_is_zero(budget_cls: Any) -> None:
    budget = budget_cls()
    budget.record(0, 0, -0.0)
    assert budget.snapshot().cost_usd == 0.0


@pytest.mark.parametrize(
    ("limits", "exc"),
    [
        (BudgetLimits(max_agents=-1), ValueError),
        (BudgetLimits(max_total_tokens=2**63), ValueError),
        (BudgetLimits(max_input_tokens=1.5), TypeError),  # type: ignore[arg-type]
        (BudgetLimits(max_output_tokens=True), TypeError),
        (BudgetLimits(max_cost_usd=-1.0), ValueError),
        (BudgetLimits(max_cost_usd=math.nan), ValueError),
        (BudgetLimits(max_cost_usd=1e300), ValueError),
        (BudgetLimits(max_cost_usd="1"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_limits_are_rejected(
    budget_cls: Any, limits: BudgetLimits, exc: type[Exception]
) -> None:
    with pytest.raises(exc):
        budget_cls(limits)


def test_bad_constructor_arguments(budget_cls: Any) -> None:
    with pytest.raises(TypeError, match="limits must be BudgetLimits"):
        budget_cls({"max_agents": 1})
    with pytest.raises(TypeError, match="budget_id must be str"):
        budget_cls(None, 7)


def test_integer_cost_limit(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_cost_usd=2))
    budget.record(0, 0, 2)
    with pytest.raises(BudgetExhausted, match=r"max_cost_usd reached: 2\.0 of 2\.0"):
        budget.begin_agent()


def test_counters_are_read_only(budget_cls: Any) -> None:
    budget = budget_cls()
    with pytest.raises(AttributeError):
        budget.agents_started = 5
    with pytest.raises(AttributeError):
        budget.limits = UNBOUNDED


def test_not_picklable(budget_cls: Any) -> None:
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(budget_cls())


def test_repr(budget_cls: Any) -> None:
    budget = budget_cls(BudgetLimits(max_agents=1), budget_id="x")
    budget.begin_agent()
    assert repr(budget) == "<CoordinationBudget id='x' started=1 denied=0 unbounded=False>"
