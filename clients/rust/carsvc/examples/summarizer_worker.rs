//! Serves the example agents of clients/README.md: "summarizer" (a map-reduce
//! mapper), "combiner" (its reducer) and "deployer" (asks a human first).
//!
//!     cargo run --example summarizer_worker -- --target 127.0.0.1:50051
//!
//! --target (or CARSVC_TARGET) may name several sidecar replicas, separated by
//! commas: the worker connects to the first that answers and moves on to the
//! next when its session ends. CARSVC_WORKER_TOKEN, when set, is the worker token (never a flag: a command
//! line is visible to every local user).

use std::time::Duration;

use carsvc::{AgentContext, BoxError, Worker};
use serde_json::json;

const ITEM_MARKER: &str = "Process this item: ";

/// `--name value` flags with defaults.
fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

/// Answers "summary(<item>)" after recording the item in the run's state and
/// emitting a "summarized" event.
async fn summarize(ctx: AgentContext, worker_id: String, sleep: Duration) -> Result<String, BoxError> {
    let item = match ctx.task.rfind(ITEM_MARKER) {
        Some(at) => ctx.task[at + ITEM_MARKER.len()..].to_string(),
        None => ctx.task.clone(),
    };
    ctx.progress(&format!("summarizing {item}"), None);
    let key = format!("summaries/{item}");
    ctx.state_set(&key, json!({"worker": worker_id, "sdk": "rust"})).await?;
    if ctx.state_get(&key).await?.is_none() {
        return Err(format!("state read back failed for {key}").into());
    }
    ctx.emit("summarized", json!({"item": item, "worker": worker_id}));
    tokio::time::sleep(sleep).await; // dropped at once if the sidecar cancels
    ctx.report_usage(ctx.task.len() as u64, item.len() as u64, 0.0);
    Ok(format!("summary({item})"))
}

/// Joins the mapper answers listed in the reducer's task.
async fn combine(ctx: AgentContext) -> Result<String, BoxError> {
    let answers: Vec<&str> = ctx
        .task
        .lines()
        .filter(|line| line.starts_with("- ["))
        .filter_map(|line| line.find("] ").map(|at| &line[at + 2..]))
        .collect();
    Ok(format!("combined {}: {}", answers.len(), answers.join("; ")))
}

/// Asks a human before it "deploys" the task's target.
async fn deploy(ctx: AgentContext) -> Result<String, BoxError> {
    let reason = format!("deploys to {}", ctx.task);
    let decision = ctx
        .suspend_tool_call("deploy-1", "deploy", json!({"target": ctx.task}), &reason, Some(Duration::from_secs(300)))
        .await?;
    Ok(match (decision.approved, &decision.result) {
        (false, _) => format!("denied: {}", decision.reason),
        (true, serde_json::Value::String(s)) => format!("approved: {s}"),
        (true, other) => format!("approved: {other}"),
    })
}

/// Sends "ping from <worker>" to the run's "ponger" (retrying while it has not
/// started) and answers with the reply it receives.
async fn ping(ctx: AgentContext, worker_id: String) -> Result<String, BoxError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match ctx.send("ponger", json!(format!("ping from {worker_id}"))).await {
            Ok(()) => break,
            Err(carsvc::Error::Call { code: tonic::Code::NotFound, .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
    let reply = ctx.recv(Some(Duration::from_secs(10))).await?;
    Ok(format!("pinger got {}", payload_text(&reply)))
}

/// Waits for a message and answers its sender with "pong from <worker>".
async fn pong(ctx: AgentContext, worker_id: String) -> Result<String, BoxError> {
    let message = ctx.recv(Some(Duration::from_secs(10))).await?;
    ctx.send(&message.from_agent, json!(format!("pong from {worker_id}"))).await?;
    Ok(format!("ponger got {} from {}", payload_text(&message), message.from_agent))
}

fn payload_text(message: &carsvc::carv1::Message) -> String {
    match message.payload.as_ref().map(carsvc::from_value) {
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

fn logged(ctx: &AgentContext) {
    println!("started {} {} {}", ctx.assignment_id, ctx.agent, ctx.attempt);
}

#[tokio::main]
async fn main() {
    let target = flag("--target", &std::env::var("CARSVC_TARGET").unwrap_or_else(|_| "127.0.0.1:50051".into()));
    let mut worker = Worker::new(target)
        .max_in_flight(flag("--max-in-flight", "4").parse().expect("--max-in-flight"))
        .label("lang", "rust");
    let id = flag("--worker-id", "");
    if !id.is_empty() {
        worker = worker.worker_id(id);
    }
    if let Some(token) = std::env::var("CARSVC_WORKER_TOKEN").ok().filter(|t| !t.is_empty()) {
        worker = worker.token(token);
    }
    let worker_id = worker.id().to_string();
    let sleep = Duration::from_millis(flag("--sleep-ms", "0").parse().expect("--sleep-ms"));
    let printed_id = worker_id.clone();
    worker = worker.on_connect(move |session| println!("ready {printed_id} {session}"));
    for name in flag("--agents", "summarizer,combiner,deployer,pinger,ponger").split(',') {
        worker = match name {
            "summarizer" => {
                let worker_id = worker_id.clone();
                worker.agent(name, move |ctx| {
                    logged(&ctx);
                    summarize(ctx, worker_id.clone(), sleep)
                })
            }
            "combiner" => worker.agent(name, |ctx| {
                logged(&ctx);
                combine(ctx)
            }),
            "deployer" => worker.agent(name, |ctx| {
                logged(&ctx);
                deploy(ctx)
            }),
            "pinger" => {
                let worker_id = worker_id.clone();
                worker.agent(name, move |ctx| {
                    logged(&ctx);
                    ping(ctx, worker_id.clone())
                })
            }
            "ponger" => {
                let worker_id = worker_id.clone();
                worker.agent(name, move |ctx| {
                    logged(&ctx);
                    pong(ctx, worker_id.clone())
                })
            }
            other => {
                eprintln!("unknown agent {other}");
                std::process::exit(2);
            }
        };
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    if let Err(e) = worker.run_until(shutdown).await {
        eprintln!("worker: {e}");
        std::process::exit(1);
    }
}
