"""One trace across four languages: a client's traceparent, the sidecar's spans
and the spans of workers in Go, TypeScript, Rust and Python (the otel-worker
programs: each sets up OpenTelemetry and exports with OTLP/gRPC), all sent to a
small OTLP receiver this test runs. The test checks one trace id and every
parent link across the hops: client -> run -> the sidecar's `invoke_agent` of
each stage -> the worker's `invoke_agent` -> the handler's `chat` span."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from carsvc._proto.car.v1 import patterns_pb2, types_pb2
from carsvc.client import Client, agent

from .harness import CLIENTS, ROOT, Process, Sidecar

pytestmark = [pytest.mark.crosslang, pytest.mark.timeout(180)]

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
SERVER, CLIENT = 2, 3  # OTLP's SpanKind values

WORKERS = {
    "go": [str(CLIENTS / "go/bin/otel-worker")],
    "ts": ["node", str(CLIENTS / "ts/dist/examples/otel-worker.js")],
    "rust": [str(CLIENTS / "rust/target/debug/carsvc-otel-worker")],
    "python": [sys.executable, str(ROOT / "tests/crosslang/otel_worker.py")],
}


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for s in scope_spans.spans:
                        self.spans.append(
                            Span(
                                service=str(resource.get("service.name", "")),
                                name=s.name,
                                kind=s.kind,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@contextmanager
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collected = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collected, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collected, port
    finally:
        server.stop(None).wait()


def otel_env(port: int, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


async def start_run(address: str) -> str:
    stages = [agent(f"traced-{lang}") for lang in WORKERS]
    async with Client(address) as client:
        request = Client._start_request(patterns_pb2.PipelineRun(stages=stages, task="trace me"))
        started = await client.runs.StartRun(request, metadata=(("traceparent", TRACEPARENT),))
        run = await client.wait(started.run.run_id)
        assert run.status == types_pb2.RUN_STATUS_SUCCEEDED, run
        return str(started.run.run_id)


def test_one_trace_from_the_client_through_the_sidecar_to_workers_in_four_languages(tmp_path: Path) -> None:
    for cmd in WORKERS.values():
        if not Path(cmd[-1]).exists():
            pytest.fail(f"{cmd[-1]} is missing: run `bash clients/build.sh` first")
    with receiver() as (collected, port):
        sidecar = Sidecar(tmp_path, otel_env(port, "carsvc"))
        sidecar.start()
        workers: list[Process] = []
        try:
            for lang, cmd in WORKERS.items():
                worker_id = f"otel-{lang}"
                proc = Process(
                    worker_id,
                    [*cmd, "--target", sidecar.address, "--agent", f"traced-{lang}", "--worker-id", worker_id],
                    tmp_path / f"{worker_id}.log",
                    otel_env(port, f"worker-{lang}"),
                )
                workers.append(proc)
                proc.wait_for(rf"^ready {worker_id} ", timeout=60)
            run_id = asyncio.run(start_run(sidecar.address))
            # Every worker's two spans, and the sidecar's run span, once exported.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                spans = collected.snapshot()
                if len([s for s in spans if s.service.startswith("worker-")]) >= 2 * len(WORKERS) and any(
                    s.name == "run pipeline" for s in spans
                ):
                    break
                time.sleep(0.2)
        finally:
            for proc in workers:
                proc.stop()
            sidecar.stop()
        spans = collected.snapshot()

    def one(service: str, name: str) -> Span:
        found = [s for s in spans if s.service == service and s.name == name]
        assert len(found) == 1, f"{service} {name}: {[(s.service, s.name) for s in spans]}"
        return found[0]

    assert {s.trace_id for s in spans} == {CLIENT_TRACE}, "every span is in the client's trace"
    run = one("carsvc", "run pipeline")
    assert run.parent_id == CLIENT_SPAN
    assert run.attributes["carsvc.run.id"] == run_id
    assert run.attributes["carsvc.run.status"] == "RUN_STATUS_SUCCEEDED"
    for lang in WORKERS:
        step = one("carsvc", f"invoke_agent traced-{lang}")
        assert step.kind == CLIENT and step.parent_id == run.span_id
        assert step.attributes["carsvc.worker.id"] == f"otel-{lang}"
        assert step.attributes["gen_ai.usage.output_tokens"] == 5
        handled = one(f"worker-{lang}", f"invoke_agent traced-{lang}")
        assert handled.kind == SERVER and handled.parent_id == step.span_id, lang
        assert handled.attributes["gen_ai.agent.name"] == f"traced-{lang}"
        assert handled.attributes["carsvc.assignment.id"] == step.attributes["carsvc.assignment.id"]
        assert handled.attributes["carsvc.worker.id"] == f"otel-{lang}"
        assert handled.attributes["gen_ai.usage.input_tokens"] == 10
        chat = one(f"worker-{lang}", "chat fake-model")
        assert chat.parent_id == handled.span_id, lang
