"""The benchmark suite: carsvc side by side with the raw gRPC ceiling and AutoGen.

    python -m bench                      # the full suite (about 15 minutes, 4 without Redis)
    python -m bench --quick              # a smoke run of under a minute (CI runs this)
    python -m bench --only dispatch latency --skip autogen
    python -m bench --only journal --skip autogen raw hotpaths   # dispatch with and without --data-dir
    python -m bench --backends embedded  # without the Redis variants (no redis-server needed)

The dispatch, latency and fan-out scenarios run on every backend in --backends:
the embedded default, and a Redis the suite starts (redis-server, AOF everysec)
with 1 replica, or 2 replicas with the workers on one and the client on the
other, so every agent crosses replicas. Redis's own CPU is counted with the
sidecars' in the CPU rows.

Every scenario starts its own sidecar and worker processes on loopback, warms up
and measures --runs times; the table shows the median with [min, max] and each
carsvc figure's ratio to the baselines, which are measured in the same run.
Results go to --out (default bench/results/): results.json and benchmarks.png.
BENCHMARKS.md explains the scenarios and records a full run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvloop

from bench import autogen_baseline, hotpaths, raw_grpc, report, scenarios
from bench.procs import BACKENDS, Backend, RedisUnavailable, redis_server_path
from bench.scenarios import Metric, Progress, Sizes

Scenario = Callable[[Sizes, Progress, list[Backend]], Awaitable[list[Metric]]]


def _on_each(*runs: Callable[[Sizes, Progress, Backend], Awaitable[list[Metric]]]) -> Scenario:
    """A scenario that measures `runs` on every backend asked for, one after
    the other: never two clusters at once."""

    async def scenario(sizes: Sizes, progress: Progress, backends: list[Backend]) -> list[Metric]:
        metrics = []
        for backend in backends:
            for run in runs:
                metrics.extend(await run(sizes, progress, backend))
        return metrics

    return scenario


def _embedded(*runs: Callable[[Sizes, Progress], Awaitable[list[Metric]]]) -> Scenario:
    """A scenario of the embedded backend only."""

    async def scenario(sizes: Sizes, progress: Progress, backends: list[Backend]) -> list[Metric]:
        metrics = []
        for run in runs:
            metrics.extend(await run(sizes, progress))
        return metrics

    return scenario


SCENARIOS: dict[str, Scenario] = {
    "dispatch": _on_each(
        lambda s, p, b: scenarios.dispatch(s, 1, p, b), lambda s, p, b: scenarios.dispatch(s, 4, p, b)
    ),
    "journal": _embedded(scenarios.dispatch_journal),
    "latency": _on_each(scenarios.latency),
    "calls": _embedded(scenarios.runtime_calls),
    "fanout": _on_each(scenarios.fan_out),
    "stalled": _embedded(scenarios.stalled_watchers),
    "memory": _embedded(scenarios.memory_retained, scenarios.memory_in_flight),
}
ON_EVERY_BACKEND = ("dispatch", "latency", "fanout")
BASELINES = ("raw", "autogen", "hotpaths")


def _raw_config(sizes: Sizes, quick: bool) -> raw_grpc.Config:
    cfg = raw_grpc.Config(runs=sizes.runs)
    if quick:
        cfg.pingpong_count, cfg.pipelined_count, cfg.warmup_count, cfg.max_seconds = 300, 600, 100, 0.3
    return cfg


async def _raw(sizes: Sizes, quick: bool, progress: Progress) -> dict[str, dict[str, float]]:
    results = await raw_grpc.run_benchmark(_raw_config(sizes, quick), lambda m: progress(f"raw gRPC: {m}"))
    return raw_grpc.summarize(results)


def _autogen(sizes: Sizes, quick: bool, progress: Progress) -> dict[str, Any]:
    cfg = autogen_baseline.Config(runs=sizes.runs)
    if quick:
        cfg.sequential_count, cfg.concurrent_count, cfg.warmup_count, cfg.max_seconds = 300, 600, 100, 0.3
    return autogen_baseline.run_baseline(cfg, lambda m: progress(f"AutoGen: {m}"))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run on tiny sizes (harness check, not speed)")
    parser.add_argument("--runs", type=int, help="measured runs per scenario (default 5, quick 2)")
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), help="run just these scenarios")
    parser.add_argument("--skip", nargs="+", default=[], choices=BASELINES, help="leave out these baselines")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=list(BACKENDS),
        choices=list(BACKENDS),
        help="run dispatch, latency and fan-out on these (default: all; redis1/redis2 start a redis-server)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where results.json and the plot go")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


async def _suite(args: argparse.Namespace, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    doc: dict[str, Any] = {"sizes": asdict(sizes), "quick": args.quick, "machine": raw_grpc.machine_facts()}
    baselines: dict[str, dict[str, dict[str, float]]] = {}
    notes: dict[str, str] = {}
    if "raw" not in args.skip:
        baselines["raw"] = await _raw(sizes, args.quick, progress)
    if "autogen" not in args.skip:
        try:
            found = await asyncio.to_thread(_autogen, sizes, args.quick, progress)
            baselines["autogen"] = found["summary"]
            doc["autogen"] = {k: v for k, v in found.items() if k != "summary"}
        except autogen_baseline.BaselineUnavailable as err:
            notes["AutoGen"] = f"not measured: {err}"
    metrics: list[Metric] = []
    for name in args.only or SCENARIOS:
        started = time.perf_counter()
        metrics.extend(await SCENARIOS[name](sizes, progress, [BACKENDS[b] for b in args.backends]))
        progress(f"{name}: done in {time.perf_counter() - started:.1f}s")
    doc["baselines"] = baselines
    doc["notes"] = notes
    doc["metrics"] = [asdict(m) | {"stats": report.stats(m.values)} for m in metrics]
    doc["table"] = report.table(metrics, baselines, notes, smoke=args.quick)
    if "hotpaths" not in args.skip:
        progress("hot paths")
        rows, hot_baselines = await asyncio.to_thread(hotpaths.run, 3 if args.quick else 9)
        doc["hotpaths"] = {"rows": [asdict(r) | {"ratio": r.ratio} for r in rows], "baselines_ns": hot_baselines}
        doc["hotpaths_table"] = hotpaths.render(rows, hot_baselines, hotpaths.environment())
    report.plot(args.out / "benchmarks.png", {m.key: m for m in metrics}, baselines)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.runs is not None:
        if args.runs < 1:
            raise SystemExit("--runs must be at least 1")
        sizes.runs = args.runs
    if any(BACKENDS[b].replicas for b in args.backends) and set(args.only or SCENARIOS) & set(ON_EVERY_BACKEND):
        try:
            redis_server_path()  # before the baselines: say so at once
        except RedisUnavailable as err:
            raise SystemExit(f"python -m bench: {err}") from None

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[bench] {message}", file=sys.stderr, flush=True)

    doc = uvloop.run(_suite(args, sizes, progress))
    print(doc["table"])
    if "hotpaths_table" in doc:
        print()
        print(doc["hotpaths_table"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    progress(f"wrote {args.out / 'results.json'} and {args.out / 'benchmarks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
