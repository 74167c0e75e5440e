//! The agent's span on this worker, with the `otel` feature (docs/operations.md,
//! "Traces"): "invoke_agent {name}", a child of the sidecar's span of the step
//! (the assignment's W3C `trace_context`), made with OpenTelemetry's global
//! tracer provider, which records nothing unless the program installed one
//! (`opentelemetry::global::set_tracer_provider`). The handler's future runs
//! with the span's context current, so spans the handler starts from
//! `Context::current()` (model calls, tools) are its children.

use std::collections::HashMap;
use std::str::FromStr;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{global, Context, KeyValue};

use crate::carv1::AgentOutput;
use crate::AgentContext;

/// The instrumentation scope of the worker's spans.
const SCOPE: &str = "carsvc-rust";

/// The context a W3C trace context carrier (`traceparent`, `tracestate`)
/// names, on top of `base`; `base` itself when there is none or it is malformed.
pub fn extract(carrier: &HashMap<String, String>, base: &Context) -> Context {
    let Some(parent) = carrier.get("traceparent") else { return base.clone() };
    let parts: Vec<&str> = parent.trim().split('-').collect();
    if parts.len() < 4 || parts[0].len() != 2 || parts[0] == "ff" || parts[1].len() != 32 || parts[2].len() != 16 {
        return base.clone();
    }
    let (Ok(trace_id), Ok(span_id), Ok(flags)) =
        (TraceId::from_hex(parts[1]), SpanId::from_hex(parts[2]), u8::from_str_radix(parts[3], 16))
    else {
        return base.clone();
    };
    let state = carrier.get("tracestate").and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default();
    let remote = SpanContext::new(trace_id, span_id, TraceFlags::new(flags & 1), true, state);
    if !remote.is_valid() {
        return base.clone();
    }
    base.with_remote_span_context(remote)
}

/// Starts the agent's span; the returned context holds it.
pub(crate) fn start(ctx: &AgentContext, worker_id: &str) -> Context {
    let parent = extract(&ctx.trace_context, &Context::current());
    let tracer = global::tracer(SCOPE);
    let span = tracer
        .span_builder(format!("invoke_agent {}", ctx.name))
        .with_kind(SpanKind::Server)
        .with_attributes(vec![
            KeyValue::new("gen_ai.operation.name", "invoke_agent"),
            KeyValue::new("gen_ai.agent.name", ctx.name.clone()),
            KeyValue::new("gen_ai.conversation.id", ctx.thread_id.clone()),
            KeyValue::new("carsvc.run.id", ctx.run_id.clone()),
            KeyValue::new("carsvc.assignment.id", ctx.assignment_id.clone()),
            KeyValue::new("carsvc.attempt", i64::from(ctx.attempt)),
            KeyValue::new("carsvc.worker.id", worker_id.to_string()),
        ])
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Records the output's spend and error on the span and ends it.
pub(crate) fn end(cx: &Context, output: &AgentOutput) {
    let span = cx.span();
    if span.is_recording() {
        if let Some(t) = &output.tokens {
            span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", t.input_tokens as i64));
            span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", t.output_tokens as i64));
            span.set_attribute(KeyValue::new("carsvc.usage.cost_usd", t.cost_usd));
        }
        if let Some(error) = &output.error {
            let kind = if error.starts_with("cancelled") { "cancelled" } else { "agent_error" };
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(error.clone()));
        }
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_becomes_the_remote_parent() {
        let carrier = HashMap::from([
            ("traceparent".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()),
            ("tracestate".to_string(), "vendor=x".to_string()),
        ]);
        let cx = extract(&carrier, &Context::new());
        let parent = cx.span().span_context().clone();
        assert_eq!(parent.trace_id(), TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap());
        assert_eq!(parent.span_id(), SpanId::from_hex("b7ad6b7169203331").unwrap());
        assert!(parent.is_remote() && parent.is_sampled());
        assert_eq!(parent.trace_state().get("vendor"), Some("x"));
    }

    #[test]
    fn no_or_a_malformed_traceparent_leaves_the_context_alone() {
        for value in [None, Some("garbage"), Some("00-00000000000000000000000000000000-b7ad6b7169203331-01")] {
            let carrier: HashMap<String, String> =
                value.map(|v| ("traceparent".to_string(), v.to_string())).into_iter().collect();
            assert!(!extract(&carrier, &Context::new()).has_active_span());
        }
    }
}
