/* The only place carsvc's compiled hot paths touch atomics.
 *
 * Thin, typed wrappers over the GCC/Clang __atomic builtins on plain int64_t
 * fields (the counters live inside a Cython cdef class struct). Declared for
 * Cython in ext/_atomic.pxd. Why builtins rather than <stdatomic.h> or
 * libcpp.atomic: see docs/hot-paths.md ("Atomics").
 *
 * Memory order: the counters publish no other memory, so every operation only
 * needs atomicity and one modification order per counter: relaxed loads and
 * adds, and an acq_rel compare-exchange for the max_agents admission loop.
 */
#ifndef CARSVC_ATOMIC_H
#define CARSVC_ATOMIC_H

#include <sched.h>
#include <stdint.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "carsvc's compiled hot paths need the GCC/Clang __atomic builtins; \
install with CARSVC_NO_EXTENSIONS=1 for the pure-Python build"
#endif

static inline int64_t
carsvc_atomic_load(const int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void
carsvc_atomic_store(int64_t *p, int64_t value)
{
    __atomic_store_n(p, value, __ATOMIC_RELAXED);
}

/* Returns the value before the addition. */
static inline int64_t
carsvc_atomic_fetch_add(int64_t *p, int64_t delta)
{
    return __atomic_fetch_add(p, delta, __ATOMIC_RELAXED);
}

/* Weak compare-exchange (may fail spuriously: call it in a loop). On failure
 * *expected receives the current value. Returns nonzero on success. */
static inline int
carsvc_atomic_cas_weak(int64_t *p, int64_t *expected, int64_t desired)
{
    return __atomic_compare_exchange_n(p, expected, desired, 1,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* Adds delta (>= 0) but never past INT64_MAX: the counter saturates instead
 * of wrapping. A compare-exchange loop; uncontended it costs one locked
 * instruction, like a fetch-add. Returns the value before the addition. */
static inline int64_t
carsvc_atomic_add_saturating(int64_t *p, int64_t delta)
{
    int64_t current = __atomic_load_n(p, __ATOMIC_RELAXED);
    int64_t next;
    do {
        next = (current > INT64_MAX - delta) ? INT64_MAX : current + delta;
    } while (!__atomic_compare_exchange_n(p, &current, next, 1,
                                          __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return current;
}

/* Give the CPU away inside a spin-wait (test hooks only). */
static inline void
carsvc_spin_yield(void)
{
    sched_yield();
}

#endif /* CARSVC_ATOMIC_H */
