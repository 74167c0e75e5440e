# cython: language_level=3, embedsignature=True, freethreading_compatible=True
# cython: boundscheck=False, wraparound=False, cdivision=True
"""Compiled coordination budget (second hot path): lock-free C atomics.

Same behaviour as carsvc/domain/_budget_py.py, which is the specification;
import the class from carsvc.domain.budget.

Every counter is an int64_t updated only through the atomics declared in
ext/_atomic.pxd. begin_agent's admission against max_agents is a
compare-exchange loop, so concurrent callers (threads, or nogil callers on a
free-threaded build) can never start more than max_agents agents.

The Python-facing methods keep the GIL: each operation is a few atomic
instructions, far cheaper than releasing and re-acquiring the GIL. The nogil
core (_try_begin, _add) is declared in _budget.pxd for Cython callers, and
_hammer_nogil drives it from many threads at once for the stress tests.
"""

cimport cython
from libc.math cimport isfinite, nearbyint
from libc.stdint cimport INT64_MAX, int64_t

from _atomic cimport (
    carsvc_atomic_add_saturating,
    carsvc_atomic_cas_weak,
    carsvc_atomic_fetch_add,
    carsvc_atomic_load,
    carsvc_spin_yield,
)

from carsvc.domain.budget_types import (
    MICROS_PER_USD,
    UNBOUNDED,
    AgentLimitReached,
    BudgetExhausted,
    BudgetLimits,
    BudgetSnapshot,
    usd_to_micros,
)

__all__ = ["CoordinationBudget"]

# 2**63 as a double: the first cost in micro-dollars an int64_t cannot hold.
cdef double _INT64_LIMIT_AS_DOUBLE = 9223372036854775808.0


cdef int64_t _limit_int(str name, object value) except? -2:
    if value is None:
        return -1
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, not {type(value).__name__}")
    if value < 0 or value > INT64_MAX:
        raise ValueError(f"{name} must be between 0 and 2**63-1, got {value}")
    return value


cdef int64_t _limit_cost(object value) except? -2:
    if value is None:
        return -1
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"max_cost_usd must be a float or None, not {type(value).__name__}")
    if not isfinite(value) or value < 0:
        raise ValueError(f"max_cost_usd must be finite and >= 0, got {value!r}")
    micros = usd_to_micros(value)
    if micros > INT64_MAX:
        raise ValueError(f"max_cost_usd is too large: {value!r}")
    return micros


