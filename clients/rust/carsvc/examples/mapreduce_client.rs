//! Runs a map-reduce of the example agents (clients/README.md) and prints
//! the result; --json prints one JSON object.
//!
//!     cargo run --example mapreduce_client -- --target 127.0.0.1:50051 --items 10

use std::collections::BTreeMap;
use std::time::Duration;

use carsvc::carv1::{run_event::Kind, RunStatus};
use carsvc::{agent, map_reduce, Client, RunOptions};
use serde_json::json;

fn flag(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() -> Result<(), carsvc::Error> {
    let target = flag("--target", &std::env::var("CARSVC_TARGET").unwrap_or_else(|_| "127.0.0.1:50051".into()));
    let n: usize = flag("--items", "5").parse().expect("--items");
    let max_concurrent: u32 = flag("--max-concurrent", "8").parse().expect("--max-concurrent");
    let as_json = std::env::args().any(|a| a == "--json");
    // Start and wait with Client::run instead of watching the events.
    let use_run = std::env::args().any(|a| a == "--run");

    let client = Client::connect(&target)?;
    let items: Vec<String> = (1..=n).map(|i| format!("item-{i}")).collect();
    let pattern = map_reduce(
        agent(&flag("--mapper", "summarizer")),
        agent(&flag("--reducer", "combiner")),
        "Summarize each item",
        items,
        Some(max_concurrent),
    );
    let options = RunOptions { agent_id: "mapreduce-client-rust".into(), ..Default::default() };
    let mut finished_by = BTreeMap::new();
    let mut events = 0usize;
    let run = if use_run {
        client.run(pattern, options).await?
    } else {
        let handle = client.start_run(pattern, options).await?;
        // Watch the events; a broken watch resumes after the last seq it saw.
        let (mut last_seq, mut done) = (0u64, false);
        while !done {
            let mut stream = client.watch(&handle.run_id, last_seq).await?;
            loop {
                match stream.next().await {
                    Ok(Some(event)) => {
                        last_seq = event.seq;
                        events += 1;
                        match event.kind {
                            Some(Kind::AgentFinished(f)) => {
                                finished_by.insert(f.output.map(|o| o.name).unwrap_or_default(), f.worker_id);
                            }
                            Some(Kind::RunFinished(_)) => done = true,
                            _ => {}
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("watch broke, resuming after seq {last_seq}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
        // get_run reads a result too large to travel inline (ReadRunResult).
        client.get_run(&handle.run_id).await?
    };
    let result = match run.result.as_ref().and_then(|r| r.result.as_ref()) {
        Some(carsvc::carv1::run_result::Result::MapReduce(m)) => m.clone(),
        _ => Default::default(),
    };
    let status = RunStatus::try_from(run.status).map(|s| s.as_str_name()).unwrap_or("RUN_STATUS_UNSPECIFIED");
    if as_json {
        let out = json!({
            "run_id": run.run_id,
            "status": status,
            // Why it ended: "completed", "agent_failed", ... and a sentence.
            "termination_reason": run.termination_reason,
            "termination_detail": run.termination_detail,
            "reduced_answer": result.reduced_answer,
            "answers": result.map_outputs.iter().map(|o| o.answer.clone()).collect::<Vec<_>>(),
            "errors": result.map_outputs.iter().map(|o| o.error.clone().unwrap_or_default()).collect::<Vec<_>>(),
            "finished_by": finished_by,
            "events": events,
            // Too large to travel inline (over 1 MiB): read with ReadRunResult.
            "result_omitted": run.result_omitted,
            "result_bytes": run.result_bytes,
        });
        println!("{out}");
    } else {
        println!("run {}: {status}", run.run_id);
        if run.status != RunStatus::Succeeded as i32 {
            println!("  why: {} ({})", run.termination_detail, run.termination_reason);
        }
        for o in &result.map_outputs {
            let text = if o.answer.is_empty() { o.error.clone().unwrap_or_default() } else { o.answer.clone() };
            println!("  {:<14} {:<20} by {}", o.name, text, finished_by.get(&o.name).cloned().unwrap_or_default());
        }
        println!("reduced: {}", result.reduced_answer);
    }
    if run.status != RunStatus::Succeeded as i32 {
        eprintln!(
            "mapreduce-client: run {} {status}: {}: {}",
            run.run_id, run.termination_reason, run.termination_detail
        );
        std::process::exit(1);
    }
    Ok(())
}
