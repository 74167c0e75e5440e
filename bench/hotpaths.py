"""Micro-benchmark of the two hot paths, compiled twin against pure-Python twin.

    python -m bench.hotpaths            # full run (about 12 s)
    python -m bench.hotpaths --quick    # fewer repeats
    python -m bench.hotpaths --json out.json

Prints ns per operation for both implementations and their ratio, plus the
pure-Python baselines of DESIGN.md section 8 measured in the same run: a
two-level dict lookup as a method call, and a lock-protected counter with a
limit check. Every timed loop calls the operation 10 times per iteration
(unrolled), so the loop's own cost is spread thin; each figure is the best of
several repeats. This is a command, not a test: nothing here asserts timing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from carsvc.domain import _budget_py, _overlay_py
from carsvc.domain.budget_types import BudgetLimits


def _compiled(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"carsvc.domain.{name}")
    except ImportError:  # reported in the output
        return None


_overlay_c = _compiled("_overlay")
_budget_c = _compiled("_budget")

UNROLL = 10
TARGET_SECONDS = 0.05  # per repeat

# Limits that are set (so every check runs) but never reached in a benchmark.
BIG_LIMITS = BudgetLimits(
    max_input_tokens=10**17,
    max_output_tokens=10**17,
    max_total_tokens=10**17,
    max_cost_usd=10.0**9,
    max_agents=10**17,
)


# -- the baselines (DESIGN.md section 8) ------------------------------------------

_MISSING = object()


class TwoLevelDict:
    """A two-level dict overlay lookup as a method: the plain-Python baseline."""

    __slots__ = ("local", "parent")

    def __init__(self, local: dict[str, object], parent: dict[str, object]) -> None:
        self.local = local
        self.parent = parent

    def get(self, key: str, default: object = None) -> object:
        value = self.local.get(key, _MISSING)
        if value is _MISSING:
            return self.parent.get(key, default)
        return value


class LockedCounter:
    """A lock-protected counter with a limit check: the plain-Python baseline."""

    __slots__ = ("_lock", "limit", "value")

    def __init__(self, limit: int) -> None:
        self._lock = threading.Lock()
        self.limit = limit
        self.value = 0

    def begin(self) -> None:
        with self._lock:
            if self.value >= self.limit:
                raise RuntimeError("limit reached")
            self.value += 1


# -- timing -----------------------------------------------------------------------


def _loop(fn: Callable[..., object], args: tuple[object, ...]) -> Callable[[int], float]:
    """A timed loop calling fn(*args) UNROLL times per iteration; returns seconds."""
    names = ", ".join(f"a{i}" for i in range(len(args)))
    call = f"fn({names})"
    source = (
        "def run(n, fn, args, perf_counter):\n"
        f"    {names + ', = args' if args else 'pass'}\n"
        "    t0 = perf_counter()\n"
        "    for _ in range(n):\n"
        + "".join(f"        {call}\n" for _ in range(UNROLL))
        + "    return perf_counter() - t0\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)
    run = namespace["run"]
    return lambda n: float(run(n, fn, args, time.perf_counter))


def _calibrate(timed: Callable[[int], float]) -> int:
    n = 100
    while True:
        elapsed = timed(n)
        if elapsed > TARGET_SECONDS / 5:
            return max(1, int(n * TARGET_SECONDS / elapsed))
        n *= 4


def measure(fn: Callable[..., object], *args: object, repeats: int) -> float:
    """Best ns per call of fn(*args) over `repeats` runs."""
    timed = _loop(fn, args)
    n = _calibrate(timed)
    best = min(timed(n) for _ in range(repeats))
    return best / (n * UNROLL) * 1e9


def measure_threads(
    make_fn: Callable[[], Callable[[], object]], threads: int, repeats: int
) -> float:
    """Best wall-clock ns per call when `threads` threads each call fn in a loop."""
    fn = make_fn()
    n = _calibrate(_loop(fn, ())) // threads or 1
    results = []
    for _ in range(repeats):
        fn = make_fn()
        timed = _loop(fn, ())
        barrier = threading.Barrier(threads + 1)

        def worker(timed: Callable[[int], float] = timed, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            timed(n)

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in pool:
            thread.start()
        barrier.wait()
        t0 = time.perf_counter()
        for thread in pool:
            thread.join()
        results.append(time.perf_counter() - t0)
    return min(results) / (n * UNROLL * threads) * 1e9


# -- the cases --------------------------------------------------------------------


@dataclass
class Row:
    name: str
    c_ns: float | None
    py_ns: float
    baseline: str = ""
    baseline_ns: float | None = None
    target_ns: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        return None if self.c_ns is None else self.py_ns / self.c_ns


def _overlay_chain(module: Any, depth: int) -> tuple[Any, Any]:
    store = module.StateStore()
    store.set("root-key", "root-value", "bench")
    layer = store
    for level in range(depth):
        layer = module.Overlay(layer, f"agent-{level}")
    layer.set("own-key", "own-value", "bench")
    return store, layer


def run(repeats: int) -> tuple[list[Row], dict[str, float]]:
    impls: dict[str, tuple[Any, Any]] = {"py": (_overlay_py, _budget_py)}
    if _overlay_c is not None and _budget_c is not None:
        impls["c"] = (_overlay_c, _budget_c)

    baselines = {
        "two_level_dict_get": measure(
            TwoLevelDict({"own-key": 1}, {"root-key": 2}).get, "root-key", repeats=repeats
        ),
        "locked_counter_begin": measure(LockedCounter(10**17).begin, repeats=repeats),
        "empty_call": measure(lambda: None, repeats=repeats),
    }

    def per_impl(case: Callable[[Any, Any], float]) -> dict[str, float]:
        return {tag: case(*mods) for tag, mods in impls.items()}

    rows: list[Row] = []

    def add(name: str, results: dict[str, float], **extra: Any) -> None:
        rows.append(Row(name, results.get("c"), results["py"], **extra))

    two_level = ("two-level dict lookup", baselines["two_level_dict_get"])
    counter = ("locked counter + limit", baselines["locked_counter_begin"])

    add(
        "store.get (hit)",
        per_impl(lambda o, b: measure(_overlay_chain(o, 0)[0].get, "root-key", repeats=repeats)),
    )
    add(
        "overlay.get (hit in own layer)",
        per_impl(lambda o, b: measure(_overlay_chain(o, 1)[1].get, "own-key", repeats=repeats)),
        target_ns=40,
    )
    add(
        "overlay.get through 2 levels",
        per_impl(lambda o, b: measure(_overlay_chain(o, 1)[1].get, "root-key", repeats=repeats)),
        baseline=two_level[0],
        baseline_ns=two_level[1],
        target_ns=60,
    )
    add(
        "overlay.get through 4 levels",
        per_impl(lambda o, b: measure(_overlay_chain(o, 3)[1].get, "root-key", repeats=repeats)),
        baseline=two_level[0],
        baseline_ns=two_level[1],
    )
    add(
        "overlay.get miss (2 levels)",
        per_impl(lambda o, b: measure(_overlay_chain(o, 1)[1].get, "absent", repeats=repeats)),
    )
    add(
        "overlay.set (records a transition)",
        per_impl(
            lambda o, b: measure(_overlay_chain(o, 1)[1].set, "own-key", 1, repeats=repeats)
        ),
    )

    def begin(o: Any, b: Any) -> float:
        return measure(b.CoordinationBudget(BIG_LIMITS).begin_agent, repeats=repeats)

    def begin_unbounded(o: Any, b: Any) -> float:
        return measure(b.CoordinationBudget().begin_agent, repeats=repeats)

    add("begin_agent, all limits set", per_impl(begin), baseline=counter[0],
        baseline_ns=counter[1], target_ns=30)
    add("begin_agent, unbounded", per_impl(begin_unbounded), baseline=counter[0],
        baseline_ns=counter[1], target_ns=30)
    def begin_threads(threads: int) -> Callable[[Any, Any], float]:
        def case(o: Any, b: Any) -> float:
            return measure_threads(
                lambda: b.CoordinationBudget(BIG_LIMITS).begin_agent, threads, repeats
            )

        return case

    for threads in (2, 4):
        add(
            f"begin_agent, {threads} threads",
            per_impl(begin_threads(threads)),
            baseline=counter[0],
            baseline_ns=counter[1],
            notes=["wall-clock ns per call, all threads together (GIL build)"],
        )
    add(
        "record(10, 5, 0.001)",
        per_impl(lambda o, b: measure(b.CoordinationBudget(BIG_LIMITS).record, 10, 5, 0.001,
                                      repeats=repeats)),
        baseline=counter[0],
        baseline_ns=counter[1],
    )
    return rows, baselines


# -- report -----------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    try:
        cython_version = importlib.metadata.version("Cython")
    except importlib.metadata.PackageNotFoundError:
        cython_version = "not installed"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "machine": f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": sys.version.split()[0] + f" ({platform.python_implementation()})",
        "cython": cython_version,
        "compiled": "yes" if _overlay_c is not None else "NO (pure-Python only)",
        "load average": " ".join(f"{x:.2f}" for x in load),
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[Row], baselines: dict[str, float], env: dict[str, str]) -> str:
    lines = [f"{key}: {value}" for key, value in env.items()]
    lines.append(
        f"baselines (pure Python, same run): two-level dict lookup as a method "
        f"{baselines['two_level_dict_get']:.1f} ns; lock-protected counter with a limit "
        f"check {baselines['locked_counter_begin']:.1f} ns; empty call "
        f"{baselines['empty_call']:.1f} ns"
    )
    lines.append("")
    header = (
        f"| {'operation':<36} | {'C ns/op':>8} | {'Py ns/op':>8} | {'Py/C':>5} "
        f"| {'C vs baseline':>13} | {'target':>6} |"
    )
    lines.append(header)
    lines.append("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        versus = (
            f"{row.c_ns / row.baseline_ns:.2f}x"
            if row.c_ns is not None and row.baseline_ns
            else ""
        )
        target = f"<={row.target_ns:.0f}" if row.target_ns else ""
        lines.append(
            f"| {row.name:<36} | {_fmt(row.c_ns):>8} | {_fmt(row.py_ns):>8} "
            f"| {_fmt(row.ratio, '.1f'):>5} | {versus:>13} | {target:>6} |"
        )
    lines.append("")
    lines.append(
        "C vs baseline: compiled ns / baseline ns (below 1 is faster than the plain-Python "
        "baseline: the two-level dict lookup for gets, the locked counter for the budget)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpaths", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)

    env = environment()
    rows, baselines = run(repeats)
    print(render(rows, baselines, env))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(
                {
                    "environment": env,
                    "repeats": repeats,
                    "unroll": UNROLL,
                    "baselines_ns": baselines,
                    "rows": [asdict(row) | {"ratio": row.ratio} for row in rows],
                    "median_of_c_ns": statistics.median(
                        [r.c_ns for r in rows if r.c_ns is not None] or [0.0]
                    ),
                },
                out,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
