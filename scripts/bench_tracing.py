"""What tracing costs the sidecar (docs/operations.md, "Traces": the numbers).

    python scripts/bench_tracing.py [--runs 2000] [--concurrency 32] [--rounds 3]

Starts a sidecar in this process and an echo worker in another (a Python
worker whose agent reads and writes one state key, so each run has one agent
step and two runtime calls), then runs single-agent runs with tracing off, and
on (every span made and handed to a batch processor whose exporter drops it:
the cost of the spans themselves, not of a network), alternating, and prints
runs/s and the sidecar's CPU per run for each. It also times the hooks a run
calls when tracing is off (the no-op port) per run."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import textwrap
import time
import timeit
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from carsvc._proto.car.v1 import types_pb2, worker_pb2
from carsvc.client import Client, agent, single
from carsvc.config import Settings
from carsvc.domain import tracing
from carsvc.server import Sidecar
from carsvc.telemetry.otel import OtelTelemetry

WORKER = textwrap.dedent(
    """
    import sys
    from carsvc.worker import Worker

    worker = Worker(sys.argv[1], max_in_flight=64)

    @worker.agent("echo")
    async def echo(ctx):
        n = await ctx.state.get("n", 0)
        await ctx.state.set("n", n + 1)
        return ctx.task

    worker.serve()
    """
)


class Dropped(SpanExporter):
    """Takes every span and keeps none."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


async def measure(address: str, runs: int, concurrency: int) -> tuple[float, float]:
    """Runs/s, and CPU milliseconds per run of this process (the sidecar and the client)."""
    async with Client(address) as client:
        pending = iter(range(runs))

        async def loop() -> None:
            for i in pending:
                run = await client.run(single(agent("echo"), f"task {i}"))
                assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return runs / wall, cpu * 1000 / runs


async def one_round(traced: bool, runs: int, concurrency: int) -> tuple[float, float, int]:
    dropped = Dropped()
    telemetry = None
    if traced:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(dropped, max_queue_size=1 << 16))
        telemetry = OtelTelemetry(provider, owned=True)
    sidecar = Sidecar(Settings(port=0, log_level="WARNING"), telemetry=telemetry)
    await sidecar.start()
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, sidecar.address, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        while not any(s.serves("echo") for s in sidecar.dispatcher.sessions.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await measure(sidecar.address, min(200, runs), concurrency)  # warm up
        rate, cpu_ms = await measure(sidecar.address, runs, concurrency)
    finally:
        worker.terminate()
        await worker.wait()
        await sidecar.stop(grace=0.5)
    return rate, cpu_ms, dropped.spans


def hooks_ns(tracer: tracing.Tracer, n: int) -> float:
    """Nanoseconds a run with one agent step and two runtime calls spends in
    the tracing port's hooks (with `tracer`; NO_TRACER when off)."""
    spec = types_pb2.AgentSpec(name="a")
    output = types_pb2.AgentOutput(name="a", answer="ok", turns=1)
    output.tokens.input_tokens = 10
    calls = {"state_get": worker_pb2.StateGetCall(key="n"), "state_set": worker_pb2.StateSetCall(key="n")}

    def one_run() -> None:
        run = tracer.run(run_id="r", thread_id="t", pattern="single", owner="", parent=tracing.EMPTY)
        step = tracing.parent_of(run).agent(spec, step="single", role="agent", index=0)
        step.carrier()
        step.placed("w", 1)
        for op, arg in calls.items():
            step.call(op, arg).end()
        step.end(output)
        run.end("RUN_STATUS_SUCCEEDED", "completed", "", types_pb2.BudgetSnapshot())

    return min(timeit.repeat(one_run, number=n, repeat=5)) / n * 1e9


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for _ in range(args.rounds):
        for traced in (False, True):
            results[traced].append(await one_round(traced, args.runs, args.concurrency))
    print(f"{args.runs} single-agent runs, {args.concurrency} at a time, median of {args.rounds} rounds:")
    for traced, rows in results.items():
        rate = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        spans = rows[-1][2]
        state = "on " if traced else "off"
        print(f"  tracing {state}: {rate:8.0f} runs/s  {cpu:6.3f} ms CPU/run (sidecar + client)  spans {spans}")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=1 << 16))
    print(f"  the tracing hooks of one run, off: {hooks_ns(tracing.NO_TRACER, 200_000):.0f} ns")
    on_us = hooks_ns(OtelTelemetry(provider).tracer, 5_000) / 1000
    print(f"  the tracing hooks of one run, on (4 spans): {on_us:.0f} us")
    provider.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
