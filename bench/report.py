"""The suite's report: a text table, a JSON document and a PNG plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.scenarios import Metric


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def ratio(metric: Metric, baseline: float) -> float:
    """How many times better carsvc is than the baseline (> 1: carsvc wins)."""
    ours = statistics.median(metric.values)
    if metric.better == "higher":
        return ours / baseline
    return baseline / ours


def _target_cell(metric: Metric, smoke: bool, embedded: dict[str, Metric]) -> str:
    """The target and whether the median meets it: an absolute one, or one
    relative to the embedded backend's median ("≤2.0x embedded")."""
    sign = "≥" if metric.better == "higher" else "≤"
    if metric.target is not None:
        target, shown = metric.target, _fmt(metric.target)
    elif metric.target_x is not None and metric.embedded in embedded:
        base = statistics.median(embedded[metric.embedded].values)
        target = base * metric.target_x if metric.better == "lower" else base / metric.target_x
        shown = f"{metric.target_x:g}x emb."
    else:
        return ""
    if smoke:
        return "(smoke run)"  # tiny sizes: a target says nothing here
    ours = statistics.median(metric.values)
    met = ours >= target if metric.better == "higher" else ours <= target
    return f"{sign}{shown} {'met' if met else 'MISSED'}"


BASELINE_NAMES = {"raw": "raw gRPC", "autogen": "AutoGen"}


def table(
    metrics: list[Metric],
    baselines: dict[str, dict[str, dict[str, float]]],
    notes: dict[str, str],
    *,
    smoke: bool = False,
) -> str:
    """One row per metric: median [min, max], target, and ratios to the
    baselines and, for a Redis-backed figure, to the embedded backend's."""
    by_key = {m.key: m for m in metrics}
    redis = any(m.embedded for m in metrics)
    head = ("metric", "unit", "median [min, max]", "target", "vs raw gRPC", "vs AutoGen")
    rows: list[tuple[str, ...]] = [(*head, "vs embedded") if redis else head]
    for m in metrics:
        s = stats(m.values)
        cells = {"raw": "", "autogen": "", "embedded": ""}
        if m.embedded:
            same = by_key.get(m.embedded)
            cells["embedded"] = f"{ratio(m, statistics.median(same.values)):.2f}x" if same else "n/a"
        for key in m.compare:
            source, _, name = key.partition(".")
            base = baselines.get(source, {}).get(name)
            if base is None:
                cells[source] = "n/a"
            else:
                cells[source] = f"{ratio(m, base['median']):.2f}x ({_fmt(base['median'])})"
        rows.append(
            (
                m.label,
                m.unit,
                f"{_fmt(s['median'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]",
                _target_cell(m, smoke, by_key),
                cells["raw"],
                cells["autogen"],
                *([cells["embedded"]] if redis else []),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("")
    lines.append("x: carsvc's median against the baseline's median (in brackets), > 1 means carsvc is better.")
    if redis:
        lines.append(
            "vs embedded: the Redis-backed median against the embedded backend's in this run, > 1 means Redis is "
            "better; with 2 replicas the workers are on one and the client on the other."
        )
    lines.extend(f"{name}: {why}" for name, why in notes.items())
    return "\n".join(lines)


def baseline_table(baselines: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for source, figures in baselines.items():
        for name, s in figures.items():
            lines.append(
                f"{BASELINE_NAMES.get(source, source)} {name}: {_fmt(s['median'])} [{_fmt(s['min'])}, {_fmt(s['max'])}]"
            )
    return "\n".join(lines)


def _bar(ax: Any, labels: list[str], groups: list[tuple[float, float, float]], colors: list[str], unit: str) -> None:
    medians = [g[0] for g in groups]
    low = [g[0] - g[1] for g in groups]
    high = [g[2] - g[0] for g in groups]
    ax.barh(labels, medians, xerr=[low, high], color=colors, capsize=3)
    ax.set_xlabel(unit)
    ax.invert_yaxis()
    for y, (value, _, top) in enumerate(groups):
        ax.text(top, y, f"  {_fmt(value)}", va="center", fontsize=8)


def plot(path: Path, metrics: dict[str, Metric], baselines: dict[str, dict[str, dict[str, float]]]) -> None:
    """Throughput and latency side by side with the baselines (median, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, redis, raw, autogen = "#1f77b4", "#17becf", "#7f7f7f", "#d62728"
    through: list[tuple[str, tuple[float, float, float], str]] = []
    latency: list[tuple[str, tuple[float, float, float], str]] = []

    def add(
        rows: list[tuple[str, tuple[float, float, float], str]], label: str, s: dict[str, float] | None, color: str
    ) -> None:
        if s is not None:
            rows.append((label, (s["median"], s["min"], s["max"]), color))

    def mine(key: str) -> dict[str, float] | None:
        return stats(metrics[key].values) if key in metrics else None

    raw_b, ag_b = baselines.get("raw", {}), baselines.get("autogen", {})
    add(through, "carsvc dispatch, 4 workers", mine("dispatch_4w_runs_per_s"), ours)
    add(through, "carsvc dispatch, 1 worker", mine("dispatch_1w_runs_per_s"), ours)
    add(through, "carsvc, Redis 1 replica, 4 workers", mine("dispatch_4w_redis1_runs_per_s"), redis)
    add(through, "carsvc, Redis 1 replica, 1 worker", mine("dispatch_1w_redis1_runs_per_s"), redis)
    add(through, "carsvc, Redis 2 replicas, 4 workers", mine("dispatch_4w_redis2_runs_per_s"), redis)
    add(through, "carsvc, Redis 2 replicas, 1 worker", mine("dispatch_1w_redis2_runs_per_s"), redis)
    add(through, "raw gRPC, 64 in flight", raw_b.get("pipelined_msgs_per_s"), raw)
    add(through, "AutoGen, 64 concurrent", ag_b.get("concurrent64_msgs_per_s"), autogen)
    add(latency, "carsvc single agent p50", mine("latency_p50_us"), ours)
    add(latency, "carsvc, Redis 1 replica, p50", mine("latency_redis1_p50_us"), redis)
    add(latency, "carsvc, Redis 2 replicas, p50", mine("latency_redis2_p50_us"), redis)
    add(latency, "raw gRPC ping-pong p50", raw_b.get("pingpong_p50_us"), raw)
    add(latency, "AutoGen request p50", ag_b.get("sequential_p50_us"), autogen)
    add(latency, "carsvc single agent p99", mine("latency_p99_us"), ours)
    add(latency, "carsvc, Redis 1 replica, p99", mine("latency_redis1_p99_us"), redis)
    add(latency, "carsvc, Redis 2 replicas, p99", mine("latency_redis2_p99_us"), redis)
    add(latency, "raw gRPC ping-pong p99", raw_b.get("pingpong_p99_us"), raw)
    add(latency, "AutoGen request p99", ag_b.get("sequential_p99_us"), autogen)

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6))
    _bar(
        left, [r[0] for r in through], [r[1] for r in through], [r[2] for r in through], "per second (higher is better)"
    )
    left.set_title("Throughput: agent runs or messages per second")
    _bar(right, [r[0] for r in latency], [r[1] for r in latency], [r[2] for r in latency], "µs (lower is better)")
    right.set_title("Round-trip latency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
