"""The sidecar's OpenTelemetry spans (docs/operations.md, "Traces"), caught by an
in-memory exporter: a run's span under the client's traceparent, its agent steps
(GenAI conventions) and their runtime calls under it, agents a call runs under
the call, the worker's span under the step, and nothing imported when off."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from carsvc._proto.car.v1 import types_pb2
from carsvc.client import Client, agent, delegator, deny, single
from carsvc.config import Settings
from carsvc.domain import tracing
from carsvc.server import Sidecar
from carsvc.telemetry import start_telemetry, wanted
from carsvc.telemetry.otel import OtelTelemetry, exporters
from carsvc.worker import AgentContext, Result
from tests.conftest import TEST_SETTINGS, Workers

ROOT = Path(__file__).resolve().parents[1]
SUCCEEDED = types_pb2.RUN_STATUS_SUCCEEDED
# A client's span: trace 0af7651916cd43dd8448eb211c80319c, span b7ad6b7169203331.
CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
async def sidecar(settings: Settings, provider: TracerProvider) -> AsyncIterator[Sidecar]:
    server = Sidecar(settings, telemetry=OtelTelemetry(provider))
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
def worker_tracing(provider: TracerProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process worker uses "the program's" OpenTelemetry: this provider."""
    monkeypatch.setattr(trace, "get_tracer", lambda *args, **kwargs: provider.get_tracer(*args, **kwargs))


