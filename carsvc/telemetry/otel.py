"""The domain's tracing port (carsvc/domain/tracing.py) with OpenTelemetry.

Imported only when the sidecar traces (carsvc/telemetry/__init__.py). The
spans and their attributes are listed in docs/operations.md, "Traces"; agent
steps follow the OpenTelemetry GenAI semantic conventions (`invoke_agent
{name}`, `gen_ai.*`), and what those do not name is a `carsvc.*` attribute."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from carsvc._proto.car.v1 import types_pb2
from carsvc._version import __version__
from carsvc.domain.tracing import EMPTY, OFF, CallSpan, Carrier, incoming

log = logging.getLogger("carsvc.telemetry")

SCOPE = "carsvc"
# The metadata keys of W3C Trace Context (gRPC metadata keys are lower case).
TRACE_KEYS = ("traceparent", "tracestate")
_W3C = TraceContextTextMapPropagator()
_DECISIONS = {types_pb2.DECISION_ACTION_RESUME: "resume", types_pb2.DECISION_ACTION_CANCEL: "cancel"}
# Runtime calls that get no span: they only put an event on the run's stream.
_UNTRACED = frozenset({"emit", "progress"})


def _carrier_of(span: Span) -> dict[str, str]:
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _error(span: Span, error: str, error_type: str) -> None:
    span.set_status(Status(StatusCode.ERROR, error))
    span.set_attribute("error.type", error_type)


class _Call:
    """A runtime call's span."""

    __slots__ = ("agent_span", "span")

    def __init__(self, agent_span: _Agent, span: Span) -> None:
        self.agent_span = agent_span
        self.span = span

    def agent(self, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int) -> _Agent:
        run = self.agent_span.run
        return run.tracer.agent(run, trace.set_span_in_context(self.span), spec, step=step, role=role, index=index)

    def end(self, error: str = "", *, decision: types_pb2.ToolCallDecision | None = None) -> None:
        span = self.span
        if not span.is_recording():
            return
        if decision is not None:
            span.set_attribute("carsvc.decision.action", _DECISIONS.get(decision.action, "unspecified"))
            if decision.decision_id:
                span.set_attribute("carsvc.decision.id", decision.decision_id)
            if decision.reason:
                span.set_attribute("carsvc.decision.reason", decision.reason)
        if error:
            _error(span, error, "cancelled" if error.startswith("cancelled") else "call_error")
        span.end()


