# cython: language_level=3, embedsignature=True
# cython: boundscheck=False, wraparound=False, cdivision=True
"""Compiled state store and overlays (first hot path).

Same behaviour as carsvc/domain/_overlay_py.py, which is the specification;
import the classes from carsvc.domain.overlay. Not thread-safe, like the
pure-Python twin: one state scope belongs to one event loop.
"""

import logging

cimport cython
from cpython.dict cimport PyDict_Copy, PyDict_DelItem, PyDict_GetItemWithError, PyDict_SetItem
from cpython.list cimport PyList_GET_SIZE
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport int64_t
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

__all__ = ["Overlay", "StateStore", "StateTransition"]

cdef object _logger = logging.getLogger("carsvc")


@cython.final
@cython.auto_pickle(False)
cdef class _Marker:
    """A private sentinel (deleted); never returned to callers."""

    cdef str _name

    def __cinit__(self, str name):
        self._name = name

    def __repr__(self):
        return self._name


# Stored as the local value of a key deleted in an overlay: hides the parent's key.
cdef _Marker _TOMBSTONE = _Marker("<tombstone>")


cdef inline int64_t _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef inline int _check_key(object key) except -1:
    if not isinstance(key, str):
        raise TypeError(f"state key must be str, not {type(key).__name__}")
    return 0


cdef inline int _check_writer(object writer) except -1:
    if not isinstance(writer, str):
        raise TypeError(f"writer must be str, not {type(writer).__name__}")
    return 0


cdef inline int _check_value(object value) except -1:
    if value is None:
        raise TypeError("state value must not be None (use delete() to remove a key)")
    return 0


cdef PyObject* _lookup(_Layer layer, object key) except? NULL:
    cdef PyObject* value
    while layer is not None:
        value = PyDict_GetItemWithError(layer._values, key)
        if value is not NULL:
            if value is <PyObject*>_TOMBSTONE:
                return NULL
            return value
        layer = layer._parent
    return NULL


@cython.final
@cython.freelist(64)
cdef class StateTransition:
    """One recorded write. Immutable.

    ``old`` is ``None`` when the key was absent before the write (as seen by
    the layer that recorded it); ``new`` is ``None`` for a delete.
    """

    def __init__(self, int64_t index, object key, object old, object new,
                 object writer, int64_t time_unix_ms):
        self.index = index
        self.key = key
        self.old = old
        self.new = new
        self.writer = writer
        self.time_unix_ms = time_unix_ms

    cdef tuple _astuple(self):
        return (self.index, self.key, self.old, self.new, self.writer, self.time_unix_ms)

    def __eq__(self, other):
        if not isinstance(other, StateTransition):
            return NotImplemented
        return self._astuple() == (<StateTransition>other)._astuple()

    def __ne__(self, other):
        if not isinstance(other, StateTransition):
            return NotImplemented
        return self._astuple() != (<StateTransition>other)._astuple()

    def __hash__(self):
        return hash(self._astuple())

    def __reduce__(self):
        return (StateTransition, self._astuple())

    def __repr__(self):
        return (
            f"StateTransition(index={self.index!r}, key={self.key!r}, old={self.old!r}, "
            f"new={self.new!r}, writer={self.writer!r}, time_unix_ms={self.time_unix_ms!r})"
        )


