//! A worker whose program uses OpenTelemetry: it exports its spans with
//! OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT and the other standard variables), so
//! each agent's "invoke_agent" span, made by the SDK (feature `otel`) as a
//! child of the sidecar's span of the step, and the handler's own "chat" span
//! under it join the client's trace (docs/operations.md, "Traces";
//! tests/crosslang/test_tracing.py runs it).
//!
//!     cargo run -p carsvc-otel-worker -- --target 127.0.0.1:50051 --agent traced-rust
//!
//! A crate of its own, so the SDK needs only the OpenTelemetry API crate.

use carsvc::{AgentContext, BoxError, Worker};
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// `--name value` flags with defaults.
fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

async fn answer(ctx: AgentContext) -> Result<String, BoxError> {
    // The handler's own work (a model call) is a child of the agent's span,
    // which is the current context while the handler runs.
    let tracer = global::tracer("otel-worker");
    let chat = tracer
        .span_builder("chat fake-model")
        .with_kind(SpanKind::Client)
        .with_attributes(vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.request.model", "fake-model"),
        ])
        .start_with_context(&tracer, &Context::current());
    Context::current_with_span(chat).span().end();
    ctx.report_usage(10, 5, 0.001);
    Ok(format!("rust: {}", ctx.task))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).build();
    global::set_tracer_provider(provider.clone());

    let mut worker = Worker::new(flag("--target", "127.0.0.1:50051")).agent(flag("--agent", "traced-rust"), answer);
    let worker_id = flag("--worker-id", "");
    if !worker_id.is_empty() {
        worker = worker.worker_id(worker_id);
    }
    let id = worker.id().to_string();
    worker = worker.on_connect(move |session| println!("ready {id} {session}"));
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let served = worker.run_until(stop).await;
    // Exports what the batch still holds.
    tokio::task::spawn_blocking(move || provider.shutdown()).await??;
    Ok(served?)
}
