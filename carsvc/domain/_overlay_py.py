"""Pure-Python state store and overlay: the reference implementation.

This module is the specification of the state hot path. ``ext/_overlay.pyx``
(compiled as ``carsvc.domain._overlay``) must behave identically; the test
suite runs every overlay test on both and compares them on random operation
sequences. Import the classes from :mod:`carsvc.domain.overlay`, which picks the
compiled twin unless ``CARSVC_NO_EXTENSIONS`` is set.

Model
-----
A :class:`StateStore` is the root layer of one state scope: key -> value with
the writer of each key, and a log of every write (a :class:`StateTransition`
with a 1-based index that keeps growing; the log itself keeps only the newest
``max_transitions`` entries).

An :class:`Overlay` is one agent's isolated layer over a parent (a store or
another overlay, at any depth). Reads fall through the parent chain; writes and
deletes stay local (a delete hides the parent's key with a tombstone) until
:meth:`Overlay.merge_to_parent` applies them, or :meth:`Overlay.discard` drops
them. Values are opaque objects and are never ``None`` (``None`` means absent).

Not thread-safe: one state scope belongs to one event loop.
"""

from __future__ import annotations

import logging
import operator
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Final, cast, final

__all__ = ["Overlay", "StateStore", "StateTransition"]

_logger = logging.getLogger("carsvc")

Listener = Callable[["StateTransition"], None]


