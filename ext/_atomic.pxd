# Atomic operations on int64_t counters: declared here and nowhere else.
# Implemented in ext/include/carsvc_atomic.h (GCC/Clang __atomic builtins);
# see docs/hot-paths.md for the choice and the memory orders.

from libc.stdint cimport int64_t


cdef extern from "carsvc_atomic.h" nogil:
    int64_t carsvc_atomic_load(const int64_t *p)
    void carsvc_atomic_store(int64_t *p, int64_t value)
    int64_t carsvc_atomic_fetch_add(int64_t *p, int64_t delta)
    int64_t carsvc_atomic_add_saturating(int64_t *p, int64_t delta)
    bint carsvc_atomic_cas_weak(int64_t *p, int64_t *expected, int64_t desired)
    void carsvc_spin_yield()