cdef class _Layer:
    """What a store and an overlay share: lookups, the transition log, listeners."""

    def __cinit__(self, *args, **kwargs):
        # Always valid, even if a subclass skips __init__.
        self._values = {}
        self._writers = {}
        self._log = []
        self._count = 0
        self._max_transitions = 0
        self._listeners = ()
        self._owner = ""
        self._depth = 0

    cdef int _init_layer(self, Py_ssize_t max_transitions) except -1:
        self._values = {}
        self._writers = {}
        self._log = []
        self._count = 0
        self._max_transitions = max_transitions
        self._listeners = ()
        return 0

    def __reduce__(self):
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    # -- transition log ------------------------------------------------------

    cdef StateTransition _record(self, object key, object old, object new, object writer):
        cdef StateTransition transition = StateTransition.__new__(StateTransition)
        cdef Py_ssize_t cap = self._max_transitions
        cdef Py_ssize_t pos
        self._count += 1
        transition.index = self._count
        transition.key = key
        transition.old = old
        transition.new = new
        transition.writer = writer
        transition.time_unix_ms = _now_ms()
        if cap > 0:
            if PyList_GET_SIZE(self._log) < cap:
                self._log.append(transition)
            else:
                # Full: overwrite the oldest entry.
                pos = <Py_ssize_t>((self._count - 1) % cap)
                self._log[pos] = transition
        if self._listeners:
            self._notify(transition)
        return transition

    cdef int _notify(self, StateTransition transition) except -1:
        # Iterates a snapshot: listeners may (un)subscribe while being called.
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                _logger.exception(
                    "state listener %r failed on transition %d", listener, transition.index
                )
        return 0

    @property
    def max_transitions(self):
        """How many of the newest transitions the log keeps."""
        return self._max_transitions

    @property
    def transition_count(self):
        """Index of the newest transition (0 if none was recorded)."""
        return self._count

    @property
    def first_retained_index(self):
        """Index of the oldest transition still in the log (``transition_count + 1`` if none)."""
        return self._count - PyList_GET_SIZE(self._log) + 1

    def transitions_since(self, index):
        """Retained transitions whose ``index`` is greater than ``index``, oldest first."""
        cdef Py_ssize_t retained = PyList_GET_SIZE(self._log)
        cdef int64_t first = self._count - retained + 1
        cdef int64_t start, i
        cdef Py_ssize_t cap = self._max_transitions
        cdef list result
        index = PyNumber_Index(index)
        if index >= self._count:  # also handles Python ints beyond int64
            return []
        start = first if index < first else <int64_t>index + 1
        result = []
        for i in range(start, self._count + 1):
            result.append(self._log[<Py_ssize_t>((i - 1) % cap)])
        return result

    def subscribe(self, listener):
        """Call ``listener(transition)`` synchronously after each recorded transition.

        A listener that raises is logged and does not stop the write or the
        other listeners.
        """
        if not callable(listener):
            raise TypeError("listener must be callable")
        self._listeners = self._listeners + (listener,)

    def unsubscribe(self, listener):
        """Remove one subscription of ``listener`` (compared with ``==``); no-op if absent."""
        cdef list listeners = list(self._listeners)
        cdef Py_ssize_t i
        for i in range(len(listeners)):
            if listeners[i] == listener:
                del listeners[i]
                self._listeners = tuple(listeners)
                return

    # -- reads: this layer first, then the parent chain -----------------------

    def get(self, key, default=None):
        cdef PyObject* value = _lookup(self, key)
        if value is NULL:
            return default
        return <object>value

    def __contains__(self, key):
        return _lookup(self, key) is not NULL

    def writer_of(self, key):
        cdef _Layer layer = self
        cdef PyObject* value
        while layer is not None:
            value = PyDict_GetItemWithError(layer._values, key)
            if value is not NULL:
                if value is <PyObject*>_TOMBSTONE:
                    return None
                return layer._writers[key]
            layer = layer._parent
        return None

    cdef dict _visible(self):
        cdef dict visible
        if self._parent is None:
            return PyDict_Copy(self._values)
        visible = self._parent._visible()
        for key, value in self._values.items():
            if value is _TOMBSTONE:
                visible.pop(key, None)
            else:
                visible[key] = value
        return visible

    def __len__(self):
        if self._parent is None:
            return len(self._values)
        return len(self._visible())

    def keys(self, prefix=""):
        """Visible keys starting with ``prefix``, sorted."""
        cdef object source = self._values if self._parent is None else self._visible()
        if prefix:
            return sorted([k for k in source if k.startswith(prefix)])
        return sorted(source)

    def snapshot(self):
        """A copy of every visible key -> value, in key order."""
        cdef dict visible = self._visible()
        return {k: visible[k] for k in sorted(visible)}

    @property
    def depth(self):
        return self._depth

    @property
    def owner(self):
        return self._owner


