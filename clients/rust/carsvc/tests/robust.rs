//! Undecodable frames, deep values, 16 MiB messages, the reconnect cap and large results,
//! against a real gRPC server on loopback: a raw HTTP/2 server (h2) that
//! sends whatever bytes a test gives it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use carsvc::carv1::{
    self, call_result, run_event, run_result, AgentOutcome, AgentOutput, Assignment, AssignmentResult, CallResult,
    ConnectRequest, ConnectResponse, Evidence, GetRunResponse, MapReduceResult, RunEvent, RunFinished, RunResult,
    SingleResult, StateGetResult, WatchRunResponse, WorkerWelcome,
};
use carsvc::{Client, Error, LogLevel, Worker};
use prost::Message;
use prost_types::{value::Kind, Struct, Value};
use serde_json::Value as Json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Field 1, length-delimited, with a length far past the end: no message decodes it.
const GARBAGE: &[u8] = &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01];

/// One gRPC call on the fake server: the messages the client sent, and the
/// stream back to it.
struct Call {
    /// Which call this is on the server, from 1 (across restarts).
    n: usize,
    path: String,
    body: h2::RecvStream,
    buf: BytesMut,
    out: h2::SendStream<Bytes>,
}

impl Call {
    /// Sends raw message bytes in one gRPC frame.
    fn send_raw(&mut self, message: &[u8]) {
        let mut frame = BytesMut::with_capacity(5 + message.len());
        frame.put_u8(0);
        frame.put_u32(message.len() as u32);
        frame.put_slice(message);
        self.out.send_data(frame.freeze(), false).expect("send a frame");
    }

    fn send<M: Message>(&mut self, m: &M) {
        self.send_raw(&m.encode_to_vec());
    }

    /// The next message from the client; None when it closed its side.
    async fn recv<M: Message + Default>(&mut self) -> Option<M> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let message = self.buf.split_to(len);
                    return Some(M::decode(message).expect("the client sent a valid message"));
                }
            }
            let chunk = self.body.data().await?.ok()?;
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// Ends the call with grpc-status OK.
    fn finish(mut self) {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let _ = self.out.send_trailers(trailers);
    }
}

