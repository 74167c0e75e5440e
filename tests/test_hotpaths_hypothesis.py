"""Differential property tests: random operation sequences give identical
results on the compiled and the pure-Python twin of each hot path.

Every observable result is recorded (return values, exception types, the
order of dict snapshots, what listeners saw), with the wall-clock
``time_unix_ms`` of transitions left out.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from carsvc.domain.budget_types import BudgetLimits  # noqa: E402

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# -- overlay --------------------------------------------------------------------

MAX_DEPTH = 4
KEYS = st.sampled_from(["a", "b", "a/1", "a/2", "b/1", "c"])
PREFIXES = st.sampled_from(["", "a", "a/", "b/", "zz"])
VALUES = st.one_of(st.integers(-2, 2), st.sampled_from(["", "x", "y"]), st.booleans())
WRITERS = st.one_of(st.none(), st.sampled_from(["w1", "w2"]))
LAYER = st.integers(0, 15)

OVERLAY_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("overlay"), LAYER, st.sampled_from(["agent-x", "agent-y"])),
        st.tuples(st.just("set"), LAYER, KEYS, VALUES, WRITERS),
        st.tuples(st.just("set"), LAYER, KEYS, VALUES, WRITERS),  # writes are the point
        st.tuples(st.just("delete"), LAYER, KEYS, WRITERS),
        st.tuples(st.just("get"), LAYER, KEYS),
        st.tuples(st.just("contains"), LAYER, KEYS),
        st.tuples(st.just("writer_of"), LAYER, KEYS),
        st.tuples(st.just("keys"), LAYER, PREFIXES),
        st.tuples(st.just("snapshot"), LAYER),
        st.tuples(st.just("len"), LAYER),
        st.tuples(st.just("local_keys"), LAYER),
        st.tuples(st.just("merge"), LAYER),
        st.tuples(st.just("discard"), LAYER),
        st.tuples(st.just("since"), LAYER, st.integers(-1, 20)),
        st.tuples(st.just("log"), LAYER),
    ),
    max_size=60,
)


def _transition(t: Any) -> object:
    if t is None:
        return None
    return ("T", t.index, t.key, t.old, t.new, t.writer)


def run_overlay(impl: Any, max_transitions: int, ops: list[tuple[Any, ...]]) -> list[object]:
    root = impl.StateStore(max_transitions=max_transitions)
    layers: list[Any] = [root]
    heard: list[object] = []

    def listen(layer_no: int) -> Any:
        return lambda t: heard.append((layer_no, _transition(t)))

    root.subscribe(listen(0))
    out: list[object] = []
    for op in ops:
        name, layer = op[0], layers[op[1] % len(layers)]
        args = op[2:]
        try:
            if name == "overlay":
                if layer.depth < MAX_DEPTH:
                    layers.append(impl.Overlay(layer, args[0]))
                    layers[-1].subscribe(listen(len(layers) - 1))
                result: object = len(layers)
            elif name == "set":
                key, value, writer = args
                if writer is None and layer.depth == 0:
                    writer = "root-writer"
                result = _transition(
                    layer.set(key, value) if writer is None else layer.set(key, value, writer)
                )
            elif name == "delete":
                key, writer = args
                if writer is None and layer.depth == 0:
                    writer = "root-writer"
                result = _transition(
                    layer.delete(key) if writer is None else layer.delete(key, writer)
                )
            elif name == "get":
                result = ("v", layer.get(args[0]), layer.get(args[0], "<dflt>"))
            elif name == "contains":
                result = args[0] in layer
            elif name == "writer_of":
                result = layer.writer_of(args[0])
            elif name == "keys":
                result = layer.keys(args[0]) if args[0] else layer.keys()
            elif name == "snapshot":
                result = list(layer.snapshot().items())  # order matters too
            elif name == "len":
                result = len(layer)
            elif name == "local_keys":
                result = layer.local_keys() if layer.depth else None
            elif name == "merge":
                result = layer.merge_to_parent() if layer.depth else None
            elif name == "discard":
                result = layer.discard() if layer.depth else None
            elif name == "since":
                result = [_transition(t) for t in layer.transitions_since(args[0])]
            elif name == "log":
                result = (layer.transition_count, layer.first_retained_index)
            else:  # pragma: no cover
                raise AssertionError(name)
        except Exception as exc:
            result = ("raised", type(exc).__name__)
        out.append((name, result))
    out.append(("heard", heard))
    out.append(("final", [list(layer.snapshot().items()) for layer in layers]))
    return out


@SETTINGS
@given(max_transitions=st.integers(0, 6), ops=OVERLAY_OPS)
def test_overlay_twins_agree(
    c_impl: Any, py_impl: Any, max_transitions: int, ops: list[tuple[Any, ...]]
) -> None:
    assert run_overlay(c_impl, max_transitions, ops) == run_overlay(py_impl, max_transitions, ops)


# -- budget ---------------------------------------------------------------------


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


LIMITS = st.builds(
    BudgetLimits,
    max_input_tokens=_optional(st.integers(0, 60)),
    max_output_tokens=_optional(st.integers(0, 60)),
    max_total_tokens=_optional(st.integers(0, 100)),
    max_cost_usd=_optional(
        st.one_of(st.floats(0, 2, allow_nan=False), st.sampled_from([0.0, 0.1, 0.3, 1.0, 2]))
    ),
    max_agents=_optional(st.integers(0, 8)),
)
COSTS = st.one_of(
    st.floats(0, 0.5, allow_nan=False),
    st.sampled_from([0.0, 0.1, 0.2, 0.0000005, 0.0000015, 0.0000025, -0.0, 1]),
    # around the int64 micro-dollar limit (9.22e12 USD) and far beyond
    st.floats(9.2e12, 9.3e12),
    st.sampled_from([-0.01, math.nan, math.inf, -math.inf, 1e300]),
)
TOKENS = st.one_of(st.integers(0, 30), st.sampled_from([-1, 2**63, 2**63 - 1]))
BUDGET_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("begin")),
        st.tuples(st.just("begin")),
        st.tuples(st.just("record"), TOKENS, TOKENS, COSTS),
        st.tuples(st.just("snapshot")),
    ),
    max_size=40,
)


def run_budget(impl: Any, limits: BudgetLimits, ops: list[tuple[Any, ...]]) -> list[object]:
    budget = impl.CoordinationBudget(limits, budget_id="hypo")
    out: list[object] = []
    for op in ops:
        try:
            if op[0] == "begin":
                budget.begin_agent()
                result: object = "admitted"
            elif op[0] == "record":
                budget.record(*op[1:])
                result = "recorded"
            else:
                result = budget.snapshot()
        except Exception as exc:
            detail = vars(exc).copy() if hasattr(exc, "__dict__") else {}
            result = ("raised", type(exc).__name__, str(exc) if detail else "", detail)
        out.append(result)
    out.append((budget.agents_started, budget.agents_denied, budget.snapshot()))
    return out


@SETTINGS
@given(limits=LIMITS, ops=BUDGET_OPS)
# Found by hypothesis: counters and their sum saturate at 2**63-1.
@example(limits=BudgetLimits(), ops=[("record", 1, 2**63 - 1, 0.0), ("snapshot",)])
@example(
    limits=BudgetLimits(max_input_tokens=2), ops=[("record", 1, 2**63 - 1, 0.0), ("begin",)]
)
def test_budget_twins_agree(
    c_impl: Any, py_impl: Any, limits: BudgetLimits, ops: list[tuple[Any, ...]]
) -> None:
    assert run_budget(c_impl, limits, ops) == run_budget(py_impl, limits, ops)


@SETTINGS
@given(cost=st.floats(0, 9.3e12, allow_nan=False))
def test_cost_rounding_agrees(c_impl: Any, py_impl: Any, cost: float) -> None:
    results = []
    for impl in (c_impl, py_impl):
        budget = impl.CoordinationBudget()
        try:
            budget.record(0, 0, cost)
            results.append(budget.snapshot().cost_usd)
        except ValueError:
            results.append("too large")
    assert results[0] == results[1]
