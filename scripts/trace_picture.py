"""Draws docs/images/trace-map-reduce.png: the spans of a real map-reduce run as a
trace view shows them (docs/operations.md, "Traces").

    python scripts/trace_picture.py [--out docs/images/trace-map-reduce.png]

A sidecar (service `carsvc`) and a Python worker (service `worker-python`, whose
program uses OpenTelemetry) run in this process, each with its own tracer
provider; a client starts a map-reduce over three items under a traceparent of
its own. Each mapper reads and writes the run's state and makes a (pretend)
model call, a span of its own. Every span is caught in memory and drawn as a
waterfall: one row a span, indented under its parent, coloured by service."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from carsvc.client import Client, agent, map_reduce
from carsvc.config import Settings
from carsvc.server import Sidecar
from carsvc.telemetry.otel import OtelTelemetry
from carsvc.worker import AgentContext, Result, Worker

ROOT = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
COLOURS = {"carsvc": "#1f77b4", "worker-python": "#ff7f0e"}


def provider(service: str, exporter: InMemorySpanExporter) -> TracerProvider:
    made = TracerProvider(resource=Resource.create({"service.name": service}))
    made.add_span_processor(SimpleSpanProcessor(exporter))
    return made


async def run_map_reduce(exporter: InMemorySpanExporter) -> None:
    sidecar_provider = provider("carsvc", exporter)
    worker_provider = provider("worker-python", exporter)
    trace.set_tracer_provider(worker_provider)  # the worker program's OpenTelemetry
    tracer = trace.get_tracer("example-worker")
    sidecar = Sidecar(Settings(port=0, log_level="WARNING"), telemetry=OtelTelemetry(sidecar_provider))
    await sidecar.start()
    worker = Worker(sidecar.address, worker_id="worker-1", max_in_flight=4)

    async def summarize(ctx: AgentContext) -> Result:
        seen = await ctx.state.get("seen", 0)
        await ctx.state.set("seen", seen + 1)
        with tracer.start_as_current_span(
            "chat gpt-4o-mini", kind=trace.SpanKind.CLIENT, attributes={"gen_ai.operation.name": "chat"}
        ):
            await asyncio.sleep(0.04 + 0.03 * int(ctx.name.rsplit("_", 1)[-1]))  # the model answering
        return Result(answer=f"summary of {ctx.task[-8:]}", input_tokens=180, output_tokens=40, cost_usd=0.0002)

    async def combine(ctx: AgentContext) -> Result:
        with tracer.start_as_current_span(
            "chat gpt-4o-mini", kind=trace.SpanKind.CLIENT, attributes={"gen_ai.operation.name": "chat"}
        ):
            await asyncio.sleep(0.03)
        return Result(answer="combined", input_tokens=300, output_tokens=60, cost_usd=0.0004)

    worker.add_agent("summarizer", summarize)
    worker.add_agent("combiner", combine)
    serving = asyncio.create_task(worker.run())
    await worker.connected.wait()
    try:
        async with Client(sidecar.address) as client:
            pattern = map_reduce(agent("summarizer"), agent("combiner"), "Summarize", ["a.py", "b.py", "c.py"])
            request = Client._start_request(pattern, thread_id="docs-thread")
            started = await client.runs.StartRun(request, metadata=(("traceparent", TRACEPARENT),))
            await client.wait(started.run.run_id)
    finally:
        await worker.stop()
        await serving
        await sidecar.stop(grace=0.5)
        sidecar_provider.shutdown()
        worker_provider.shutdown()


def draw(spans: list[ReadableSpan], out: Path) -> None:
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    def depth(s: ReadableSpan) -> int:
        d = 0
        while s.parent is not None and s.parent.span_id in by_id:
            s = by_id[s.parent.span_id]
            d += 1
        return d

    # Depth-first, children in start order: the order a trace view lists them.
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None and s.parent.span_id in by_id else None
        children.setdefault(parent, []).append(s)
    ordered: list[ReadableSpan] = []

    def walk(parent: int | None) -> None:
        for s in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            ordered.append(s)
            walk(s.context.span_id if s.context is not None else None)

    walk(None)
    start = min(s.start_time or 0 for s in ordered)
    end = max(s.end_time or 0 for s in ordered)
    total_ms = (end - start) / 1e6
    fig, ax = plt.subplots(figsize=(12, 0.32 * len(ordered) + 1.2))
    for row, s in enumerate(ordered):
        service = str(s.resource.attributes.get("service.name", ""))
        left = ((s.start_time or 0) - start) / 1e6
        took = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
        width = max(took, total_ms / 300)
        ax.barh(row, width, left=left, height=0.7, color=COLOURS.get(service, "#2ca02c"))
        label = "   " * depth(s) + s.name
        ax.text(-0.42, row, label, ha="left", va="center", fontsize=8, family="monospace",
                transform=ax.get_yaxis_transform())
        shown = f"{took:.1f} ms" if took >= 1 else f"{took * 1000:.0f} µs"
        ax.text(left + width + total_ms * 0.005, row, shown, va="center", fontsize=7, color="#444")
    ax.set_ylim(len(ordered) - 0.4, -0.6)
    ax.set_xlim(0, total_ms * 1.08)
    ax.set_yticks([])
    ax.set_xlabel("ms since the run started")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=COLOURS[service]) for service in ("carsvc", "worker-python")]
    ax.legend(handles, ["carsvc (sidecar)", "worker-python"], loc="upper center", bbox_to_anchor=(0.5, -0.08),
              ncol=2, fontsize=8, frameon=False)
    trace_id = f"{ordered[0].context.trace_id:032x}" if ordered[0].context is not None else ""
    ax.set_title(f"a map-reduce over 3 items: one trace ({trace_id}), client → sidecar → worker → model", fontsize=10)
    fig.subplots_adjust(left=0.3, right=0.97, top=0.93, bottom=0.16)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/images/trace-map-reduce.png")
    args = parser.parse_args()
    exporter = InMemorySpanExporter()
    asyncio.run(run_map_reduce(exporter))
    draw(list(exporter.get_finished_spans()), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