cdef int64_t _tokens(str name, object value) except? -1:
    # Same checks, order and exception types as the pure twin: type
    # (TypeError), int64 range, sign (ValueError).
    if not isinstance(value, int):
        raise TypeError(f"{name} must be int, not {type(value).__name__}")
    cdef int64_t n
    try:
        n = value
    except OverflowError:
        raise ValueError(f"{name} is out of range: {value}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return n


cdef int64_t _cost_micros(object cost_usd) except? -1:
    cdef double cost
    if isinstance(cost_usd, float):
        cost = cost_usd
    elif isinstance(cost_usd, int):
        try:
            cost = float(cost_usd)
        except OverflowError:
            raise ValueError(f"cost_usd is too large: {cost_usd!r}") from None
    else:
        raise TypeError(f"cost_usd must be float, not {type(cost_usd).__name__}")
    if not isfinite(cost):
        raise ValueError(f"cost_usd must be finite, got {cost_usd!r}")
    if cost < 0:
        raise ValueError(f"cost_usd must be >= 0, got {cost_usd!r}")
    # round-half-to-even of the same double, exactly like usd_to_micros().
    cdef double micros = nearbyint(cost * MICROS_PER_USD)
    if micros >= _INT64_LIMIT_AS_DOUBLE:
        raise ValueError(f"cost_usd is too large: {cost_usd!r}")
    return <int64_t>micros


cdef inline int64_t _total(int64_t input_tokens, int64_t output_tokens) noexcept nogil:
    # Both are >= 0; saturate like the counters.
    if input_tokens > INT64_MAX - output_tokens:
        return INT64_MAX
    return input_tokens + output_tokens


cdef inline object _micros_to_usd(int64_t micros):
    return micros / MICROS_PER_USD


@cython.final
cdef class CoordinationBudget:
    """A shared ceiling on agents started and self-reported spend.

    Thread-safe and lock-free: the counters are C atomics.
    """

    def __init__(self, limits=None, budget_id=""):
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
            self._max_input >= 0
            or self._max_output >= 0
            or self._max_total >= 0
            or self._max_cost_micros >= 0
        )
        self._input = 0
        self._output = 0
        self._cost_micros = 0
        self._started = 0
        self._denied = 0

    def __cinit__(self, *args, **kwargs):
        # Unbounded until __init__ says otherwise.
        self._max_input = -1
        self._max_output = -1
        self._max_total = -1
        self._max_cost_micros = -1
        self._max_agents = -1
        self._limits = UNBOUNDED
        self._budget_id = ""

    def __reduce__(self):
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    # -- read-only configuration and counters ---------------------------------

    @property
    def limits(self):
        return self._limits

    @property
    def budget_id(self):
        return self._budget_id

    @property
    def agents_started(self):
        return carsvc_atomic_load(&self._started)

    @property
    def agents_denied(self):
        return carsvc_atomic_load(&self._denied)

    def is_unbounded(self):
        return self._limits.is_unbounded()

    # -- the lock-free core -----------------------------------------------------

    cdef bint _spend_reached(self, int64_t input_tokens, int64_t output_tokens,
                             int64_t cost_micros) noexcept nogil:
        return (
            (0 <= self._max_input <= input_tokens)
            or (0 <= self._max_output <= output_tokens)
            or (0 <= self._max_total <= _total(input_tokens, output_tokens))
            or (0 <= self._max_cost_micros <= cost_micros)
        )

    cdef Admission _try_begin(self, Observed* seen) noexcept nogil:
        cdef int64_t started
        if self._has_spend_limit:
            seen.input_tokens = carsvc_atomic_load(&self._input)
            seen.output_tokens = carsvc_atomic_load(&self._output)
            seen.cost_micros = carsvc_atomic_load(&self._cost_micros)
            if self._spend_reached(seen.input_tokens, seen.output_tokens, seen.cost_micros):
                carsvc_atomic_fetch_add(&self._denied, 1)
                return DENIED_SPEND
        if self._max_agents < 0:
            carsvc_atomic_fetch_add(&self._started, 1)
            return ADMITTED
        started = carsvc_atomic_load(&self._started)
        while True:
            if started >= self._max_agents:
                seen.agents_started = started
                carsvc_atomic_fetch_add(&self._denied, 1)
                return DENIED_AGENTS
            # On failure `started` is reloaded with the current value.
            if carsvc_atomic_cas_weak(&self._started, &started, started + 1):
                return ADMITTED

    cdef void _add(self, int64_t input_tokens, int64_t output_tokens,
                   int64_t cost_micros) noexcept nogil:
        # Spend totals saturate at INT64_MAX rather than wrap.
        if input_tokens:
            carsvc_atomic_add_saturating(&self._input, input_tokens)
        if output_tokens:
            carsvc_atomic_add_saturating(&self._output, output_tokens)
        if cost_micros:
            carsvc_atomic_add_saturating(&self._cost_micros, cost_micros)

    # -- the hot path -----------------------------------------------------------

    def begin_agent(self):
        """Reserve one agent slot, or raise why not.

        Raises BudgetExhausted when a spend limit is reached, else
        AgentLimitReached when max_agents agents already started.
        """
        cdef Observed seen
        cdef Admission decision = self._try_begin(&seen)
        if decision == ADMITTED:
            return
        if decision == DENIED_SPEND:
            raise BudgetExhausted(
                self._spend_reason(seen.input_tokens, seen.output_tokens, seen.cost_micros),
                self._snapshot(
                    seen.input_tokens,
                    seen.output_tokens,
                    seen.cost_micros,
                    carsvc_atomic_load(&self._started),
                    carsvc_atomic_load(&self._denied),
                ),
            )
        raise AgentLimitReached(self._max_agents, seen.agents_started)

    def record(self, input_tokens, output_tokens, cost_usd):
        """Add one agent's self-reported spend (cost in USD, kept as micro-dollars)."""
        cdef int64_t i = _tokens("input_tokens", input_tokens)
        cdef int64_t o = _tokens("output_tokens", output_tokens)
        cdef int64_t c = _cost_micros(cost_usd)
        self._add(i, o, c)

    def snapshot(self):
        return self._snapshot(
            carsvc_atomic_load(&self._input),
            carsvc_atomic_load(&self._output),
            carsvc_atomic_load(&self._cost_micros),
            carsvc_atomic_load(&self._started),
            carsvc_atomic_load(&self._denied),
        )

    # -- helpers ----------------------------------------------------------------

    cdef str _spend_reason(self, int64_t input_tokens, int64_t output_tokens,
                           int64_t cost_micros):
        """Why a spend limit is reached. Same order and wording as the pure twin."""
        cdef int64_t total = _total(input_tokens, output_tokens)
        if 0 <= self._max_input <= input_tokens:
            return f"max_input_tokens reached: {input_tokens} of {self._max_input}"
        if 0 <= self._max_output <= output_tokens:
            return f"max_output_tokens reached: {output_tokens} of {self._max_output}"
        if 0 <= self._max_total <= total:
            return f"max_total_tokens reached: {total} of {self._max_total}"
        return (
            f"max_cost_usd reached: {_micros_to_usd(cost_micros)} "
            f"of {_micros_to_usd(self._max_cost_micros)}"
        )

    cdef object _snapshot(self, int64_t input_tokens, int64_t output_tokens,
                          int64_t cost_micros, int64_t started, int64_t denied):
        exhausted = self._has_spend_limit and self._spend_reached(
            input_tokens, output_tokens, cost_micros
        )
        return BudgetSnapshot(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=_total(input_tokens, output_tokens),
            cost_usd=_micros_to_usd(cost_micros),
            agents_started=started,
            limits=self._limits,
            exhausted=exhausted,
            agents_denied=denied,
            budget_id=self._budget_id,
        )

    def __repr__(self):
        return (
            f"<CoordinationBudget id={self._budget_id!r} "
            f"started={carsvc_atomic_load(&self._started)} "
            f"denied={carsvc_atomic_load(&self._denied)} unbounded={self.is_unbounded()}>"
        )


