# Layout of the compiled state store (carsvc.domain._overlay).
# Behaviour lives in _overlay.pyx; the specification is the pure-Python twin
# carsvc/domain/_overlay_py.py.

from cpython.object cimport PyObject
from libc.stdint cimport int64_t


cdef class StateTransition:
    cdef readonly int64_t index
    # key and writer are str (or a str subclass): typed object to accept both.
    cdef readonly object key
    cdef readonly object old
    cdef readonly object new
    cdef readonly object writer
    cdef readonly int64_t time_unix_ms

    cdef tuple _astuple(self)


cdef class _Layer:
    # key -> value; an overlay may also hold the tombstone (a local delete).
    cdef dict _values
    # key -> writer of the entry in _values.
    cdef dict _writers
    # Ring buffer of the newest _max_transitions transitions: transition i
    # (1-based) sits at (i - 1) % _max_transitions once the list is full.
    cdef list _log
    cdef int64_t _count
    cdef Py_ssize_t _max_transitions
    # Copy-on-write tuple; empty means writes pay nothing for notification.
    cdef tuple _listeners
    # None for the root store.
    cdef _Layer _parent
    cdef object _owner  # str
    cdef Py_ssize_t _depth

    cdef int _init_layer(self, Py_ssize_t max_transitions) except -1
    cdef StateTransition _record(self, object key, object old, object new, object writer)
    cdef int _notify(self, StateTransition transition) except -1
    cdef dict _visible(self)


cdef class StateStore(_Layer):
    pass


cdef class Overlay(_Layer):
    cdef int _put_local(self, object key, object value, object writer) except -1


# The lookup through the parent chain: a borrowed reference to the visible
# value of key, or NULL when it is absent (or hidden by a tombstone). Raises
# (and returns NULL) only when the key is unhashable.
cdef PyObject* _lookup(_Layer layer, object key) except? NULL
