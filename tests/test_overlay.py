"""State store and overlay: every test runs on the compiled and the pure-Python twin."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from typing import Any

import pytest

# -- seeds: car-multi task_context.rs ------------------------------------------


async def test_agent_context_isolation(store_cls: Any, overlay_cls: Any) -> None:
    parent = store_cls()
    parent.set("shared_key", "parent_value", "test")

    ctx = overlay_cls(parent, "agent_a")

    # Reads fall through to parent
    assert ctx.get("shared_key") == "parent_value"

    # Writes go to local overlay
    ctx.set("local_key", "local_value")
    assert ctx.get("local_key") == "local_value"
    assert parent.get("local_key") is None

    # Local overlay shadows parent
    ctx.set("shared_key", "overridden")
    assert ctx.get("shared_key") == "overridden"
    assert parent.get("shared_key") == "parent_value"

    # Merge propagates local writes to parent
    ctx.merge_to_parent()
    assert parent.get("local_key") == "local_value"
    assert parent.get("shared_key") == "overridden"


async def test_parallel_isolation(store_cls: Any, overlay_cls: Any) -> None:
    parent = store_cls()
    parent.set("counter", 0, "init")

    ctx_a = overlay_cls(parent, "agent_a")
    ctx_b = overlay_cls(parent, "agent_b")

    async def agent(ctx: Any, counter: int, key: str, data: str) -> Any:
        ctx.set("counter", counter)
        await asyncio.sleep(0)
        ctx.set(key, data)
        return ctx

    ctx_a, ctx_b = await asyncio.gather(
        agent(ctx_a, 1, "agent_a_only", "a_data"),
        agent(ctx_b, 2, "agent_b_only", "b_data"),
    )

    # Each agent sees its own counter value
    assert ctx_a.get("counter") == 1
    assert ctx_b.get("counter") == 2

    # Parent unchanged until merge
    assert parent.get("counter") == 0

    # Merge both: last merge wins for shared keys
    ctx_a.merge_to_parent()
    ctx_b.merge_to_parent()
    assert parent.get("agent_a_only") == "a_data"
    assert parent.get("agent_b_only") == "b_data"
    assert parent.get("counter") == 2
    assert parent.writer_of("counter") == "agent_b"


# -- StateStore -------------------------------------------------------------------


def test_store_reads_and_writes(store_cls: Any) -> None:
    store = store_cls()
    assert len(store) == 0
    assert store.get("k") is None
    assert store.get("k", "dflt") == "dflt"
    assert "k" not in store
    assert store.writer_of("k") is None
    assert store.depth == 0
    assert store.owner == ""

    value = {"nested": [1, 2]}
    store.set("k", value, "alice")
    assert store.get("k") is value  # opaque: stored, not copied
    assert "k" in store
    assert store.writer_of("k") == "alice"
    assert len(store) == 1

    store.set("k", 2, "bob")
    assert store.get("k") == 2
    assert store.writer_of("k") == "bob"

    # Falsy values are values, not absence.
    falsy_values: tuple[object, ...] = (0, "", [], False)
    for falsy in falsy_values:
        store.set("f", falsy, "w")
        assert store.get("f", "dflt") is falsy
        assert "f" in store


def test_store_delete(store_cls: Any) -> None:
    store = store_cls()
    assert store.delete("missing", "w") is None
    assert store.transition_count == 0

    store.set("k", "v", "alice")
    transition = store.delete("k", "bob")
    assert (transition.index, transition.key, transition.old, transition.new) == (2, "k", "v", None)
    assert transition.writer == "bob"
    assert "k" not in store
    assert store.writer_of("k") is None
    assert store.delete("k", "bob") is None
    assert store.transition_count == 2


def test_store_keys_and_snapshot_are_sorted(store_cls: Any) -> None:
    store = store_cls()
    for key in ["b/2", "a", "b/1", "c", "b"]:
        store.set(key, key.upper(), "w")
    assert store.keys() == ["a", "b", "b/1", "b/2", "c"]
    assert store.keys("b/") == ["b/1", "b/2"]
    assert store.keys("zzz") == []
    snapshot = store.snapshot()
    assert list(snapshot) == ["a", "b", "b/1", "b/2", "c"]
    assert snapshot["b/1"] == "B/1"
    snapshot["a"] = "changed"  # a copy
    assert store.get("a") == "A"


@pytest.mark.parametrize("bad_key", [1, None, b"k", ("k",)])
def test_store_rejects_non_str_keys(store_cls: Any, bad_key: object) -> None:
    store = store_cls()
    with pytest.raises(TypeError, match="state key must be str"):
        store.set(bad_key, 1, "w")
    with pytest.raises(TypeError, match="state key must be str"):
        store.delete(bad_key, "w")
    assert store.transition_count == 0


def test_store_rejects_none_values_and_bad_writers(store_cls: Any) -> None:
    store = store_cls()
    with pytest.raises(TypeError, match="must not be None"):
        store.set("k", None, "w")
    with pytest.raises(TypeError, match="writer must be str"):
        store.set("k", 1, None)
    with pytest.raises(TypeError, match="writer must be str"):
        store.set("k", 1, 7)
    assert len(store) == 0
    assert store.transition_count == 0


def test_str_subclass_keys_are_accepted(store_cls: Any, overlay_cls: Any) -> None:
    class Key(str):
        pass

    store = store_cls()
    store.set(Key("k"), 1, Key("w"))
    assert store.get("k") == 1
    overlay = overlay_cls(store, Key("agent"))
    overlay.set(Key("j"), 2)
    assert overlay.writer_of("j") == "agent"


def test_unhashable_key_lookup_raises(store_cls: Any, overlay_cls: Any) -> None:
    overlay = overlay_cls(store_cls(), "a")
    with pytest.raises(TypeError):
        overlay.get(["unhashable"])


# -- transitions ----------------------------------------------------------------


def test_transitions_record_every_write(store_cls: Any, impl: Any) -> None:
    store = store_cls()
    before = time.time_ns() // 1_000_000
    t1 = store.set("a", 1, "alice")
    t2 = store.set("a", 2, "bob")
    t3 = store.set("b", 3, "bob")
    t4 = store.delete("a", "carol")
    after = time.time_ns() // 1_000_000

    assert isinstance(t1, impl.StateTransition)
    assert [(t.index, t.key, t.old, t.new, t.writer) for t in (t1, t2, t3, t4)] == [
        (1, "a", None, 1, "alice"),
        (2, "a", 1, 2, "bob"),
        (3, "b", None, 3, "bob"),
        (4, "a", 2, None, "carol"),
    ]
    assert all(before <= t.time_unix_ms <= after for t in (t1, t2, t3, t4))
    assert store.transition_count == 4
    assert store.first_retained_index == 1
    assert store.transitions_since(0) == [t1, t2, t3, t4]
    assert store.transitions_since(2) == [t3, t4]
    assert store.transitions_since(4) == []
    assert store.transitions_since(99) == []
    assert store.transitions_since(-5) == [t1, t2, t3, t4]
    assert store.transitions_since(2**80) == []


def test_transition_is_immutable_hashable_and_picklable(store_cls: Any, impl: Any) -> None:
    transition = store_cls().set("k", "v", "w")
    with pytest.raises(AttributeError):
        transition.key = "other"
    with pytest.raises(AttributeError):
        transition.extra = 1
    clone = impl.StateTransition(
        transition.index, "k", None, "v", "w", transition.time_unix_ms
    )
    assert clone == transition
    assert (clone != transition) is False  # __ne__ is defined, not derived
    assert hash(clone) == hash(transition)
    assert clone != impl.StateTransition(2, "k", None, "v", "w", transition.time_unix_ms)
    assert transition != (1, "k", None, "v", "w", transition.time_unix_ms)
    assert pickle.loads(pickle.dumps(transition)) == transition
    assert repr(transition) == (
        f"StateTransition(index=1, key='k', old=None, new='v', writer='w', "
        f"time_unix_ms={transition.time_unix_ms})"
    )


def test_transition_log_retention(store_cls: Any) -> None:
    store = store_cls(max_transitions=3)
    assert store.max_transitions == 3
    assert store.first_retained_index == 1
    transitions = [store.set("k", i, "w") for i in range(1, 8)]
    assert store.transition_count == 7
    assert store.first_retained_index == 5
    assert store.transitions_since(0) == transitions[4:]
    assert store.transitions_since(5) == transitions[5:]
    assert store.transitions_since(6) == transitions[6:]
    assert [t.index for t in store.transitions_since(3)] == [5, 6, 7]


def test_transition_log_can_be_disabled(store_cls: Any) -> None:
    store = store_cls(max_transitions=0)
    transition = store.set("k", 1, "w")
    assert transition.index == 1
    assert store.transition_count == 1
    assert store.first_retained_index == 2
    assert store.transitions_since(0) == []


@pytest.mark.parametrize(("bad", "exc"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_store_rejects_bad_retention(store_cls: Any, bad: object, exc: type) -> None:
    with pytest.raises(exc):
        store_cls(max_transitions=bad)


def test_not_picklable(store_cls: Any, overlay_cls: Any) -> None:
    store = store_cls()
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(store)
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(overlay_cls(store, "a"))


# -- listeners --------------------------------------------------------------------


def test_listeners_see_each_transition_after_it_is_applied(store_cls: Any) -> None:
    store = store_cls()
    seen: list[tuple[int, object]] = []

    def listener(transition: Any) -> None:
        # Called after the write: the store already shows the new value.
        seen.append((transition.index, store.get(transition.key)))

    store.subscribe(listener)
    store.set("a", 1, "w")
    store.set("a", 2, "w")
    store.delete("a", "w")
    store.delete("a", "w")  # no transition, no call
    assert seen == [(1, 1), (2, 2), (3, None)]

    store.unsubscribe(listener)
    store.set("a", 3, "w")
    assert len(seen) == 3
    store.unsubscribe(listener)  # not subscribed: no-op


def test_listener_failure_is_logged_and_isolated(
    store_cls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = store_cls()
    calls: list[int] = []

    def broken(transition: Any) -> None:
        raise RuntimeError("boom")

    store.subscribe(broken)
    store.subscribe(lambda t: calls.append(t.index))
    with caplog.at_level(logging.ERROR, logger="carsvc"):
        transition = store.set("k", 1, "w")
    assert transition.index == 1
    assert store.get("k") == 1
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == [
        f"state listener {broken!r} failed on transition 1"
    ]


def test_listeners_may_unsubscribe_while_notified(store_cls: Any) -> None:
    store = store_cls()
    calls: list[str] = []

    def once(transition: Any) -> None:
        calls.append("once")
        store.unsubscribe(once)

    store.subscribe(once)
    store.subscribe(lambda t: calls.append("always"))
    store.set("k", 1, "w")
    store.set("k", 2, "w")
    assert calls == ["once", "always", "always"]


def test_subscribe_requires_a_callable(store_cls: Any) -> None:
    with pytest.raises(TypeError, match="callable"):
        store_cls().subscribe(42)


# -- Overlay ----------------------------------------------------------------------


def test_overlay_reads_through_the_chain(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    root.set("a", "root-a", "r")
    root.set("b", "root-b", "r")
    level1 = overlay_cls(root, "one")
    level1.set("b", "one-b")
    level1.set("c", "one-c")
    level2 = overlay_cls(level1, "two")
    level3 = overlay_cls(level2, "three")
    level4 = overlay_cls(level3, "four")

    assert [level.depth for level in (root, level1, level2, level3, level4)] == [0, 1, 2, 3, 4]
    assert level4.parent is level3
    assert level4.owner == "four"
    assert level4.get("a") == "root-a"
    assert level4.get("b") == "one-b"
    assert level4.get("c") == "one-c"
    assert level4.get("zzz", 7) == 7
    assert "c" in level4
    assert "c" not in root
    assert level4.writer_of("a") == "r"
    assert level4.writer_of("b") == "one"
    assert level4.keys() == ["a", "b", "c"]
    assert level4.snapshot() == {"a": "root-a", "b": "one-b", "c": "one-c"}
    assert len(level4) == 3
    assert level4.local_keys() == []


def test_overlay_writes_stay_local(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    root.set("k", "root", "r")
    overlay = overlay_cls(root, "agent")
    transition = overlay.set("k", "local")
    assert (transition.index, transition.old, transition.new, transition.writer) == (
        1,
        "root",
        "local",
        "agent",
    )
    explicit = overlay.set("j", 1, "someone-else")
    assert explicit.writer == "someone-else"
    assert overlay.writer_of("j") == "someone-else"

    assert root.get("k") == "root"
    assert "j" not in root
    assert root.transition_count == 1
    assert overlay.transition_count == 2
    assert overlay.transitions_since(0) == [transition, explicit]
    assert overlay.local_keys() == ["j", "k"]


def test_overlay_delete_hides_the_parent_key(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    root.set("k", "root", "r")
    root.set("other", 1, "r")
    overlay = overlay_cls(root, "agent")
    child = overlay_cls(overlay, "child")

    transition = overlay.delete("k")
    assert (transition.old, transition.new, transition.writer) == ("root", None, "agent")
    for layer in (overlay, child):
        assert layer.get("k") is None
        assert layer.get("k", "dflt") == "dflt"
        assert "k" not in layer
        assert layer.writer_of("k") is None
        assert layer.keys() == ["other"]
        assert layer.snapshot() == {"other": 1}
        assert len(layer) == 1
    assert root.get("k") == "root"  # untouched until merge
    assert overlay.local_keys() == ["k"]

    # Deleting what is not visible records nothing.
    assert overlay.delete("k") is None
    assert overlay.delete("never") is None
    assert overlay.transition_count == 1

    # A write after the delete revives the key locally.
    overlay.set("k", "again")
    assert child.get("k") == "again"


def test_overlay_keys_prefix(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    for key in ("task/1", "task/2", "note"):
        root.set(key, 1, "r")
    overlay = overlay_cls(root, "a")
    overlay.set("task/3", 1)
    overlay.delete("task/1")
    assert overlay.keys("task/") == ["task/2", "task/3"]
    assert overlay.keys() == ["note", "task/2", "task/3"]


def test_merge_applies_in_last_written_order_with_writers(
    store_cls: Any, overlay_cls: Any
) -> None:
    root = store_cls()
    root.set("gone", 1, "r")
    overlay = overlay_cls(root, "agent")
    overlay.set("x", 1)
    overlay.set("y", 2, "helper")
    overlay.delete("gone")
    overlay.set("x", 3)  # moves x after y and gone

    assert overlay.merge_to_parent() == 3
    applied = root.transitions_since(1)
    assert [(t.key, t.new, t.writer) for t in applied] == [
        ("y", 2, "helper"),
        ("gone", None, "agent"),
        ("x", 3, "agent"),
    ]
    assert root.snapshot() == {"x": 3, "y": 2}
    assert root.writer_of("y") == "helper"
    assert overlay.local_keys() == []
    assert overlay.snapshot() == {"x": 3, "y": 2}
    assert overlay.merge_to_parent() == 0
    assert root.transition_count == 4


def test_merge_of_a_delete_for_a_key_the_parent_lost(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    root.set("k", 1, "r")
    overlay = overlay_cls(root, "agent")
    overlay.delete("k")
    root.delete("k", "r")
    # The local delete is still applied (a no-op on the parent) and counted.
    assert overlay.merge_to_parent() == 1
    assert root.transition_count == 2


def test_nested_merge_goes_one_level_at_a_time(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    outer = overlay_cls(root, "outer")
    inner = overlay_cls(outer, "inner")
    inner.set("k", "v")
    assert inner.merge_to_parent() == 1
    assert outer.get("k") == "v"
    assert outer.writer_of("k") == "inner"
    assert outer.local_keys() == ["k"]
    assert "k" not in root
    assert outer.merge_to_parent() == 1
    assert root.writer_of("k") == "inner"


def test_discard_drops_local_changes(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    root.set("k", "root", "r")
    overlay = overlay_cls(root, "failed-agent")
    overlay.set("k", "local")
    overlay.set("new", 1)
    overlay.delete("k")
    overlay.discard()
    assert overlay.local_keys() == []
    assert overlay.get("k") == "root"
    assert overlay.merge_to_parent() == 0
    assert root.snapshot() == {"k": "root"}
    assert overlay.transition_count == 3  # the log is history, not state


def test_overlay_sees_later_parent_writes(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls()
    overlay = overlay_cls(root, "a")
    root.set("late", 1, "r")
    assert overlay.get("late") == 1


def test_overlay_inherits_retention_and_has_listeners(store_cls: Any, overlay_cls: Any) -> None:
    root = store_cls(max_transitions=2)
    overlay = overlay_cls(root, "a")
    assert overlay.max_transitions == 2
    seen: list[int] = []
    overlay.subscribe(lambda t: seen.append(t.index))
    for i in range(5):
        overlay.set("k", i)
    assert seen == [1, 2, 3, 4, 5]
    assert overlay.first_retained_index == 4
    assert [t.new for t in overlay.transitions_since(0)] == [3, 4]


def test_overlay_parent_and_owner_are_checked(impl: Any, store_cls: Any, overlay_cls: Any) -> None:
    with pytest.raises(TypeError, match="parent must be"):
        overlay_cls({}, "a")
    with pytest.raises(TypeError, match="owner must be str"):
        overlay_cls(store_cls(), None)
    other = "py" if impl.tag == "c" else "c"
    try:
        foreign_store = __import__(
            "carsvc.domain._overlay" if other == "c" else "carsvc.domain._overlay_py",
            fromlist=["StateStore"],
        ).StateStore()
    except ImportError:
        return
    with pytest.raises(TypeError, match="same implementation"):
        overlay_cls(foreign_store, "a")


def test_reprs(store_cls: Any, overlay_cls: Any) -> None:
    store = store_cls()
    store.set("k", 1, "w")
    overlay = overlay_cls(store, "agent")
    assert repr(store) == "<StateStore keys=1 transitions=1>"
    assert repr(overlay) == "<Overlay owner='agent' depth=1 local=0 transitions=0>"