@final
class _Marker:
    """A private sentinel (absent / deleted); never returned to callers."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_MISSING: Final = _Marker("<missing>")
# Stored as the local value of a key deleted in an overlay: hides the parent's key.
_TOMBSTONE: Final = _Marker("<tombstone>")


@final
class StateTransition:
    """One recorded write. Immutable.

    ``old`` is ``None`` when the key was absent before the write (as seen by
    the layer that recorded it); ``new`` is ``None`` for a delete.
    """

    # Read-only properties over private slots: immutable, and cheap to build.
    __slots__ = ("_index", "_key", "_new", "_old", "_time_unix_ms", "_writer")

    def __init__(
        self,
        index: int,
        key: str,
        old: object | None,
        new: object | None,
        writer: str,
        time_unix_ms: int,
    ) -> None:
        self._index = index
        self._key = key
        self._old = old
        self._new = new
        self._writer = writer
        self._time_unix_ms = time_unix_ms

    @property
    def index(self) -> int:
        """1-based position in the log of the layer that recorded it."""
        return self._index

    @property
    def key(self) -> str:
        return self._key

    @property
    def old(self) -> object | None:
        return self._old

    @property
    def new(self) -> object | None:
        return self._new

    @property
    def writer(self) -> str:
        return self._writer

    @property
    def time_unix_ms(self) -> int:
        return self._time_unix_ms

    def _astuple(self) -> tuple[int, str, object | None, object | None, str, int]:
        return (self._index, self._key, self._old, self._new, self._writer, self._time_unix_ms)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateTransition):
            return NotImplemented
        return self._astuple() == other._astuple()

    def __ne__(self, other: object) -> bool:
        if not isinstance(other, StateTransition):
            return NotImplemented
        return self._astuple() != other._astuple()

    def __hash__(self) -> int:
        return hash(self._astuple())

    def __reduce__(self) -> tuple[type[StateTransition], tuple[object, ...]]:
        return (StateTransition, self._astuple())

    def __repr__(self) -> str:
        return (
            f"StateTransition(index={self._index!r}, key={self._key!r}, old={self._old!r}, "
            f"new={self._new!r}, writer={self._writer!r}, time_unix_ms={self._time_unix_ms!r})"
        )


_time_ns = time.time_ns


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"state key must be str, not {type(key).__name__}")
    return key


def _check_writer(writer: object) -> str:
    if not isinstance(writer, str):
        raise TypeError(f"writer must be str, not {type(writer).__name__}")
    return writer


def _check_value(value: object) -> object:
    if value is None:
        raise TypeError("state value must not be None (use delete() to remove a key)")
    return value


class _Layer:
    """What a store and an overlay share: the transition log and listeners.

    ``_values`` maps key -> value (an overlay may also hold ``_TOMBSTONE``);
    ``_writers`` maps key -> writer of that entry.
    """

    __slots__ = (
        "_count",
        "_listeners",
        "_log",
        "_max_transitions",
        "_parent",
        "_values",
        "_writers",
    )

    _values: dict[str, object]
    _writers: dict[str, str]
    _log: deque[StateTransition]
    _count: int
    _max_transitions: int
    _listeners: tuple[Listener, ...]
    # None for the root store.
    _parent: _Layer | None

    def _init_layer(self, max_transitions: int, parent: _Layer | None) -> None:
        self._parent = parent
        self._values = {}
        self._writers = {}
        self._log = deque(maxlen=max_transitions)
        self._count = 0
        self._max_transitions = max_transitions
        self._listeners = ()

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    # -- transition log ------------------------------------------------------

    def _record(
        self, key: str, old: object | None, new: object | None, writer: str
    ) -> StateTransition:
        self._count += 1
        transition = StateTransition(
            self._count, key, old, new, writer, _time_ns() // 1_000_000
        )
        self._log.append(transition)
        if self._listeners:
            self._notify(transition)
        return transition

    def _notify(self, transition: StateTransition) -> None:
        # A snapshot of the tuple: listeners may (un)subscribe while being called.
        for listener in self._listeners:
            try:
                listener(transition)
            except Exception:
                _logger.exception(
                    "state listener %r failed on transition %d", listener, transition.index
                )

    @property
    def max_transitions(self) -> int:
        """How many of the newest transitions the log keeps."""
        return self._max_transitions

    @property
    def transition_count(self) -> int:
        """Index of the newest transition (0 if none was recorded)."""
        return self._count

    @property
    def first_retained_index(self) -> int:
        """Index of the oldest transition still in the log (``transition_count + 1`` if none)."""
        return self._count - len(self._log) + 1

    def transitions_since(self, index: int) -> list[StateTransition]:
        """Retained transitions whose ``index`` is greater than ``index``, oldest first."""
        skip = operator.index(index) - (self._count - len(self._log))
        if skip <= 0:
            return list(self._log)
        if skip >= len(self._log):
            return []
        return list(islice(self._log, skip, None))

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(transition)`` synchronously after each recorded transition.

        A listener that raises is logged and does not stop the write or the
        other listeners.
        """
        if not callable(listener):
            raise TypeError("listener must be callable")
        self._listeners = (*self._listeners, listener)

    def unsubscribe(self, listener: Listener) -> None:
        """Remove one subscription of ``listener`` (compared with ``==``); no-op if absent."""
        listeners = list(self._listeners)
        for i, existing in enumerate(listeners):
            if existing == listener:
                del listeners[i]
                self._listeners = tuple(listeners)
                return

    # -- reads: this layer first, then the parent chain -----------------------

    def get(self, key: str, default: object = None) -> object:
        layer: _Layer | None = self
        while layer is not None:
            value = layer._values.get(key, _MISSING)
            if value is not _MISSING:
                return default if value is _TOMBSTONE else value
            layer = layer._parent
        return default

    def __contains__(self, key: object) -> bool:
        layer: _Layer | None = self
        while layer is not None:
            value = layer._values.get(key, _MISSING)  # type: ignore[call-overload]
            if value is not _MISSING:
                return value is not _TOMBSTONE
            layer = layer._parent
        return False

    def writer_of(self, key: str) -> str | None:
        layer: _Layer | None = self
        while layer is not None:
            value = layer._values.get(key, _MISSING)
            if value is not _MISSING:
                return None if value is _TOMBSTONE else layer._writers[key]
            layer = layer._parent
        return None

    def _visible(self) -> dict[str, object]:
        raise NotImplementedError

    def keys(self, prefix: str = "") -> list[str]:
        """Visible keys starting with ``prefix``, sorted."""
        if prefix:
            return sorted([k for k in self._visible() if k.startswith(prefix)])
        return sorted(self._visible())

    def snapshot(self) -> dict[str, object]:
        """A copy of every visible key -> value, in key order."""
        visible = self._visible()
        return {k: visible[k] for k in sorted(visible)}


@final
class StateStore(_Layer):
    """The root layer of one state scope."""

    __slots__ = ()

    def __init__(self, max_transitions: int = 100_000) -> None:
        if not isinstance(max_transitions, int) or isinstance(max_transitions, bool):
            raise TypeError("max_transitions must be int")
        if max_transitions < 0:
            raise ValueError("max_transitions must be >= 0")
        self._init_layer(max_transitions, None)

    @property
    def depth(self) -> int:
        return 0

    @property
    def owner(self) -> str:
        return ""

    # The root has no tombstones and no parent: one dict lookup.
    def get(self, key: str, default: object = None) -> object:
        return self._values.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def writer_of(self, key: str) -> str | None:
        return self._writers.get(key)

    def __len__(self) -> int:
        return len(self._values)

    def set(self, key: str, value: object, writer: str) -> StateTransition:
        """Store ``value`` under ``key`` and record the transition."""
        _check_key(key)
        _check_value(value)
        _check_writer(writer)
        values = self._values
        old = values.get(key)
        values[key] = value
        self._writers[key] = writer
        return self._record(key, old, value, writer)

    def delete(self, key: str, writer: str) -> StateTransition | None:
        """Remove ``key``; returns the transition, or None (nothing recorded) if absent."""
        _check_key(key)
        _check_writer(writer)
        old = self._values.pop(key, None)
        if old is None:
            return None
        del self._writers[key]
        return self._record(key, old, None, writer)

    def _visible(self) -> dict[str, object]:
        return dict(self._values)

    def keys(self, prefix: str = "") -> list[str]:
        if prefix:
            return sorted([k for k in self._values if k.startswith(prefix)])
        return sorted(self._values)

    def __repr__(self) -> str:
        return f"<StateStore keys={len(self._values)} transitions={self._count}>"


