"""The carsvc scenarios of the benchmark suite.

Each scenario starts its own sidecar and worker processes (bench.procs), warms
up, then measures `runs` times. A scenario returns Metrics: one value per
measured run, so the report can show the median with min and max.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from bench.procs import EMBEDDED, Backend, Sidecar, WorkerProcess, cluster, deploy
from carsvc._proto.car.v1 import runs_pb2, runs_pb2_grpc, types_pb2
from carsvc.client import Client, agent, map_reduce, single

Progress = Callable[[str], None]
PAYLOAD = "x" * 200  # the baselines' message size


@dataclass
class Metric:
    key: str
    label: str
    unit: str
    better: Literal["higher", "lower"]
    values: list[float] = field(default_factory=list)
    # Targets from issue #7; None where the issue sets none.
    target: float | None = None
    # Baseline metric keys ("raw.pipelined_msgs_per_s", "autogen.sequential_p50_us")
    # this figure is compared with.
    compare: list[str] = field(default_factory=list)
    note: str = ""
    # A Redis-backed figure: the key of the embedded backend's figure of the same
    # run it is compared with ("vs embedded"), and a target relative to it (a
    # factor of the embedded median: ≤ 2.0 for a latency at most twice as long).
    embedded: str = ""
    target_x: float | None = None


@dataclass
class Sizes:
    """How much work each scenario does; `quick()` shrinks it to a smoke run."""

    runs: int = 5
    dispatch_items: int = 20_000
    max_concurrent: int = 512
    latency_runs: int = 1_000
    call_pairs: int = 2_000
    call_agents: int = 16
    fanout_items: int = 2_000
    watchers: int = 100
    stalled: int = 1_000
    stalled_items: int = 5_000
    retained_runs: int = 10_000
    worker_connections: int = 1_000
    in_flight: int = 10_000
    worker_processes: int = 4
    # The sidecars' --heartbeat-interval-ms (None: their default, 5 s). Replicas
    # read the cluster directory that often, so a smoke run shortens it.
    heartbeat_ms: int | None = None

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            runs=2,
            dispatch_items=400,
            max_concurrent=64,
            latency_runs=30,
            call_pairs=20,
            call_agents=2,
            fanout_items=50,
            watchers=5,
            stalled=20,
            stalled_items=100,
            retained_runs=100,
            worker_connections=8,
            in_flight=80,
            worker_processes=2,
            heartbeat_ms=500,
        )


def whole_run_watchable(items: int) -> dict[str, str]:
    """The sidecar environment of a scenario whose client reads every event of
    a map-reduce of `items` through Client.run: watcher_buffer (default 4,096)
    and event_retention (10,000) raised above the run's ~3 events per item.
    With the defaults, the client (this process, sharing two cores with the
    sidecar and the workers) falls that far behind a 20,000-item map-reduce:
    the sidecar ends its Session, and Client.run's fallback watch fails once
    the events it missed are dropped (BENCHMARKS.md, "Client.run and
    watcher_buffer")."""
    events = str(max(10_000, 4 * items + 64))
    return {"CARSVC_WATCHER_BUFFER": events, "CARSVC_EVENT_RETENTION": events}


def _check(run: object, what: str) -> None:
    status = getattr(run, "status", None)
    if status != types_pb2.RUN_STATUS_SUCCEEDED:
        raise RuntimeError(
            f"{what}: run ended {status}: {getattr(run, 'termination_reason', '')} "
            f"{getattr(run, 'termination_detail', '')}"
        )


async def _map_reduce(client: Client, mapper: str, items: list[str], max_concurrent: int) -> float:
    """Runs one map-reduce; returns its wall time in seconds."""
    started = time.perf_counter()
    run = await client.run(map_reduce(agent(mapper), agent("noop"), "bench", items, max_concurrent=max_concurrent))
    elapsed = time.perf_counter() - started
    _check(run, f"map-reduce of {len(items)} {mapper}")
    if len(run.result.map_reduce.map_outputs) != len(items):
        raise RuntimeError(f"map-reduce returned {len(run.result.map_reduce.map_outputs)} outputs, not {len(items)}")
    return elapsed


# -- 1. dispatch throughput -------------------------------------------------------------


async def dispatch(sizes: Sizes, workers: int, progress: Progress, backend: Backend = EMBEDDED) -> list[Metric]:
    w = f"{workers}w"
    rate = Metric(
        f"dispatch_{w}{backend.key}_runs_per_s",
        f"dispatch, {workers} worker process{'es' if workers > 1 else ''}{backend.label}",
        "agent runs/s",
        "higher",
        target=(10_000 if backend.replicas else 20_000 if workers == 4 else None),
        compare=["raw.pipelined_msgs_per_s", "autogen.concurrent64_msgs_per_s"],
        embedded=f"dispatch_{w}_runs_per_s" if backend.replicas else "",
    )
    if backend.replicas:
        cpu = Metric(
            f"dispatch_{w}{backend.key}_cpu_us",
            f"dispatch, {w}{backend.label}: sidecars + Redis CPU per agent",
            "µs",
            "lower",
            embedded=f"dispatch_{w}_sidecar_cpu_us",
        )
        redis_cpu = [Metric(f"dispatch_{w}{backend.key}_redis_cpu_us", "  of which Redis", "µs", "lower")]
    else:
        cpu = Metric(f"dispatch_{w}_sidecar_cpu_us", f"dispatch, {w}: sidecar CPU per agent", "µs", "lower")
        redis_cpu = []
    name = f"dispatch {w}{backend.label}"
    items = [str(i) for i in range(sizes.dispatch_items)]
    with deploy(
        backend,
        workers,
        max_in_flight=sizes.max_concurrent,
        heartbeat_ms=sizes.heartbeat_ms,
        env=whole_run_watchable(len(items)),
    ) as deployed:
        async with Client(deployed.address) as client:
            progress(f"{name}: warm-up")
            await _map_reduce(client, "noop", items[: max(len(items) // 4, 10)], sizes.max_concurrent)
            for i in range(sizes.runs):
                progress(f"{name}: run {i + 1}/{sizes.runs}")
                cpu0, redis0 = deployed.cpu_seconds(), deployed.redis_cpu_seconds()
                elapsed = await _map_reduce(client, "noop", items, sizes.max_concurrent)
                agents = len(items) + 1  # the mappers and the reducer
                rate.values.append(agents / elapsed)
                cpu.values.append((deployed.cpu_seconds() - cpu0) / agents * 1e6)
                for m in redis_cpu:
                    m.values.append((deployed.redis_cpu_seconds() - redis0) / agents * 1e6)
    return [rate, cpu, *redis_cpu]


# -- 1b. dispatch with a journal --------------------------------------------------------


async def dispatch_journal(sizes: Sizes, progress: Progress) -> list[Metric]:
    """Scenario 1's map-reduce on 1 worker process, against a sidecar with the
    embedded default (no journal) and one with `--data-dir` (journal_sync
    normal: the run, its events and every step output journaled). Both stay up
    and the measured runs alternate between them (which goes first alternates
    too), so both see the same machine; each pair gives a ratio."""
    none = Metric("dispatch_memory_runs_per_s", "dispatch, 1w, no journal", "agent runs/s", "higher")
    journaled = Metric("dispatch_journal_runs_per_s", "dispatch, 1w, --data-dir (normal)", "agent runs/s", "higher")
    ratio = Metric("dispatch_journal_ratio", "dispatch with --data-dir / without", "%", "higher")
    items = [str(i) for i in range(sizes.dispatch_items)]
    agents = len(items) + 1  # the mappers and the reducer
    with (
        tempfile.TemporaryDirectory(prefix="carsvc-bench-") as data_dir,
        cluster(1, max_in_flight=sizes.max_concurrent, env=whole_run_watchable(len(items))) as (plain, _),
        cluster(
            1,
            max_in_flight=sizes.max_concurrent,
            sidecar_args=("--data-dir", data_dir),
            env=whole_run_watchable(len(items)),
        ) as (durable, _),
    ):
        async with Client(plain.address) as plain_client, Client(durable.address) as durable_client:
            sides = [(none, plain_client), (journaled, durable_client)]
            progress("dispatch, journal: warm-up")
            for _, client in sides:
                await _map_reduce(client, "noop", items[: max(len(items) // 4, 10)], sizes.max_concurrent)
            for i in range(sizes.runs):
                progress(f"dispatch, journal: run {i + 1}/{sizes.runs}")
                for metric, client in sides if i % 2 == 0 else sides[::-1]:
                    metric.values.append(agents / await _map_reduce(client, "noop", items, sizes.max_concurrent))
                ratio.values.append(journaled.values[-1] / none.values[-1] * 100)
    return [none, journaled, ratio]


# -- 2. single-agent latency -------------------------------------------------------------


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def latency(sizes: Sizes, progress: Progress, backend: Backend = EMBEDDED) -> list[Metric]:
    """Single-agent runs over one run stream (Client.run_stream): one at a
    time for the round trip, then 64 at once for the rate."""
    k, where = backend.key, backend.label

    def versus(key: str) -> str:
        return key if backend.replicas else ""

    p50 = Metric(
        f"latency{k}_p50_us",
        f"single-agent round trip p50{where}",
        "µs",
        "lower",
        target=None if backend.replicas else 300,
        compare=["raw.pingpong_p50_us", "autogen.sequential_p50_us"],
        embedded=versus("latency_p50_us"),
        target_x=2.0 if backend.replicas else None,
    )
    p99 = Metric(
        f"latency{k}_p99_us",
        f"single-agent round trip p99{where}",
        "µs",
        "lower",
        target=None if backend.replicas else 1_000,
        compare=["raw.pingpong_p99_us", "autogen.sequential_p99_us"],
        embedded=versus("latency_p99_us"),
    )
    cpu = Metric(
        f"latency{k}_cpu_us",
        f"single-agent run{where}: {'sidecars + Redis' if backend.replicas else 'sidecar'} CPU",
        "µs",
        "lower",
        embedded=versus("latency_cpu_us"),
    )
    redis_cpu = [Metric(f"latency{k}_redis_cpu_us", "  of which Redis", "µs", "lower")] if backend.replicas else []
    rate = Metric(
        f"single_runs_64{k}_per_s",
        f"single-agent runs, 64 in flight{where}",
        "runs/s",
        "higher",
        compare=["raw.pipelined_msgs_per_s", "autogen.concurrent64_msgs_per_s"],
        embedded=versus("single_runs_64_per_s"),
    )
    name = f"latency{where}"
    with deploy(backend, 1, max_in_flight=64, heartbeat_ms=sizes.heartbeat_ms) as deployed:
        async with Client(deployed.address) as client, client.run_stream() as stream:

            async def one() -> float:
                started = time.perf_counter()
                finished = await stream.run(single(agent("echo"), PAYLOAD))
                elapsed = time.perf_counter() - started
                if finished.status != types_pb2.RUN_STATUS_SUCCEEDED or finished.result.single.output.answer != PAYLOAD:
                    raise RuntimeError(f"single run ended {finished.status}: {finished.reason} {finished.detail}")
                return elapsed * 1e6

            async def lane(count: int) -> None:
                for _ in range(count):
                    await one()

            progress(f"{name}: warm-up")
            for _ in range(max(sizes.latency_runs // 5, 10)):
                await one()
            for i in range(sizes.runs):
                progress(f"{name}: run {i + 1}/{sizes.runs}")
                cpu0, redis0 = deployed.cpu_seconds(), deployed.redis_cpu_seconds()
                samples = sorted([await one() for _ in range(sizes.latency_runs)])
                cpu.values.append((deployed.cpu_seconds() - cpu0) / sizes.latency_runs * 1e6)
                for m in redis_cpu:
                    m.values.append((deployed.redis_cpu_seconds() - redis0) / sizes.latency_runs * 1e6)
                p50.values.append(_percentile(samples, 0.50))
                p99.values.append(_percentile(samples, 0.99))
                per_lane = max(sizes.latency_runs // 8, 1)
                started = time.perf_counter()
                await asyncio.gather(*(lane(per_lane) for _ in range(64)))
                rate.values.append(64 * per_lane / (time.perf_counter() - started))
    return [p50, p99, cpu, *redis_cpu, rate]


# -- 3. runtime calls ----------------------------------------------------------------------


async def runtime_calls(sizes: Sizes, progress: Progress) -> list[Metric]:
    one = Metric(
        "calls_1_agent_per_s",
        "state get/set, 1 agent",
        "calls/s",
        "higher",
        compare=["raw.pingpong_rt_per_s", "autogen.sequential_rt_per_s"],
        note="sequential calls: each waits for its answer",
    )
    many = Metric(
        f"calls_{sizes.call_agents}_agents_per_s",
        f"state get/set, {sizes.call_agents} agents",
        "calls/s",
        "higher",
        compare=["raw.pipelined_msgs_per_s", "autogen.concurrent64_msgs_per_s"],
    )
    with cluster(1, max_in_flight=max(sizes.call_agents, 8)) as (sidecar, _):
        async with Client(sidecar.address) as client:
            pairs = str(sizes.call_pairs)
            progress("runtime calls: warm-up")
            await client.run(single(agent("state"), str(max(sizes.call_pairs // 10, 5))))
            for i in range(sizes.runs):
                progress(f"runtime calls: run {i + 1}/{sizes.runs}")
                started = time.perf_counter()
                run = await client.run(single(agent("state"), pairs))
                elapsed = time.perf_counter() - started
                _check(run, "state agent")
                one.values.append(2 * sizes.call_pairs / elapsed)
                per_agent = max(sizes.call_pairs // sizes.call_agents, 1)
                elapsed = await _map_reduce(client, "state", [str(per_agent)] * sizes.call_agents, sizes.call_agents)
                many.values.append(2 * per_agent * sizes.call_agents / elapsed)
    return [one, many]


# -- 4. fan-out -----------------------------------------------------------------------------


async def fan_out(sizes: Sizes, progress: Progress, backend: Backend = EMBEDDED) -> list[Metric]:
    k, where = backend.key, backend.label

    def versus(key: str) -> str:
        return key if backend.replicas else ""

    delivered = Metric(
        f"fanout{k}_events_per_s",
        f"events delivered to {sizes.watchers} watchers{where}",
        "events/s",
        "higher",
        embedded=versus("fanout_events_per_s"),
    )
    alone = Metric(
        f"fanout{k}_run_alone_runs_per_s",
        f"watched run's throughput, no watchers{where}",
        "agent runs/s",
        "higher",
        embedded=versus("fanout_run_alone_runs_per_s"),
    )
    watched = Metric(
        f"fanout{k}_run_watched_runs_per_s",
        f"watched run's throughput, {sizes.watchers} watchers{where}",
        "agent runs/s",
        "higher",
        embedded=versus("fanout_run_watched_runs_per_s"),
    )
    name = f"fan-out{where}"
    items = [str(i) for i in range(sizes.fanout_items)]
    with deploy(backend, 1, max_in_flight=sizes.max_concurrent, heartbeat_ms=sizes.heartbeat_ms) as deployed:
        async with Client(deployed.address) as client:

            async def watch_all(run_id: str) -> int:
                count = 0
                async for _ in client.watch(run_id):
                    count += 1
                return count

            progress(f"{name}: warm-up")
            await _map_reduce(client, "noop", items[: max(len(items) // 4, 10)], sizes.max_concurrent)
            for i in range(sizes.runs):
                progress(f"{name}: run {i + 1}/{sizes.runs}")
                alone.values.append((len(items) + 1) / await _map_reduce(client, "noop", items, sizes.max_concurrent))
                started = time.perf_counter()
                handle = await client.start_run(
                    map_reduce(agent("noop"), agent("noop"), "bench", items, max_concurrent=sizes.max_concurrent)
                )
                watchers = [asyncio.ensure_future(watch_all(handle.run_id)) for _ in range(sizes.watchers)]
                run = await client.wait(handle.run_id)
                run_elapsed = time.perf_counter() - started
                counts = await asyncio.gather(*watchers)
                all_elapsed = time.perf_counter() - started
                _check(run, "watched map-reduce")
                if len(set(counts)) != 1 or counts[0] != run.last_seq:
                    raise RuntimeError(f"watchers saw {sorted(set(counts))} events, the run has {run.last_seq}")
                watched.values.append((len(items) + 1) / run_elapsed)
                delivered.values.append(sum(counts) / all_elapsed)
    return [delivered, alone, watched]


# -- 4b. watchers that never read ---------------------------------------------------------------


async def _open_stalled(address: str, run_id: str, count: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """`count` WatchRun streams on `run_id` that are never read (on channels of
    at most 500 streams each, under the sidecar's max_streams_per_connection)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range((count + 499) // 500)]
    calls = [
        runs_pb2_grpc.RunServiceStub(channels[i // 500]).WatchRun(runs_pb2.WatchRunRequest(run_id=run_id))
        for i in range(count)
    ]
    return channels, calls


async def _drain(call: Any) -> None:
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            pass


async def stalled_watchers(sizes: Sizes, progress: Progress) -> list[Metric]:
    """One map-reduce watched by `stalled` WatchRun streams that are never read
    (default client channels), against the same run unwatched, in the same
    sidecar: the sidecar's RSS growth (its peak while the run goes, over its
    RSS before), the run's own duration (its record's start to finish) with
    and without them, and how long a reading client takes to see it end."""
    n = sizes.stalled
    growth = Metric("stalled_rss_growth_mb", f"RSS added by {n:,} non-reading watchers", "MB", "lower", target=200)
    slowdown = Metric(
        "stalled_slowdown", f"run duration with {n:,} non-reading watchers / without", "x", "lower", target=1.5
    )
    seen = Metric("stalled_seen_slowdown", "the same, until a reading client sees the end", "x", "lower")
    alone_s = Metric("stalled_alone_s", f"{sizes.stalled_items:,}-item map-reduce, no watchers", "s", "lower")
    watched_s = Metric("stalled_watched_s", f"the same, {n:,} non-reading watchers", "s", "lower")
    items = [str(i) for i in range(sizes.stalled_items)]
    sidecar = Sidecar(env={"CARSVC_MAX_WATCHERS_PER_RUN": str(n + 10)})
    worker = WorkerProcess(sidecar.address, worker_id="bench-0", max_in_flight=sizes.max_concurrent)

    def duration(run: Any) -> float:
        return float(run.finished_unix_ms - run.started_unix_ms) / 1000

    async def one(watchers: int) -> tuple[float, float, float]:
        """(run duration, until seen, peak RSS growth in bytes)"""
        before = await _settle_rss(sidecar)
        started = time.perf_counter()
        handle = await client.start_run(
            map_reduce(agent("noop"), agent("noop"), "bench", items, max_concurrent=sizes.max_concurrent)
        )
        channels, calls = await _open_stalled(sidecar.address, handle.run_id, watchers)
        peak = sidecar.rss_bytes()
        waiting = asyncio.ensure_future(client.wait(handle.run_id))
        while not waiting.done():
            peak = max(peak, sidecar.rss_bytes())
            await asyncio.wait({waiting}, timeout=0.05)
        until_seen = time.perf_counter() - started
        run = waiting.result()
        _check(run, "map-reduce with non-reading watchers")
        peak = max(peak, await _settle_rss(sidecar))
        await asyncio.gather(*(_drain(call) for call in calls))
        for channel in channels:
            await channel.close()
        return duration(run), until_seen, peak - before

    try:
        async with Client(sidecar.address) as client:
            progress("stalled watchers: warm-up")
            await _map_reduce(client, "noop", items[: max(len(items) // 4, 10)], sizes.max_concurrent)
            for i in range(sizes.runs):
                progress(f"stalled watchers: run {i + 1}/{sizes.runs}")
                alone, alone_seen, _ = await one(0)
                watched, watched_seen, grown = await one(n)
                alone_s.values.append(alone)
                watched_s.values.append(watched)
                slowdown.values.append(watched / alone)
                seen.values.append(watched_seen / alone_seen)
                growth.values.append(grown / 2**20)
    finally:
        worker.stop()
        sidecar.stop()
    return [growth, slowdown, seen, alone_s, watched_s]


# -- 5. memory --------------------------------------------------------------------------------


async def _settle_rss(sidecar: Sidecar) -> int:
    """RSS once it stops moving (allocations after the last reply settle)."""
    last = sidecar.rss_bytes()
    for _ in range(20):
        await asyncio.sleep(0.1)
        now = sidecar.rss_bytes()
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


async def memory_retained(sizes: Sizes, progress: Progress) -> list[Metric]:
    rss = Metric(
        "rss_retained_mb", f"sidecar RSS, {sizes.retained_runs:,} finished runs retained", "MB", "lower", target=200
    )
    per_run = Metric("bytes_per_retained_run", "bytes per retained run", "B", "lower")
    for i in range(sizes.runs):
        progress(f"memory (retained runs): run {i + 1}/{sizes.runs}")
        with cluster(1, max_in_flight=64) as (sidecar, _):
            async with Client(sidecar.address) as client:
                await client.run(single(agent("echo"), PAYLOAD))  # everything imported and warm
                before = await _settle_rss(sidecar)
                gate = asyncio.Semaphore(64)

                async def one(gate: asyncio.Semaphore = gate) -> None:
                    async with gate:
                        _check(await client.run(single(agent("echo"), PAYLOAD)), "retained run")

                await asyncio.gather(*(one() for _ in range(sizes.retained_runs)))
                listed = await client.list_runs(page_size=1000)
                if len(listed) < sizes.retained_runs:
                    raise RuntimeError(f"only {len(listed)} runs are retained")
                after = await _settle_rss(sidecar)
        rss.values.append(after / 2**20)
        per_run.values.append((after - before) / sizes.retained_runs)
    return [rss, per_run]


async def memory_in_flight(sizes: Sizes, progress: Progress) -> list[Metric]:
    """`worker_connections` worker sessions (spread over `worker_processes`
    processes) hold `in_flight` assignments at once; the run must succeed."""
    rss = Metric("rss_in_flight_mb", f"sidecar RSS, {sizes.in_flight:,} assignments in flight", "MB", "lower")
    per_assignment = Metric("bytes_per_in_flight_assignment", "bytes per in-flight assignment", "B", "lower")
    connected = Metric(
        "workers_connected",
        "worker sessions connected at once",
        "workers",
        "higher",
        target=1_000 if sizes.worker_connections >= 1_000 else None,
    )
    peak = Metric(
        "assignments_in_flight",
        "assignments in flight at once",
        "assignments",
        "higher",
        target=10_000 if sizes.in_flight >= 10_000 else None,
    )
    per_process = sizes.worker_connections // sizes.worker_processes
    slots = -(-sizes.in_flight // sizes.worker_connections)
    for i in range(sizes.runs):
        progress(f"memory (in flight): run {i + 1}/{sizes.runs}")
        sidecar = Sidecar()
        procs: list[WorkerProcess] = []
        try:
            for p in range(sizes.worker_processes):
                procs.append(
                    WorkerProcess(
                        sidecar.address,
                        worker_id=f"many-{p}",
                        max_in_flight=slots,
                        connections=per_process,
                        ready_timeout=120,
                    )
                )
            async with Client(sidecar.address) as client:
                workers = await client.list_workers()
                before = await _settle_rss(sidecar)
                hold_s = 2.0 + sizes.in_flight / 4_000  # long enough to fill every slot
                handle = await client.start_run(
                    map_reduce(
                        agent("hold"),
                        agent("noop"),
                        "bench",
                        [f"{hold_s:.2f}"] * sizes.in_flight,
                        max_concurrent=sizes.in_flight,
                    )
                )
                held = 0
                deadline = time.monotonic() + hold_s
                while time.monotonic() < deadline and held < sizes.in_flight:
                    held = sum(w.in_flight for w in await client.list_workers())
                    await asyncio.sleep(0.1)
                during = sidecar.rss_bytes()
                run = await client.wait(handle.run_id)
                _check(run, f"map-reduce holding {sizes.in_flight} assignments")
                errors = [o.error for o in run.result.map_reduce.map_outputs if o.error]
                if errors:
                    raise RuntimeError(f"{len(errors)} assignments failed, e.g. {errors[0]}")
        finally:
            for proc in procs:
                proc.stop()
            sidecar.stop()
        connected.values.append(len(workers))
        peak.values.append(held)
        rss.values.append(during / 2**20)
        per_assignment.values.append((during - before) / max(held, 1))
    return [connected, peak, rss, per_assignment]