# -- test hooks -----------------------------------------------------------------


@cython.final
cdef class _StartGate:
    """Test hook: lets several _hammer_nogil threads start at the same moment.

    Each thread arrives without the GIL and spins until all ``parties`` have
    arrived, so the hammering loops really overlap (a Python-level barrier
    does not guarantee that: the GIL hand-off staggers the threads).
    """

    cdef int64_t _arrived
    cdef int64_t _parties

    def __cinit__(self, int64_t parties):
        self._arrived = 0
        self._parties = parties

    cdef void wait(self) noexcept nogil:
        carsvc_atomic_fetch_add(&self._arrived, 1)
        while carsvc_atomic_load(&self._arrived) < self._parties:
            carsvc_spin_yield()


def _hammer_nogil(CoordinationBudget budget not None, Py_ssize_t iterations,
                  int64_t input_tokens=0, int64_t output_tokens=0, int64_t cost_micros=0,
                  _StartGate gate=None):
    """Test hook: call begin_agent's core, then record's core on admission,
    ``iterations`` times without the GIL. Returns (admitted, denied).

    Several threads calling this at once (behind one ``gate``) contend on the
    counters for real, which Python-level calls (serialised by the GIL) cannot.
    """
    cdef Py_ssize_t k
    cdef Py_ssize_t admitted = 0
    cdef Py_ssize_t denied = 0
    cdef Observed seen
    with nogil:
        if gate is not None:
            gate.wait()
        for k in range(iterations):
            if budget._try_begin(&seen) == ADMITTED:
                admitted += 1
                budget._add(input_tokens, output_tokens, cost_micros)
            else:
                denied += 1
    return admitted, denied