@final
class Overlay(_Layer):
    """One agent's isolated layer over ``parent`` (a store or another overlay)."""

    __slots__ = ("_depth", "_owner")

    _owner: str
    _depth: int

    def __init__(self, parent: StateStore | Overlay, owner: str) -> None:
        if not isinstance(parent, (StateStore, Overlay)):
            raise TypeError(
                f"parent must be a StateStore or an Overlay of the same implementation, "
                f"not {type(parent).__name__}"
            )
        if not isinstance(owner, str):
            raise TypeError(f"owner must be str, not {type(owner).__name__}")
        self._init_layer(parent._max_transitions, parent)
        self._owner = owner
        self._depth = parent.depth + 1

    @property
    def parent(self) -> StateStore | Overlay:
        return cast("StateStore | Overlay", self._parent)

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def depth(self) -> int:
        return self._depth

    def get(self, key: str, default: object = None) -> object:
        # The hottest read: own layer first, then a loop (no call per level).
        value = self._values.get(key, _MISSING)
        if value is _MISSING:
            layer = self._parent
            while layer is not None:
                value = layer._values.get(key, _MISSING)
                if value is not _MISSING:
                    break
                layer = layer._parent
            else:
                return default
        return default if value is _TOMBSTONE else value

    def __len__(self) -> int:
        return len(self._visible())

    def _visible(self) -> dict[str, object]:
        visible = self.parent._visible()
        for key, value in self._values.items():
            if value is _TOMBSTONE:
                visible.pop(key, None)
            else:
                visible[key] = value
        return visible

    def local_keys(self) -> list[str]:
        """Keys written or deleted in this layer (not yet merged), sorted."""
        return sorted(self._values)

    # -- writes: local only ---------------------------------------------------

    def _put_local(self, key: str, value: object, writer: str) -> None:
        # Re-inserting moves the key to the end: dict order is "last written".
        values = self._values
        if key in values:
            del values[key]
        values[key] = value
        self._writers[key] = writer

    def set(self, key: str, value: object, writer: str | None = None) -> StateTransition:
        """Write ``key`` in this layer (``writer`` defaults to the owner)."""
        _check_key(key)
        _check_value(value)
        writer = self._owner if writer is None else _check_writer(writer)
        old = self.get(key)
        self._put_local(key, value, writer)
        return self._record(key, old, value, writer)

    def delete(self, key: str, writer: str | None = None) -> StateTransition | None:
        """Hide ``key`` in this layer; None (nothing recorded) if it is not visible."""
        _check_key(key)
        writer = self._owner if writer is None else _check_writer(writer)
        old = self.get(key)
        if old is None:
            return None
        self._put_local(key, _TOMBSTONE, writer)
        return self._record(key, old, None, writer)

    def merge_to_parent(self) -> int:
        """Apply local writes and deletes to the parent, in last-written order.

        Each key is applied with the writer that last wrote it here. The local
        layer is then empty; returns how many keys were applied (0 when there
        was nothing to merge).
        """
        values = self._values
        if not values:
            return 0
        writers = self._writers
        # Detach first so a listener on the parent that reads through this
        # overlay sees the merged state, and a re-entrant merge is a no-op.
        self._values = {}
        self._writers = {}
        parent = self.parent
        for key, value in values.items():
            if value is _TOMBSTONE:
                parent.delete(key, writers[key])
            else:
                parent.set(key, value, writers[key])
        return len(values)

    def discard(self) -> None:
        """Drop every local write and delete."""
        self._values = {}
        self._writers = {}

    def __repr__(self) -> str:
        return (
            f"<Overlay owner={self._owner!r} depth={self._depth} "
            f"local={len(self._values)} transitions={self._count}>"
        )