cdef class StateStore(_Layer):
    """The root layer of one state scope."""

    def __init__(self, max_transitions=100_000):
        if not isinstance(max_transitions, int) or isinstance(max_transitions, bool):
            raise TypeError("max_transitions must be int")
        if max_transitions < 0:
            raise ValueError("max_transitions must be >= 0")
        self._init_layer(max_transitions)

    def set(self, key, value, writer):
        """Store ``value`` under ``key`` and record the transition."""
        _check_key(key)
        _check_value(value)
        _check_writer(writer)
        cdef PyObject* current = PyDict_GetItemWithError(self._values, key)
        old = None if current is NULL else <object>current
        PyDict_SetItem(self._values, key, value)
        PyDict_SetItem(self._writers, key, writer)
        return self._record(key, old, value, writer)

    def delete(self, key, writer):
        """Remove ``key``; returns the transition, or None (nothing recorded) if absent."""
        _check_key(key)
        _check_writer(writer)
        cdef PyObject* current = PyDict_GetItemWithError(self._values, key)
        if current is NULL:
            return None
        old = <object>current
        PyDict_DelItem(self._values, key)
        PyDict_DelItem(self._writers, key)
        return self._record(key, old, None, writer)

    def __repr__(self):
        return f"<StateStore keys={len(self._values)} transitions={self._count}>"


cdef class Overlay(_Layer):
    """One agent's isolated layer over ``parent`` (a store or another overlay)."""

    def __init__(self, parent, owner):
        if not isinstance(parent, (StateStore, Overlay)):
            raise TypeError(
                f"parent must be a StateStore or an Overlay of the same implementation, "
                f"not {type(parent).__name__}"
            )
        if not isinstance(owner, str):
            raise TypeError(f"owner must be str, not {type(owner).__name__}")
        cdef _Layer p = <_Layer>parent
        self._init_layer(p._max_transitions)
        self._parent = p
        self._owner = owner
        self._depth = p._depth + 1

    @property
    def parent(self):
        return self._parent

    def local_keys(self):
        """Keys written or deleted in this layer (not yet merged), sorted."""
        return sorted(self._values)

    cdef int _put_local(self, object key, object value, object writer) except -1:
        # Re-inserting moves the key to the end: dict order is "last written".
        if PyDict_GetItemWithError(self._values, key) is not NULL:
            PyDict_DelItem(self._values, key)
        PyDict_SetItem(self._values, key, value)
        PyDict_SetItem(self._writers, key, writer)
        return 0

    def set(self, key, value, writer=None):
        """Write ``key`` in this layer (``writer`` defaults to the owner)."""
        _check_key(key)
        _check_value(value)
        if writer is None:
            writer = self._owner
        else:
            _check_writer(writer)
        cdef PyObject* current = _lookup(self, key)
        old = None if current is NULL else <object>current
        self._put_local(key, value, writer)
        return self._record(key, old, value, writer)

    def delete(self, key, writer=None):
        """Hide ``key`` in this layer; None (nothing recorded) if it is not visible."""
        _check_key(key)
        if writer is None:
            writer = self._owner
        else:
            _check_writer(writer)
        cdef PyObject* current = _lookup(self, key)
        if current is NULL:
            return None
        old = <object>current
        self._put_local(key, _TOMBSTONE, writer)
        return self._record(key, old, None, writer)

    def merge_to_parent(self):
        """Apply local writes and deletes to the parent, in last-written order.

        Each key is applied with the writer that last wrote it here. The local
        layer is then empty; returns how many keys were applied (0 when there
        was nothing to merge).
        """
        cdef dict values = self._values
        cdef dict writers = self._writers
        if not values:
            return 0
        # Detach first so a listener on the parent that reads through this
        # overlay sees the merged state, and a re-entrant merge is a no-op.
        self._values = {}
        self._writers = {}
        parent = self._parent
        for key, value in values.items():
            if value is _TOMBSTONE:
                parent.delete(key, writers[key])
            else:
                parent.set(key, value, writers[key])
        return len(values)

    def discard(self):
        """Drop every local write and delete."""
        self._values = {}
        self._writers = {}

    def __repr__(self):
        return (
            f"<Overlay owner={self._owner!r} depth={self._depth} "
            f"local={len(self._values)} transitions={self._count}>"
        )
