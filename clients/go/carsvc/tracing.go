package carsvc

import (
	"context"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"carsvc/clients/go/gen/carv1"
)

// tracerName is the instrumentation scope of the worker's spans.
const tracerName = "carsvc/clients/go"

// startAgentSpan starts the agent's span, "invoke_agent {name}": a child of
// the sidecar's span of the step (the assignment's W3C trace_context, when
// the sidecar traces), and the span of the context the handler gets, so the
// spans of the handler's own work (model calls, tools) are its children. It
// uses Worker.TracerProvider, else the global one (otel.SetTracerProvider):
// without either, OpenTelemetry's no-op provider makes spans that record
// nothing and cost next to nothing.
func (w *Worker) startAgentSpan(ctx context.Context, a *carv1.Assignment, name string) (context.Context, trace.Span) {
	if len(a.TraceContext) > 0 {
		ctx = propagation.TraceContext{}.Extract(ctx, propagation.MapCarrier(a.TraceContext))
	}
	provider := w.TracerProvider
	if provider == nil {
		provider = otel.GetTracerProvider()
	}
	return provider.Tracer(tracerName, trace.WithInstrumentationVersion(SDK)).Start(ctx, "invoke_agent "+name,
		trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(
			attribute.String("gen_ai.operation.name", "invoke_agent"),
			attribute.String("gen_ai.agent.name", name),
			attribute.String("gen_ai.conversation.id", a.ThreadId),
			attribute.String("carsvc.run.id", a.RunId),
			attribute.String("carsvc.assignment.id", a.AssignmentId),
			attribute.Int64("carsvc.attempt", int64(a.Attempt)),
			attribute.String("carsvc.worker.id", w.WorkerID),
		))
}

// endAgentSpan records the output's spend and error on the span and ends it.
func endAgentSpan(span trace.Span, out *carv1.AgentOutput) {
	if span.IsRecording() {
		if t := out.Tokens; t != nil {
			span.SetAttributes(
				attribute.Int64("gen_ai.usage.input_tokens", int64(t.InputTokens)),
				attribute.Int64("gen_ai.usage.output_tokens", int64(t.OutputTokens)),
				attribute.Float64("carsvc.usage.cost_usd", t.CostUsd),
			)
		}
		if out.Error != nil {
			kind := "agent_error"
			if len(*out.Error) >= 9 && (*out.Error)[:9] == "cancelled" {
				kind = "cancelled"
			}
			span.SetStatus(otelcodes.Error, *out.Error)
			span.SetAttributes(attribute.String("error.type", kind))
		}
	}
	span.End()
}
