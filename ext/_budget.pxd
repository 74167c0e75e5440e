# Layout of the compiled coordination budget (carsvc.domain._budget).
# Behaviour lives in _budget.pyx; the specification is the pure-Python twin
# carsvc/domain/_budget_py.py.

from libc.stdint cimport int64_t


# What _try_begin decided.
cdef enum Admission:
    ADMITTED = 0
    DENIED_SPEND = 1      # a token or cost limit is reached -> BudgetExhausted
    DENIED_AGENTS = 2     # max_agents already started -> AgentLimitReached


# The counter values a decision was based on (so the error can say why).
cdef struct Observed:
    int64_t input_tokens
    int64_t output_tokens
    int64_t cost_micros
    int64_t agents_started


cdef class CoordinationBudget:
    # Running totals: touched only through ext/_atomic.pxd. Never decremented;
    # agents_started is only ever incremented by a successful admission.
    cdef int64_t _input
    cdef int64_t _output
    cdef int64_t _cost_micros
    cdef int64_t _started
    cdef int64_t _denied

    # Limits, fixed at construction; -1 means "no limit".
    cdef int64_t _max_input
    cdef int64_t _max_output
    cdef int64_t _max_total
    cdef int64_t _max_cost_micros
    cdef int64_t _max_agents
    cdef bint _has_spend_limit

    cdef object _limits      # BudgetLimits
    cdef object _budget_id   # str

    # The lock-free core: callable without the GIL (e.g. from other Cython code).
    cdef Admission _try_begin(self, Observed* seen) noexcept nogil
    cdef void _add(self, int64_t input_tokens, int64_t output_tokens,
                   int64_t cost_micros) noexcept nogil
    cdef bint _spend_reached(self, int64_t input_tokens, int64_t output_tokens,
                             int64_t cost_micros) noexcept nogil

    # Slow paths (a denial, a snapshot): build the Python objects.
    cdef str _spend_reason(self, int64_t input_tokens, int64_t output_tokens,
                           int64_t cost_micros)
    cdef object _snapshot(self, int64_t input_tokens, int64_t output_tokens,
                          int64_t cost_micros, int64_t started, int64_t denied)