def named(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def parent_id(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return int(span.parent.span_id)


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


async def start_traced(client: Client, pattern: Any, **options: Any) -> str:
    """StartRun with a client's traceparent in the call's metadata."""
    request = Client._start_request(pattern, **options)
    handle = await client.runs.StartRun(request, metadata=(("traceparent", TRACEPARENT),))
    return str(handle.run.run_id)


async def test_a_run_is_a_child_of_the_clients_span_with_its_steps_and_calls(
    client: Client, workers: Workers, exporter: InMemorySpanExporter, worker_tracing: None
) -> None:
    async def writer(ctx: AgentContext) -> Result:
        drafts = await ctx.state.get("drafts", 0)
        await ctx.state.set("drafts", drafts + 1)
        ctx.progress("halfway", 0.5)  # an event, not a span
        return Result(answer="a haiku", input_tokens=120, output_tokens=30, cost_usd=0.0004)

    await workers.start({"writer": writer}, worker_id="w-1")
    ref = agent("writer", metadata={"model": "gpt-x"})
    run_id = await start_traced(client, single(ref, "write"), thread_id="t-1", agent_id="alice")
    assert (await client.wait(run_id)).status == SUCCEEDED
    await workers.stop_all()
    spans = list(exporter.get_finished_spans())

    run = named(spans, "run single")
    assert trace_id(run) == CLIENT_TRACE and parent_id(run) == CLIENT_SPAN
    assert run.kind is SpanKind.INTERNAL
    assert dict(run.attributes or {}) == {
        "carsvc.run.id": run_id,
        "carsvc.thread.id": "t-1",
        "carsvc.run.pattern": "single",
        "carsvc.run.owner": "alice",
        "carsvc.run.status": "RUN_STATUS_SUCCEEDED",
        "carsvc.run.termination_reason": "completed",
        "carsvc.run.agents": 1,
        "carsvc.run.input_tokens": 120,
        "carsvc.run.output_tokens": 30,
        "carsvc.run.cost_usd": 0.0004,
    }

    sidecar_step, worker_step = sorted(
        (s for s in spans if s.name == "invoke_agent writer"), key=lambda s: s.kind is SpanKind.SERVER
    )
    assert sidecar_step.kind is SpanKind.CLIENT and parent_id(sidecar_step) == span_id(run)
    assert trace_id(sidecar_step) == CLIENT_TRACE
    assert dict(sidecar_step.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "writer",
        "gen_ai.conversation.id": "t-1",
        "gen_ai.request.model": "gpt-x",
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 30,
        "carsvc.usage.cost_usd": 0.0004,
        "carsvc.run.id": run_id,
        "carsvc.assignment.id": f"{run_id}:single",
        "carsvc.step": "single",
        "carsvc.role": "agent",
        "carsvc.index": 0,
        "carsvc.worker.id": "w-1",
        "carsvc.attempt": 1,
        "carsvc.agent.turns": 1,
    }
    assert [e.name for e in sidecar_step.events] == ["placed"]
    assert sidecar_step.status.status_code is StatusCode.UNSET

    # The worker's span (the Python SDK, with "the program's" OpenTelemetry) is the
    # server side of the hop: a child of the sidecar's step, in the client's trace.
    assert worker_step.kind is SpanKind.SERVER and parent_id(worker_step) == span_id(sidecar_step)
    assert trace_id(worker_step) == CLIENT_TRACE
    attributes = dict(worker_step.attributes or {})
    assert attributes["carsvc.worker.id"] == "w-1" and attributes["carsvc.attempt"] == 1
    assert attributes["gen_ai.usage.output_tokens"] == 30

    # Runtime calls are children of the step; progress is not a span.
    calls = [s for s in spans if s.attributes and "carsvc.call.op" in s.attributes]
    assert [(c.name, (c.attributes or {})["carsvc.state.key"]) for c in calls] == [
        ("state_get", "drafts"),
        ("state_set", "drafts"),
    ]
    assert all(parent_id(c) == span_id(sidecar_step) for c in calls)
    assert len(spans) == 5


async def test_agents_a_call_runs_are_children_of_the_call(
    client: Client, workers: Workers, exporter: InMemorySpanExporter
) -> None:
    async def main(ctx: AgentContext) -> str:
        out = await ctx.delegate("researcher", "find it")
        return f"main: {out.answer}"

    async def researcher(ctx: AgentContext) -> str:
        return "found"

    await workers.start({"main": main, "researcher": researcher}, max_in_flight=4)
    run = await client.run(delegator(agent("main"), [agent("researcher")], "go"))
    assert run.status == SUCCEEDED
    spans = list(exporter.get_finished_spans())
    root = named(spans, "run delegator")
    assert root.parent is None  # no client context: a trace of its own
    main_step = named(spans, "invoke_agent main")
    call = named(spans, "delegate")
    specialist = named(spans, "invoke_agent researcher")
    assert parent_id(main_step) == span_id(root)
    assert parent_id(call) == span_id(main_step)
    assert (call.attributes or {})["carsvc.delegate.specialist"] == "researcher"
    assert parent_id(specialist) == span_id(call)
    assert (specialist.attributes or {})["carsvc.role"] == "specialist"
    assert {trace_id(s) for s in spans} == {trace_id(root)}


async def test_a_suspension_awaiting_its_decision_and_a_failed_run(
    client: Client, workers: Workers, exporter: InMemorySpanExporter
) -> None:
    async def ops(ctx: AgentContext) -> str:
        decision = await ctx.suspend_tool_call("call-1", "shell", {"cmd": "rm"}, reason="destructive")
        raise RuntimeError(f"denied: {decision.reason}")

    await workers.start({"ops": ops})
    handle = await client.start_run(
        single(agent("ops", tools=["shell"]), "t"),
        agent_id="a",
        initial_decisions=[deny("call-1", "preset", decision_id="d1")],
    )
    run = await client.wait(handle.run_id)
    assert run.status == types_pb2.RUN_STATUS_FAILED
    spans = list(exporter.get_finished_spans())
    step = named(spans, "invoke_agent ops")
    waited = named(spans, "await_decision shell")
    assert parent_id(waited) == span_id(step)
    assert {k: v for k, v in (waited.attributes or {}).items() if not k.startswith("carsvc.run")} == {
        "carsvc.call.op": "suspend_tool_call",
        "gen_ai.tool.name": "shell",
        "gen_ai.tool.call.id": "call-1",
        "carsvc.decision.action": "cancel",
        "carsvc.decision.id": "d1",
        "carsvc.decision.reason": "preset",
    }
    assert step.status.status_code is StatusCode.ERROR
    assert (step.attributes or {})["error.type"] == "agent_error"
    assert step.status.description == "RuntimeError: denied: preset"
    root = named(spans, "run single")
    assert root.status.status_code is StatusCode.ERROR
    assert (root.attributes or {})["carsvc.run.termination_reason"] == "agent_failed"
    assert (root.attributes or {})["error.type"] == "agent_failed"


async def test_every_attempt_carries_the_steps_context_to_the_worker(
    client: Client, workers: Workers, exporter: InMemorySpanExporter
) -> None:
    seen: list[dict[str, str]] = []

    async def writer(ctx: AgentContext) -> str:
        seen.append(dict(ctx.assignment.trace_context))
        return "ok"

    await workers.start({"writer": writer})
    run_id = await start_traced(client, single(agent("writer"), "t"))
    await client.wait(run_id)
    step = named(list(exporter.get_finished_spans()), "invoke_agent writer")
    assert seen == [{"traceparent": f"00-{CLIENT_TRACE:032x}-{span_id(step):016x}-01"}]


def test_the_domain_and_patterns_never_import_opentelemetry() -> None:
    for package in ("carsvc/domain", "carsvc/patterns", "carsvc/services", "carsvc/backends"):
        for path in sorted((ROOT / package).rglob("*.py")):
            assert "opentelemetry" not in path.read_text(), path


def test_the_port_is_a_no_op_when_off() -> None:
    run = tracing.NO_TRACER.run(run_id="r", thread_id="t", pattern="single", owner="", parent=tracing.EMPTY)
    step = tracing.parent_of(run).agent(types_pb2.AgentSpec(name="a"), step="s", role="r", index=0)
    for hook in (run, step, step.call("state_get", None)):
        assert hook is tracing.OFF
    assert step.carrier() == {}


def test_whether_to_trace() -> None:
    auto = Settings()
    assert not wanted(auto, {})
    assert wanted(auto, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert wanted(auto, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert wanted(auto, {"OTEL_TRACES_EXPORTER": "console"})
    assert not wanted(auto, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not wanted(auto, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert wanted(Settings(tracing="on"), {})
    assert not wanted(Settings(tracing="off"), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert start_telemetry(auto, {}) is None
    with pytest.raises(ValueError, match="tracing must be 'auto', 'on' or 'off'"):
        Settings.from_env({"CARSVC_TRACING": "yes"})


def test_exporters_follow_the_otel_variables() -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    (default,) = exporters({})
    assert isinstance(default, Http)  # the specification's default: http/protobuf
    (grpc_one,) = exporters({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert isinstance(grpc_one, Grpc)
    assert [type(e) for e in exporters({"OTEL_TRACES_EXPORTER": "console,otlp"})] == [ConsoleSpanExporter, Http]
    with pytest.raises(ValueError, match="no installed package"):
        exporters({"OTEL_TRACES_EXPORTER": "nonesuch"})
    for exporter in (default, grpc_one):
        exporter.shutdown()


def test_off_imports_no_opentelemetry() -> None:
    """With tracing off (the default, no OTEL_* variables), a sidecar that serves
    a run and the worker that runs its agent import nothing of OpenTelemetry."""
    script = textwrap.dedent(
        """
        import asyncio, sys
        from carsvc.client import Client, agent, single
        from carsvc.config import Settings
        from carsvc.server import Sidecar
        from carsvc.worker import Worker

        async def main():
            sidecar = Sidecar(Settings(port=0, metrics_port=0))
            await sidecar.start()
            worker = Worker(sidecar.address)
            async def writer(ctx):
                await ctx.state.set("k", 1)
                return "ok"
            worker.add_agent("writer", writer)
            task = asyncio.create_task(worker.run())
            await worker.connected.wait()
            async with Client(sidecar.address) as client:
                run = await client.run(single(agent("writer"), "t"))
                assert run.result.single.output.answer == "ok", run
            await worker.stop()
            await task
            await sidecar.stop(grace=0.5)
            assert sidecar.telemetry is None
            loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
            print("loaded:", loaded)
            assert not loaded, loaded

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CARSVC_"))}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded: []" in done.stdout



async def test_a_step_relayed_to_another_replicas_worker_keeps_its_context(
    redis_url: str, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Replica b runs the run (traced); the only worker is on replica a, which
    relays the assignment with the same trace_context, and forwards the agent's
    runtime calls to b, where they are children of b's step span."""
    settings = dataclasses.replace(TEST_SETTINGS, backend=redis_url)
    a, b = Sidecar(settings), Sidecar(settings, telemetry=OtelTelemetry(provider))
    for replica in (a, b):
        await replica.start()
    pool = Workers(a.address)
    seen: list[dict[str, str]] = []

    async def writer(ctx: AgentContext) -> str:
        seen.append(dict(ctx.assignment.trace_context))
        await ctx.state.set("k", 1)
        return "ok"

    try:
        await pool.start({"writer": writer})
        async with asyncio.timeout(10):
            while not any(s.remote and s.serves("writer") for s in b.dispatcher.sessions.values()):
                await asyncio.sleep(0.05)
        async with Client(b.address) as client:
            run_id = await start_traced(client, single(agent("writer"), "t"))
            assert (await client.wait(run_id)).status == SUCCEEDED
    finally:
        await pool.stop_all()
        for replica in (a, b):
            await replica.stop(grace=0.5)
    spans = list(exporter.get_finished_spans())
    step = named(spans, "invoke_agent writer")
    assert seen == [{"traceparent": f"00-{CLIENT_TRACE:032x}-{span_id(step):016x}-01"}]
    assert (step.attributes or {})["carsvc.worker.id"] == f"replica {a.peers.replica_id if a.peers else ''}"
    call = named(spans, "state_set")
    assert parent_id(call) == span_id(step)
