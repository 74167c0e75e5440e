"""A Python worker whose program uses OpenTelemetry (the Python member of the
otel-worker programs in clients/): it exports its spans with OTLP/gRPC
(OTEL_EXPORTER_OTLP_ENDPOINT and the other standard variables), so each
agent's "invoke_agent" span, made by carsvc.worker as a child of the sidecar's
span of the step, and the handler's own "chat" span under it join the client's
trace. tests/crosslang/test_tracing.py runs it:

    python tests/crosslang/otel_worker.py --target 127.0.0.1:50051 --agent traced-python
"""

from __future__ import annotations

import argparse

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from carsvc.worker import AgentContext, Result, Worker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--agent", default="traced-python")
    parser.add_argument("--worker-id", default=None)
    args = parser.parse_args()

    # Each span is exported as it ends (a batch would wait): the test reads them at once.
    provider = TracerProvider(resource=Resource.create())
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracer = trace.get_tracer("otel-worker")

    worker = Worker(
        args.target, worker_id=args.worker_id, on_connect=lambda s: print(f"ready {worker.worker_id} {s}", flush=True)
    )

    @worker.agent(args.agent)
    async def answer(ctx: AgentContext) -> Result:
        # The handler's own work (a model call) is a child of the agent's span.
        attributes = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "fake-model"}
        with tracer.start_as_current_span("chat fake-model", kind=trace.SpanKind.CLIENT, attributes=attributes):
            pass
        return Result(answer=f"python: {ctx.task}", input_tokens=10, output_tokens=5, cost_usd=0.001)

    try:
        worker.serve()
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