type Script = Arc<dyn Fn(Call) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A gRPC server on loopback whose every call is handed to `script`.
/// Dropping it (or `stop`) closes the listener and every connection.
struct FakeServer {
    addr: String,
    calls: Arc<AtomicUsize>,
    script: Script,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl FakeServer {
    async fn start<F, Fut>(script: F) -> FakeServer
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let script: Script = Arc::new(move |call| Box::pin(script(call)));
        let mut server = FakeServer { addr: "127.0.0.1:0".into(), calls: Arc::default(), script, task: None };
        server.listen().await;
        server
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(&self.addr).await.expect("bind");
        self.addr = listener.local_addr().unwrap().to_string();
        let (calls, script) = (self.calls.clone(), self.script.clone());
        self.task = Some(tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                let (calls, script) = (calls.clone(), script.clone());
                connections.spawn(async move {
                    let mut conn = h2::server::Builder::new()
                        .max_send_buffer_size(64 << 20)
                        .handshake::<_, Bytes>(socket)
                        .await
                        .expect("h2 handshake");
                    let mut streams = JoinSet::new();
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        let path = request.uri().path().to_string();
                        let response = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let out = respond.send_response(response, false).expect("response headers");
                        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                        let call = Call { n, path, body: request.into_body(), buf: BytesMut::new(), out };
                        streams.spawn(script(call));
                    }
                });
            }
        }));
    }

    fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port, with the same script.
    async fn restart(&mut self) {
        self.listen().await;
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A JSON object nested `depth` levels deep as a protobuf Value: {"a": {"a": ... 1}}.
fn deep_value(depth: usize) -> Value {
    let mut v = Value { kind: Some(Kind::NumberValue(1.0)) };
    for _ in 0..depth {
        let fields = BTreeMap::from([("a".to_string(), v)]);
        v = Value { kind: Some(Kind::StructValue(Struct { fields })) };
    }
    v
}

fn depth_of(v: &Json) -> usize {
    match v {
        Json::Object(m) => 1 + m.values().map(depth_of).max().unwrap_or(0),
        Json::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

fn welcome(n: usize) -> ConnectResponse {
    ConnectResponse {
        welcome: Some(WorkerWelcome { session_id: format!("s{n}"), heartbeat_interval_ms: 2000, ..Default::default() }),
        ..Default::default()
    }
}

fn assignment(id: &str, task: &str) -> ConnectResponse {
    ConnectResponse {
        assignments: vec![Assignment {
            assignment_id: id.into(),
            attempt: 1,
            run_id: format!("r-{id}"),
            agent: "a".into(),
            task: task.into(),
            spec: Some(carv1::AgentSpec { name: "a".into(), ..Default::default() }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Reads the worker's frames until the result for `id` arrives.
async fn result_of(call: &mut Call, id: &str) -> Option<AssignmentResult> {
    while let Some(req) = call.recv::<ConnectRequest>().await {
        if let Some(r) = req.results.into_iter().find(|r| r.assignment_id == id) {
            return Some(r);
        }
    }
    None
}

/// Welcomes the worker, hands it one assignment and reports its result.
async fn serve_one(mut call: Call, task: String, results: mpsc::UnboundedSender<AssignmentResult>) {
    call.recv::<ConnectRequest>().await; // the hello
    let id = format!("as-{}", call.n);
    call.send(&welcome(call.n));
    call.send(&assignment(&id, &task));
    if let Some(r) = result_of(&mut call, &id).await {
        let _ = results.send(r);
    }
    while call.recv::<ConnectRequest>().await.is_some() {} // keep the session
}

type Lines = Arc<Mutex<Vec<String>>>;

/// Collects the worker's log lines.
fn log_sink() -> (Lines, impl Fn(LogLevel, &str) + Send + Sync + 'static) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    (lines, move |level: LogLevel, message: &str| sink.lock().unwrap().push(format!("{level:?}: {message}")))
}

fn test_worker(addr: &str) -> Worker {
    Worker::new(addr).worker_id("t").agent("a", |_ctx| async { Ok("ok".to_string()) })
}

async fn undecodable_frame_then_reconnect(welcome_first: bool, bad: Vec<u8>) {
    let (tx, mut results) = mpsc::unbounded_channel();
    let server = FakeServer::start(move |mut call| {
        let (tx, bad) = (tx.clone(), bad.clone());
        async move {
            if call.n > 1 {
                return serve_one(call, "after the bad frame".into(), tx).await;
            }
            call.recv::<ConnectRequest>().await;
            if welcome_first {
                call.send(&welcome(call.n));
            }
            call.send_raw(&bad);
            while call.recv::<ConnectRequest>().await.is_some() {}
        }
    })
    .await;
    let (lines, sink) = log_sink();
    let worker = test_worker(&server.addr).on_log(sink);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run_until(async {
        stopped.await.ok();
    }));
    let result = tokio::select! {
        r = results.recv() => r.expect("a result"),
        done = tokio::time::sleep(Duration::from_secs(10)) => panic!("no result within 10 s {done:?}: {:?}", lines.lock().unwrap()),
    };
    assert_eq!(result.output.unwrap().answer, "ok");
    assert!(!running.is_finished(), "the worker stopped after an undecodable frame");
    stop.send(()).unwrap();
    running.await.unwrap().expect("run ends Ok after shutdown");
    let lines = lines.lock().unwrap();
    let line = lines.iter().find(|l| l.contains("could not be decoded")).expect("a log line about the frame");
    assert!(
        line.starts_with("Error: a frame from the sidecar could not be decoded: failed to decode Protobuf message")
            && line.ends_with("; the session is lost, reconnecting in 100ms (attempt 1)"),
        "{line}"
    );
}

#[tokio::test]
async fn garbage_instead_of_the_welcome_is_logged_and_the_worker_reconnects() {
    undecodable_frame_then_reconnect(false, GARBAGE.to_vec()).await;
}

#[tokio::test]
async fn garbage_after_the_welcome_is_logged_and_the_worker_reconnects() {
    undecodable_frame_then_reconnect(true, GARBAGE.to_vec()).await;
}

#[tokio::test]
async fn a_value_past_prosts_recursion_limit_is_logged_and_the_worker_reconnects() {
    // 40 JSON levels are 121 nested messages; prost stops at 100.
    let too_deep = ConnectResponse {
        call_results: vec![CallResult {
            call_id: "1".into(),
            result: Some(call_result::Result::StateGet(StateGetResult { found: true, value: Some(deep_value(40)) })),
        }],
        ..Default::default()
    };
    undecodable_frame_then_reconnect(true, too_deep.encode_to_vec()).await;
}

#[tokio::test]
async fn without_reconnect_an_undecodable_frame_ends_run_with_its_error() {
    let server = FakeServer::start(|mut call| async move {
        call.recv::<ConnectRequest>().await;
        call.send(&welcome(call.n));
        call.send_raw(GARBAGE);
        while call.recv::<ConnectRequest>().await.is_some() {}
    })
    .await;
    let (_lines, sink) = log_sink();
    let worker = test_worker(&server.addr).reconnect(false).on_log(sink);
    match tokio::time::timeout(Duration::from_secs(10), worker.run()).await.expect("run ends") {
        Err(e @ Error::UndecodableFrame(_)) => {
            assert!(e.to_string().starts_with("a frame from the sidecar could not be decoded: "), "{e}")
        }
        other => panic!("run returned {other:?}"),
    }
}

#[tokio::test]
async fn a_value_nested_24_levels_deep_reaches_the_handler() {
    let (tx, mut results) = mpsc::unbounded_channel();
    let server = FakeServer::start(move |mut call| {
        let tx = tx.clone();
        async move {
            call.recv::<ConnectRequest>().await;
            call.send(&welcome(call.n));
            call.send(&assignment("deep", "read"));
            while let Some(req) = call.recv::<ConnectRequest>().await {
                for c in req.calls {
                    call.send(&ConnectResponse {
                        call_results: vec![CallResult {
                            call_id: c.call_id,
                            result: Some(call_result::Result::StateGet(StateGetResult {
                                found: true,
                                value: Some(deep_value(24)),
                            })),
                        }],
                        ..Default::default()
                    });
                }
                for r in req.results {
                    let _ = tx.send(r);
                }
            }
        }
    })
    .await;
    let worker = Worker::new(&server.addr).on_log(|_, _| {}).agent("a", |ctx| async move {
        let v = ctx.state_get("deep").await?.ok_or("not found")?;
        Ok(depth_of(&v).to_string())
    });
    let running = tokio::spawn(worker.run());
    let r = tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("a result").unwrap();
    let output = r.output.unwrap();
    assert_eq!(output.answer, "24", "error: {:?}", output.error);
    running.abort();
}

#[tokio::test]
async fn the_worker_receives_and_sends_messages_over_4_mib() {
    let big = "x".repeat(6 << 20);
    let (tx, mut results) = mpsc::unbounded_channel();
    let task = big.clone();
    let server = FakeServer::start(move |call| serve_one(call, task.clone(), tx.clone())).await;
    let worker = Worker::new(&server.addr).on_log(|_, _| {}).agent("a", |ctx| async move { Ok(ctx.task + "!") });
    let running = tokio::spawn(worker.run());
    let r = tokio::time::timeout(Duration::from_secs(20), results.recv()).await.expect("a result").unwrap();
    let output = r.output.unwrap();
    assert_eq!(output.answer.len(), big.len() + 1, "error: {:?}", output.error);
    running.abort();
}

#[tokio::test]
async fn max_message_bytes_limits_what_the_worker_accepts() {
    let server = FakeServer::start(|mut call| async move {
        call.recv::<ConnectRequest>().await;
        call.send(&welcome(call.n));
        call.send(&assignment("big", &"x".repeat(2 << 20)));
        while call.recv::<ConnectRequest>().await.is_some() {}
    })
    .await;
    let worker = test_worker(&server.addr).reconnect(false).max_message_bytes(1 << 20).on_log(|_, _| {});
    match tokio::time::timeout(Duration::from_secs(10), worker.run()).await.expect("run ends") {
        Err(Error::Status(s)) if s.code() == tonic::Code::OutOfRange || s.code() == tonic::Code::ResourceExhausted => {}
        other => panic!("run returned {other:?}, want a message-too-large status"),
    }
}

#[tokio::test]
async fn the_worker_reconnects_within_its_cap_after_an_outage() {
    let cap = Duration::from_secs(1);
    let mut server = FakeServer::start(|mut call| async move {
        call.recv::<ConnectRequest>().await;
        call.send(&welcome(call.n));
        while call.recv::<ConnectRequest>().await.is_some() {}
    })
    .await;
    let (lines, sink) = log_sink();
    let (tx, mut connected) = mpsc::unbounded_channel();
    let worker = test_worker(&server.addr).reconnect_max_delay(cap).on_log(sink).on_connect(move |_| {
        let _ = tx.send(Instant::now());
    });
    let running = tokio::spawn(worker.run());
    tokio::time::timeout(Duration::from_secs(10), connected.recv()).await.expect("connected");

    server.stop(); // down for 4 caps
    tokio::time::sleep(4 * cap).await;
    server.restart().await;
    let back = Instant::now();
    let again = tokio::time::timeout(cap + Duration::from_secs(3), connected.recv())
        .await
        .unwrap_or_else(|_| panic!("not reconnected within cap + 3 s: {:?}", lines.lock().unwrap()))
        .unwrap();
    assert!(again.duration_since(back) <= cap + Duration::from_secs(3));
    running.abort();

    // One log line per attempt, with its delay, never past the cap.
    let lines = lines.lock().unwrap();
    let attempts: Vec<_> = lines.iter().filter(|l| l.contains("; reconnecting in ")).collect();
    assert!(attempts.len() >= 3, "{lines:?}");
    for (i, line) in attempts.iter().enumerate() {
        assert!(line.ends_with(&format!(" (attempt {})", i + 1)), "{line}");
        let delay = line.split("reconnecting in ").nth(1).unwrap().split(' ').next().unwrap();
        assert!(["100ms", "200ms", "400ms", "800ms", "1s"].contains(&delay), "{line}");
    }
}

// -- the client ---------------------------------------------------------------

/// A server answering every call with `frames` (raw messages), then OK.
async fn answering(frames: Vec<Vec<u8>>) -> FakeServer {
    FakeServer::start(move |mut call| {
        let frames = frames.clone();
        async move {
            assert!(call.path.starts_with("/car.v1.RunService/"), "{}", call.path);
            let _ = call.recv::<carv1::GetRunRequest>().await; // any request: only read it
            for f in &frames {
                call.send_raw(f);
            }
            call.finish();
        }
    })
    .await
}

#[tokio::test]
async fn the_client_decodes_a_24_level_evidence_value_in_a_watched_run_finished() {
    let output = AgentOutput {
        name: "r".into(),
        outcome: Some(AgentOutcome {
            evidence: vec![Evidence { description: "deep".into(), data: Some(deep_value(24)), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let finished = RunEvent {
        seq: 7,
        kind: Some(run_event::Kind::RunFinished(RunFinished {
            result: Some(RunResult {
                result: Some(run_result::Result::MapReduce(MapReduceResult {
                    reducer_output: Some(output),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        ..Default::default()
    };
    let server = answering(vec![WatchRunResponse { events: vec![finished] }.encode_to_vec()]).await;
    let client = Client::connect(&server.addr).unwrap();
    let mut events = client.watch("r1", 0).await.unwrap();
    let event = events.next().await.unwrap().expect("one event");
    assert!(events.next().await.unwrap().is_none());
    let Some(run_event::Kind::RunFinished(f)) = event.kind else { panic!("{event:?}") };
    let Some(run_result::Result::MapReduce(m)) = f.result.unwrap().result else { panic!("not a map-reduce result") };
    let data = m.reducer_output.unwrap().outcome.unwrap().evidence[0].data.clone();
    assert_eq!(depth_of(&carsvc::from_value(&data.unwrap())), 24);
}

#[tokio::test]
async fn client_calls_return_a_clear_error_for_an_undecodable_response() {
    let server = answering(vec![GARBAGE.to_vec()]).await;
    let client = Client::connect(&server.addr).unwrap();
    let clear = |e: Error| match e {
        Error::Status(s) if s.code() == tonic::Code::Internal => {
            assert!(s.message().starts_with("failed to decode Protobuf message"), "{s:?}")
        }
        other => panic!("{other:?}"),
    };
    let within = Duration::from_secs(10);
    clear(tokio::time::timeout(within, client.get_run("r1")).await.expect("get_run hung").unwrap_err());
    let mut events = client.watch("r1", 0).await.unwrap();
    clear(tokio::time::timeout(within, events.next()).await.expect("watch hung").unwrap_err());
}

#[tokio::test]
async fn the_client_receives_messages_over_4_mib_and_max_message_bytes_limits_it() {
    let big = "y".repeat(6 << 20);
    let run = carv1::Run {
        run_id: "r1".into(),
        result: Some(RunResult {
            result: Some(run_result::Result::Single(SingleResult {
                output: Some(AgentOutput { answer: big.clone(), ..Default::default() }),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    let server = answering(vec![GetRunResponse { run: Some(run) }.encode_to_vec()]).await;
    let client = Client::connect(&server.addr).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), client.get_run("r1")).await.unwrap().unwrap();
    let Some(run_result::Result::Single(single)) = got.result.unwrap().result else { panic!("not a single result") };
    assert_eq!(single.output.unwrap().answer.len(), big.len());

    let small = Client::connect(&server.addr).unwrap().max_message_bytes(1 << 20);
    match small.get_run("r1").await {
        Err(Error::Status(s)) if s.code() == tonic::Code::OutOfRange || s.code() == tonic::Code::ResourceExhausted => {}
        other => panic!("with max_message_bytes(1 MiB) get_run returned {other:?}"),
    }
    drop(server);
}

// -- large results ------------------------------------------------------------

/// A RunResult's serialization as ReadRunResultResponses of `n` bytes.
fn chunked(result: &RunResult, n: usize) -> Vec<carv1::ReadRunResultResponse> {
    let data = result.encode_to_vec();
    data.chunks(n)
        .enumerate()
        .map(|(i, chunk)| carv1::ReadRunResultResponse {
            chunk: chunk.to_vec(),
            offset: (i * n) as u64,
            total_bytes: data.len() as u64,
        })
        .collect()
}

/// A server answering GetRun with `run` and ReadRunResult with `pieces`.
async fn result_server(run: carv1::Run, pieces: Vec<carv1::ReadRunResultResponse>) -> FakeServer {
    FakeServer::start(move |mut call| {
        let (run, pieces) = (run.clone(), pieces.clone());
        async move {
            match call.path.as_str() {
                "/car.v1.RunService/GetRun" => {
                    let _ = call.recv::<carv1::GetRunRequest>().await;
                    call.send(&GetRunResponse { run: Some(run) });
                }
                "/car.v1.RunService/ReadRunResult" => {
                    let request = call.recv::<carv1::ReadRunResultRequest>().await.expect("a request");
                    assert_eq!((request.run_id.as_str(), request.offset), ("r1", 0));
                    for piece in &pieces {
                        call.send(piece);
                    }
                }
                other => panic!("unexpected call {other}"),
            }
            call.finish();
        }
    })
    .await
}

fn single_answer(answer: String) -> RunResult {
    RunResult {
        result: Some(run_result::Result::Single(SingleResult {
            output: Some(AgentOutput { answer, ..Default::default() }),
            ..Default::default()
        })),
    }
}

#[tokio::test]
async fn get_run_reads_a_result_left_out_of_get_run_in_chunks() {
    let answer = "z".repeat(3 << 20);
    let result = single_answer(answer.clone());
    let pieces = chunked(&result, 1 << 20);
    assert_eq!(pieces.len(), 4);
    let size = pieces[0].total_bytes;
    let run = carv1::Run { run_id: "r1".into(), result_omitted: true, result_bytes: size, ..Default::default() };
    let server = result_server(run, pieces).await;
    let client = Client::connect(&server.addr).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), client.get_run("r1")).await.unwrap().unwrap();
    assert!(got.result_omitted);
    assert_eq!(got.result_bytes, size);
    let Some(run_result::Result::Single(single)) = got.result.unwrap().result else { panic!("not a single result") };
    assert_eq!(single.output.unwrap().answer, answer);
}

#[tokio::test]
async fn read_result_refuses_a_missing_chunk_or_a_short_stream() {
    let pieces = chunked(&single_answer("q".repeat(4000)), 1000);
    let gap: Vec<_> = [&pieces[..1], &pieces[2..]].concat();
    for (frames, want) in
        [(gap, "a result chunk at byte 2000, expected 1000"), (pieces[..3].to_vec(), "ended after 3000 of")]
    {
        let server = result_server(carv1::Run::default(), frames).await;
        let client = Client::connect(&server.addr).unwrap();
        match tokio::time::timeout(Duration::from_secs(10), client.read_result("r1")).await.unwrap() {
            Err(Error::Other(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("read_result returned {other:?}, want an error containing {want:?}"),
        }
    }
}

// -- several addresses ------------------------------------------------------------

/// A loopback address nothing listens on.
async fn dead_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn addresses_are_one_or_several_separated_by_commas() {
    assert_eq!(carsvc::addresses("h1:1"), ["h1:1"]);
    assert_eq!(carsvc::addresses(" h1:1 , h2:2, "), ["h1:1", "h2:2"]);
    assert!(carsvc::addresses(" , ").is_empty());
    assert!(Client::connect(" , ").is_err());
}

#[tokio::test]
async fn the_worker_connects_to_the_first_address_that_answers() {
    let dead = dead_address().await;
    let server = FakeServer::start(|mut call| async move {
        call.recv::<ConnectRequest>().await; // the hello
        call.send(&welcome(call.n));
        while call.recv::<ConnectRequest>().await.is_some() {}
    })
    .await;
    let (lines, sink) = log_sink();
    let (tx, mut connected) = mpsc::unbounded_channel();
    let worker = test_worker(&format!("{dead},{}", server.addr)).on_log(sink).on_connect(move |s| {
        let _ = tx.send(s.to_string());
    });
    let running = tokio::spawn(worker.run_until(async { tokio::time::sleep(Duration::from_secs(20)).await }));
    let session = tokio::time::timeout(Duration::from_secs(10), connected.recv()).await.expect("connected");
    running.abort();
    assert_eq!(session.as_deref(), Some("s1"));
    assert_eq!(server.calls.load(Ordering::SeqCst), 1);
    let lines = lines.lock().unwrap().clone();
    assert!(lines[0].starts_with("Warn: session ended (transport: "), "{lines:?}");
    assert!(lines[0].ends_with(&format!(") at {dead}; reconnecting in 100ms (attempt 1)")), "{lines:?}");
    assert_eq!(lines[1], format!("Info: connected to {} (session s1), serving a", server.addr));
}

/// How a replica's WatchRun ends after its events.
#[derive(Clone, Copy, PartialEq)]
enum Ends {
    /// With run_finished (the last event) and OK.
    Finished,
    /// With UNAVAILABLE, as a replica going away says.
    Unavailable,
    /// It does not: the test stops the server, and the connection breaks.
    Never,
}

/// A RunService whose WatchRun sends the events of `seqs` after the request's
/// after_seq, then ends as `ends` says. `asked` collects the after_seq of each
/// WatchRun; StartRun is answered.
async fn replica(seqs: Vec<u64>, ends: Ends, asked: Arc<Mutex<Vec<u64>>>) -> FakeServer {
    FakeServer::start(move |mut call| {
        let (seqs, asked) = (seqs.clone(), asked.clone());
        async move {
            match call.path.as_str() {
                "/car.v1.RunService/WatchRun" => {
                    let request = call.recv::<carv1::WatchRunRequest>().await.unwrap();
                    asked.lock().unwrap().push(request.after_seq);
                    let last = *seqs.last().unwrap();
                    for &seq in seqs.iter().filter(|&&s| s > request.after_seq) {
                        let mut event = RunEvent { seq, run_id: request.run_id.clone(), ..Default::default() };
                        if seq == last && ends == Ends::Finished {
                            event.kind = Some(run_event::Kind::RunFinished(RunFinished::default()));
                        }
                        call.send(&WatchRunResponse { events: vec![event] });
                    }
                    match ends {
                        Ends::Finished => call.finish(),
                        Ends::Unavailable => {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                            trailers
                                .insert("grpc-message", http::HeaderValue::from_static("this replica is going away"));
                            let _ = call.out.send_trailers(trailers);
                        }
                        Ends::Never => std::future::pending().await,
                    }
                }
                "/car.v1.RunService/StartRun" => {
                    let _ = call.recv::<carv1::StartRunRequest>().await;
                    let run = carv1::RunHandle { run_id: "r1".into(), ..Default::default() };
                    call.send(&carv1::StartRunResponse { run: Some(run) });
                    call.finish();
                }
                path => panic!("unexpected call {path}"),
            }
        }
    })
    .await
}

async fn watch_resumes_at_the_next_address(ends: Ends) {
    let (asked_a, asked_b) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let mut a = replica(vec![1, 2], ends, asked_a.clone()).await;
    let b = replica(vec![1, 2, 3], Ends::Finished, asked_b.clone()).await;
    let client = Client::connect(&format!("{},{}", a.addr, b.addr)).unwrap();
    let mut events = client.watch("r1", 0).await.unwrap();
    let mut seqs = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap().unwrap() {
        seqs.push(event.seq);
        if event.seq == 2 && ends == Ends::Never {
            a.stop(); // the replica dies under the watch
        }
    }
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(*asked_a.lock().unwrap(), [0]);
    assert_eq!(*asked_b.lock().unwrap(), [2], "the watch resumes after the last event");
    assert_eq!(client.sidecars().target().await, b.addr);
}

#[tokio::test]
async fn a_watch_resumes_at_the_next_address_after_unavailable() {
    watch_resumes_at_the_next_address(Ends::Unavailable).await;
}

#[tokio::test]
async fn a_watch_resumes_at_the_next_address_after_its_replica_died() {
    watch_resumes_at_the_next_address(Ends::Never).await;
}

#[tokio::test]
async fn a_client_given_a_dead_address_first_calls_the_live_one() {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let live = replica(vec![1], Ends::Finished, asked.clone()).await;
    let client = Client::connect(&format!("{}, {}", dead_address().await, live.addr)).unwrap();
    // A write is not retried, yet it lands: the client connects before it sends.
    let handle = client.start_run(carsvc::single(carsvc::agent("a"), "t"), Default::default()).await.unwrap();
    assert_eq!(handle.run_id, "r1");
    let mut events = client.watch("r1", 0).await.unwrap();
    assert!(events.next().await.unwrap().is_some());
    assert_eq!(*asked.lock().unwrap(), [0]);
}