class _Agent:
    """An agent step's span: `invoke_agent {name}`, the client side of the hop to its worker."""

    __slots__ = ("_carrier", "run", "span")

    def __init__(self, run: _Run, span: Span) -> None:
        self.run = run
        self.span = span
        self._carrier: dict[str, str] | None = None

    def carrier(self) -> Carrier:
        if self._carrier is None:
            self._carrier = _carrier_of(self.span) if self.span.get_span_context().is_valid else {}
        return self._carrier

    def placed(self, worker_id: str, attempt: int) -> None:
        span = self.span
        span.set_attribute("carsvc.worker.id", worker_id)
        span.set_attribute("carsvc.attempt", attempt)
        span.add_event("placed", {"carsvc.worker.id": worker_id, "carsvc.attempt": attempt})

    def redispatched(self, reason: str, previous_worker_id: str, attempt: int) -> None:
        self.span.add_event(
            "redispatched",
            {"carsvc.reason": reason, "carsvc.previous_worker.id": previous_worker_id, "carsvc.attempt": attempt},
        )

    def unplaced(self, notice: str) -> None:
        self.span.add_event("unplaced", {"carsvc.notice": notice})

    def call(self, op: str, arg: Any) -> CallSpan:
        if op in _UNTRACED or not self.span.is_recording():
            return OFF
        name, attributes = _call_attributes(op, arg)
        attributes["carsvc.run.id"] = self.run.run_id
        span = self.run.tracer.otel.start_span(
            name, context=trace.set_span_in_context(self.span), kind=SpanKind.SERVER, attributes=attributes
        )
        return _Call(self, span)

    def end(self, output: types_pb2.AgentOutput) -> None:
        span = self.span
        if not span.is_recording():
            return
        if output.HasField("tokens"):
            span.set_attribute("gen_ai.usage.input_tokens", output.tokens.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", output.tokens.output_tokens)
            span.set_attribute("carsvc.usage.cost_usd", output.tokens.cost_usd)
        if output.turns:
            span.set_attribute("carsvc.agent.turns", output.turns)
        if output.tool_calls:
            span.set_attribute("carsvc.agent.tool_calls", output.tool_calls)
        if output.HasField("error"):
            if output.outcome.status == types_pb2.OUTCOME_STATUS_TIMEOUT:
                kind = "timeout"
            elif output.error.startswith("cancelled"):
                kind = "cancelled"
            else:
                kind = "agent_error"
            _error(span, output.error, kind)
        span.end()


def _call_attributes(op: str, arg: Any) -> tuple[str, dict[str, Any]]:
    """A runtime call's span name and attributes (never a value or a message's payload)."""
    attributes: dict[str, Any] = {"carsvc.call.op": op}
    name = op
    if op in ("state_get", "state_set", "state_delete"):
        attributes["carsvc.state.key"] = arg.key
    elif op == "state_keys":
        attributes["carsvc.state.prefix"] = arg.prefix
    elif op == "mailbox_send":
        attributes["carsvc.mailbox.to"] = "*" if arg.broadcast else arg.message.to_agent
    elif op == "delegate":
        attributes["carsvc.delegate.specialist"] = arg.specialist
    elif op == "spawn_subtask":
        attributes["carsvc.spawn.name"] = arg.name
    elif op == "suspend_tool_call":
        name = f"await_decision {arg.tool_name}"
        attributes["gen_ai.tool.name"] = arg.tool_name
        attributes["gen_ai.tool.call.id"] = arg.tool_call_id
    return name, attributes


def _model(spec: types_pb2.AgentSpec) -> str:
    """The model a spec's metadata names (`model`), if it names one."""
    if spec.HasField("metadata"):
        value = spec.metadata.fields.get("model")
        if value is not None and value.WhichOneof("kind") == "string_value":
            return value.string_value
    return ""


class _Run:
    """A run's span: `run {pattern}`."""

    __slots__ = ("run_id", "span", "thread_id", "tracer")

    def __init__(self, tracer: OtelTracer, span: Span, run_id: str, thread_id: str) -> None:
        self.tracer = tracer
        self.span = span
        self.run_id = run_id
        self.thread_id = thread_id

    def agent(self, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int) -> _Agent:
        return self.tracer.agent(self, trace.set_span_in_context(self.span), spec, step=step, role=role, index=index)

    def skipped(self, name: str, reason: str) -> None:
        self.span.add_event("agent_skipped", {"gen_ai.agent.name": name, "carsvc.reason": reason})

    def end(self, status: str, reason: str, detail: str, budget: types_pb2.BudgetSnapshot | None) -> None:
        span = self.span
        if not span.is_recording():
            return
        span.set_attribute("carsvc.run.status", status)
        span.set_attribute("carsvc.run.termination_reason", reason)
        if detail:
            span.set_attribute("carsvc.run.termination_detail", detail)
        if budget is not None:
            span.set_attribute("carsvc.run.agents", budget.agents_started)
            span.set_attribute("carsvc.run.input_tokens", budget.input_tokens)
            span.set_attribute("carsvc.run.output_tokens", budget.output_tokens)
            span.set_attribute("carsvc.run.cost_usd", budget.cost_usd)
        if status == "RUN_STATUS_FAILED":
            _error(span, detail or reason, reason or "failed")
        span.end()


class OtelTracer:
    """The domain's Tracer, making OpenTelemetry spans."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self.otel = provider.get_tracer(SCOPE, __version__)

    def run(
        self, *, run_id: str, thread_id: str, pattern: str, owner: str, parent: Carrier, resumed: bool = False
    ) -> _Run:
        attributes: dict[str, Any] = {
            "carsvc.run.id": run_id,
            "carsvc.thread.id": thread_id,
            "carsvc.run.pattern": pattern,
        }
        if owner:
            attributes["carsvc.run.owner"] = owner
        if resumed:
            attributes["carsvc.run.resumed"] = True
        # The client's context when it sent one; else a new trace (never the
        # ambient context of whatever task starts the run).
        context = _W3C.extract(parent) if parent else Context()
        span = self.otel.start_span(f"run {pattern}", context=context, kind=SpanKind.INTERNAL, attributes=attributes)
        return _Run(self, span, run_id, thread_id)

    def agent(
        self, run: _Run, parent: Context, spec: types_pb2.AgentSpec, *, step: str, role: str, index: int
    ) -> _Agent:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": spec.name,
            "gen_ai.conversation.id": run.thread_id,
            "carsvc.run.id": run.run_id,
            "carsvc.assignment.id": f"{run.run_id}:{step}",
            "carsvc.step": step,
            "carsvc.role": role,
            "carsvc.index": index,
        }
        model = _model(spec)
        if model:
            attributes["gen_ai.request.model"] = model
        span = self.otel.start_span(
            f"invoke_agent {spec.name}", context=parent, kind=SpanKind.CLIENT, attributes=attributes
        )
        return _Agent(run, span)


class TraceContextInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Reads a call's W3C trace context (`traceparent`, `tracestate` metadata)
    into carsvc.domain.tracing.incoming, so a run the call starts is its child.
    grpc.aio serves each call in one task, interceptors and handler alike, so
    what is set here is what the handler sees."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = handler_call_details.invocation_metadata or ()
        carrier = {key: value for key, value in metadata if key in TRACE_KEYS and isinstance(value, str)}
        incoming.set(carrier if carrier else EMPTY)
        return await continuation(handler_call_details)


def _resource() -> Resource:
    """The standard resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES win),
    named `carsvc` when they give no service name."""
    resource = Resource.create()
    named = str(resource.attributes.get("service.name", ""))
    if not named or named.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "carsvc"}))
    if "service.version" not in resource.attributes:
        resource = resource.merge(Resource({"service.version": __version__}))
    return resource


def exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names (default `otlp`). `otlp` speaks
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL:
    `http/protobuf` (the specification's default) or `grpc`; each exporter reads
    its own endpoint, headers and timeout variables."""
    chosen: list[SpanExporter] = []
    for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        name = name.strip()
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

                chosen.append(Grpc())
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

                chosen.append(Http())
            else:
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: carsvc exports http/protobuf or grpc")
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            chosen.append(ConsoleSpanExporter())
            continue
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides")
        chosen.append(next(iter(found)).load()())
    return chosen


class OtelTelemetry:
    """Tracing with an OpenTelemetry TracerProvider: the sidecar's own, built
    from the OTEL_* variables, or one the embedding program gives (which it
    keeps and shuts down itself)."""

    def __init__(self, provider: trace.TracerProvider, *, owned: bool = False) -> None:
        self.provider = provider
        self._owned = owned
        self._tracer = OtelTracer(provider)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> OtelTelemetry:
        """The program's global provider when it set one up (an embedding
        program), else the sidecar's own from the OTEL_* variables."""
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            log.info("traces: using the program's OpenTelemetry tracer provider")
            return cls(current)
        environ = os.environ if environ is None else environ
        provider = TracerProvider(resource=_resource())
        chosen = exporters(environ)
        for exporter in chosen:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("traces: on, exporting with %s", ", ".join(type(e).__module__ for e in chosen) or "nothing")
        return cls(provider, owned=True)

    @property
    def tracer(self) -> OtelTracer:
        return self._tracer

    def interceptor(self) -> TraceContextInterceptor:
        return TraceContextInterceptor()

    def shutdown(self) -> None:
        if self._owned and isinstance(self.provider, TracerProvider):
            self.provider.shutdown()
