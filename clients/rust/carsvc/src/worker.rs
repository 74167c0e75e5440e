//! The worker helper: one `WorkerService/Connect` stream per session, with
//! batching, heartbeats, cancels, drains and reconnects handled here. Given
//! several sidecar addresses (replicas sharing one store), the worker connects
//! to the first that answers and, when that session ends, reconnects to the
//! next. A refused credential is final: `run` returns `Error::Refused`
//! instead of reconnecting.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;

use crate::carv1::{
    self, call_result, runtime_call, worker_service_client::WorkerServiceClient, AgentOutput, AgentSpec, Assignment,
    AssignmentResult, ConnectRequest, ConnectResponse, RuntimeCall,
};
use crate::values::{opt_from_value, to_value};
use crate::{addresses, BoxError, Error};

/// Names this helper in the worker's hello.
pub const SDK: &str = "carsvc-rust/0.1.0";

/// The largest message a worker or client channel sends or receives by
/// default: 16 MiB, the sidecar's `max_message_bytes` (tonic's own decoding
/// default is 4 MiB, too small for a reducer's task).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// tonic reports a message prost could not decode as `Internal` with this prefix.
const DECODE_ERROR: &str = "failed to decode Protobuf message";

/// `Error::UndecodableFrame` for a status that says a message could not be decoded.
pub(crate) fn classify(status: tonic::Status) -> Error {
    if status.code() == tonic::Code::Internal && status.message().starts_with(DECODE_ERROR) {
        Error::UndecodableFrame(status)
    } else {
        Error::Status(status)
    }
}

type ConnectHook = Arc<dyn Fn(&str) + Send + Sync>;
type LogHook = Arc<dyn Fn(LogLevel, &str) + Send + Sync>;

/// How important a line the worker logs is (see [`Worker::on_log`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warn,
    Error,
}

type HandlerFn =
    Arc<dyn Fn(AgentContext) -> Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send>> + Send + Sync>;

/// A worker process's connection to the sidecar. Configure it with the
/// builder methods, register agents with [`Worker::agent`], then run it.
pub struct Worker {
    target: String,
    worker_id: String,
    max_in_flight: u32,
    labels: HashMap<String, String>,
    reconnect: bool,
    reconnect_max_delay: Duration,
    max_message_bytes: usize,
    stop_on_drain: bool,
    token: Option<String>,
    on_connect: Option<ConnectHook>,
    on_log: Option<LogHook>,
    handlers: Vec<(String, HandlerFn)>,
}

/// Statuses of the `Connect` stream that no reconnect can fix.
pub const REFUSED_CODES: [tonic::Code; 2] = [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied];

/// A token travels as metadata: printable ASCII without spaces.
fn valid_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

impl Worker {
    /// A worker for the sidecar at `target`: "host:port", or several
    /// replicas' addresses separated by commas, tried in turn from the first
    /// (each connection attempt goes to the next).
    pub fn new(target: impl Into<String>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "worker".into());
        Worker {
            target: target.into(),
            worker_id: format!("{host}-{}", std::process::id()),
            max_in_flight: 1,
            labels: HashMap::new(),
            reconnect: true,
            reconnect_max_delay: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            stop_on_drain: false,
            token: None,
            on_connect: None,
            on_log: None,
            handlers: Vec::new(),
        }
    }

    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Assignments held at once (default 1).
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Reconnect with backoff after the stream ends (default true): the
    /// sidecar crashed or drained this worker, or sent a frame it could not
    /// decode. Every attempt opens a fresh connection, to the next address
    /// when there are several, with one backoff across them all.
    pub fn reconnect(mut self, on: bool) -> Self {
        self.reconnect = on;
        self
    }

    /// The backoff cap between reconnect attempts (default 5 s; the backoff
    /// starts at 100 ms and doubles).
    pub fn reconnect_max_delay(mut self, delay: Duration) -> Self {
        self.reconnect_max_delay = delay;
        self
    }

    /// The largest message the worker sends or receives (default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`], 16 MiB, the sidecar's own limit).
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// Return from `run` after a drain instead of reconnecting (default false).
    pub fn stop_on_drain(mut self, on: bool) -> Self {
        self.stop_on_drain = on;
        self
    }

    /// A worker token, sent as `authorization: Bearer <token>` metadata on the
    /// `Connect` stream. A refused token ends `run` with `Error::Refused`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Called with the session id after every welcome.
    pub fn on_connect(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_connect = Some(Arc::new(f));
        self
    }

    /// Where the worker's log lines go (default: stderr, as
    /// `carsvc worker <id>: [error: ]<message>`).
    pub fn on_log(mut self, f: impl Fn(LogLevel, &str) + Send + Sync + 'static) -> Self {
        self.on_log = Some(Arc::new(f));
        self
    }

    fn log(&self, level: LogLevel, message: &str) {
        match &self.on_log {
            Some(f) => f(level, message),
            None if level == LogLevel::Error => eprintln!("carsvc worker {}: error: {message}", self.worker_id),
            None => eprintln!("carsvc worker {}: {message}", self.worker_id),
        }
    }

    /// Serves agent `name` (an exact name or a glob such as `mapper*`). The
    /// handler returns the answer; an error becomes the output's error. When
    /// the sidecar cancels the assignment the handler's future is dropped.
    pub fn agent<F, Fut>(mut self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(AgentContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        let f: HandlerFn = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.push((name.into(), f));
        self
    }

    pub fn id(&self) -> &str {
        &self.worker_id
    }

    fn handler_for(&self, agent: &str) -> Option<HandlerFn> {
        self.handlers
            .iter()
            .find(|(name, _)| name == agent)
            .or_else(|| self.handlers.iter().find(|(pattern, _)| glob_match(pattern, agent)))
            .map(|(_, h)| h.clone())
    }

    /// Serves until the stream ends for good (see `run_until`).
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(std::future::pending()).await
    }

    /// Serves until `shutdown` completes (then running handlers are dropped and
    /// the stream closed), or the session ends and reconnecting is off (`Ok`
    /// after a drain). After a drain it reconnects, or returns `Ok` with
    /// `stop_on_drain`. When the sidecar refuses the worker's credentials it
    /// returns `Error::Refused` at once, whatever `reconnect` says.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        if self.handlers.is_empty() {
            return Err(Error::Other("register at least one agent before run".into()));
        }
        if self.token.as_deref().is_some_and(|t| !valid_token(t)) {
            return Err(Error::Other(
                "the worker token is not a valid token: tokens are printable ASCII without spaces".into(),
            ));
        }
        let targets = addresses(&self.target);
        if targets.is_empty() {
            return Err(Error::Other(format!("no sidecar address in {:?}", self.target)));
        }
        let me = Arc::new(self);
        tokio::pin!(shutdown);
        let first_delay = Duration::from_millis(100).min(me.reconnect_max_delay);
        let mut delay = first_delay;
        let mut attempt = 0u32; // reconnect attempts since the last session that lasted
        for turn in 0.. {
            // Every attempt goes to the next address: a replica that died or
            // drained this worker is tried again only after the others.
            let target = &targets[turn % targets.len()];
            let connected_at = Arc::new(Mutex::new(None));
            let outcome = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                outcome = me.clone().session(target.clone(), connected_at.clone()) => outcome,
            };
            let (drained, err) = match outcome {
                Ok(drained) => (drained, None),
                Err(Error::Status(status)) if REFUSED_CODES.contains(&status.code()) => {
                    let refused = Error::Refused { target: target.clone(), status };
                    me.log(LogLevel::Error, &format!("{refused}; not reconnecting"));
                    return Err(refused);
                }
                Err(e) => (false, Some(e)),
            };
            if drained && (me.stop_on_drain || !me.reconnect) {
                return Ok(());
            }
            if !me.reconnect {
                if let Some(e @ Error::UndecodableFrame(_)) = &err {
                    me.log(LogLevel::Error, &format!("{e}; not reconnecting (reconnect is off)"));
                }
                return Err(err.unwrap_or(Error::SessionEnded));
            }
            let connected_at: Option<Instant> = *connected_at.lock().unwrap();
            if connected_at.is_some_and(|at| at.elapsed() > Duration::from_secs(10)) {
                delay = first_delay;
                attempt = 0;
            }
            attempt += 1;
            let next = format!("reconnecting in {delay:?} (attempt {attempt})");
            match &err {
                None => me.log(LogLevel::Info, &format!("drained by {target}; {next}")),
                Some(e @ Error::UndecodableFrame(_)) => {
                    me.log(LogLevel::Error, &format!("{e} (at {target}); the session is lost, {next}"))
                }
                Some(e) => me.log(LogLevel::Warn, &format!("session ended ({e}) at {target}; {next}")),
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(me.reconnect_max_delay);
        }
        unreachable!("the addresses are tried in turn forever")
    }

    /// One connection to `target`; Ok(true) when the sidecar drained us.
    /// Every session connects afresh, so no channel backoff outlives an
    /// attempt. `connected_at` is set when the sidecar welcomes the worker.
    async fn session(
        self: Arc<Self>,
        target: String,
        connected_at: Arc<Mutex<Option<Instant>>>,
    ) -> Result<bool, Error> {
        let channel = Endpoint::from_shared(format!("http://{target}"))?.connect().await?;
        let mut client = WorkerServiceClient::new(channel)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        let (tx, rx) = mpsc::channel::<ConnectRequest>(64);
        let hello = carv1::WorkerHello {
            worker_id: self.worker_id.clone(),
            agents: self.handlers.iter().map(|(n, _)| n.clone()).collect(),
            max_in_flight: self.max_in_flight,
            labels: self.labels.clone(),
            sdk: SDK.into(),
        };
        let _ = tx.send(ConnectRequest { hello: Some(hello), ..Default::default() }).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = &self.token {
            let value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| Error::Other("the worker token is not a valid token".into()))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = client.connect(request).await?.into_inner();
        let first = inbound.message().await.map_err(classify)?.ok_or(Error::SessionEnded)?;
        let mut heartbeat = Duration::from_millis(2500);
        if let Some(welcome) = &first.welcome {
            if welcome.heartbeat_interval_ms > 0 {
                // Send well within the interval so one slow frame never lapses the lease.
                heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms) / 2);
            }
            *connected_at.lock().unwrap() = Some(Instant::now());
            let agents: Vec<&str> = self.handlers.iter().map(|(n, _)| n.as_str()).collect();
            self.log(
                LogLevel::Info,
                &format!("connected to {target} (session {}), serving {}", welcome.session_id, agents.join(", ")),
            );
            if let Some(f) = &self.on_connect {
                f(&welcome.session_id);
            }
        }
        let link = Arc::new(Link::default());
        let _guard = EndOnDrop(link.clone());
        tokio::spawn(send_loop(link.clone(), tx, heartbeat));
        let mut frame = first;
        loop {
            self.on_frame(&link, frame);
            match inbound.message().await {
                Ok(Some(next)) => frame = next,
                Ok(None) => {
                    return if link.draining() {
                        Ok(true)
                    } else {
                        Err(Error::Other("the sidecar ended the session".into()))
                    }
                }
                Err(status) => return if link.draining() { Ok(true) } else { Err(classify(status)) },
            }
        }
    }

    fn on_frame(self: &Arc<Self>, link: &Arc<Link>, frame: ConnectResponse) {
        for assignment in frame.assignments {
            self.start(link, assignment);
        }
        if !frame.cancels.is_empty() {
            let mut st = link.state.lock().unwrap();
            for cancel in frame.cancels {
                if let Some(running) = st.running.remove(&cancel.assignment_id) {
                    // Stop the agent and answer the cancel at once.
                    running.abort.abort();
                    let output = AgentOutput {
                        name: running.name,
                        error: Some(format!("cancelled: {}", cancel.reason)),
                        ..Default::default()
                    };
                    st.push_result(cancel.assignment_id, running.attempt, output);
                }
            }
            drop(st);
            link.wake.notify_one();
        }
        if !frame.call_results.is_empty() {
            let mut st = link.state.lock().unwrap();
            for result in frame.call_results {
                if let Some(waiter) = st.pending.remove(&result.call_id) {
                    let _ = waiter.send(result);
                }
            }
        }
        for e in frame.errors {
            self.log(LogLevel::Warn, &format!("the sidecar refused {}: {}", e.field, e.message));
        }
        if let Some(drain) = frame.drain {
            self.log(LogLevel::Info, &format!("draining ({})", drain.reason));
            let mut st = link.state.lock().unwrap();
            st.draining = true;
            if st.running.is_empty() {
                st.closed = true;
            }
            drop(st);
            link.wake.notify_one();
        }
    }

    fn start(self: &Arc<Self>, link: &Arc<Link>, assignment: Assignment) {
        let ctx = AgentContext::new(link.clone(), &assignment);
        let handler = self.handler_for(&ctx.agent);
        let (id, attempt, name) = (assignment.assignment_id.clone(), assignment.attempt, ctx.name.clone());
        #[cfg(feature = "otel")]
        let span = crate::otel::start(&ctx, &self.worker_id);
        let mut st = link.state.lock().unwrap();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let work = async {
                match handler {
                    Some(h) => h(ctx.clone()).await,
                    None => Err(format!("this worker has no handler for agent '{}'", ctx.agent).into()),
                }
            };
            #[cfg(feature = "otel")]
            let work = opentelemetry::trace::FutureExt::with_context(work, span.clone());
            let result = work.await;
            let mut output = AgentOutput { name: ctx.name.clone(), ..Default::default() };
            match result {
                Ok(answer) => {
                    output.answer = answer;
                    output.turns = 1;
                }
                Err(e) => output.error = Some(e.to_string()),
            }
            let usage = *ctx.usage.lock().unwrap();
            if usage != carv1::TokenAccounting::default() {
                output.tokens = Some(usage);
            }
            output.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            #[cfg(feature = "otel")]
            crate::otel::end(&span, &output);
            output
        });
        st.running.insert(id.clone(), Running { abort: task.abort_handle(), attempt, name: name.clone() });
        drop(st);
        let link = link.clone();
        tokio::spawn(async move {
            let output = match task.await {
                Ok(output) => output,
                Err(e) if e.is_panic() => {
                    AgentOutput { name, error: Some("the handler panicked".into()), ..Default::default() }
                }
                Err(_) => return, // aborted: the cancel was answered already
            };
            link.finish(id, attempt, output);
        });
    }
}

fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

struct Running {
    abort: AbortHandle,
    attempt: u32,
    name: String,
}

#[derive(Default)]
struct LinkState {
    results: Vec<AssignmentResult>,
    calls: Vec<RuntimeCall>,
    pending: HashMap<String, oneshot::Sender<carv1::CallResult>>,
    running: HashMap<String, Running>,
    closed: bool,
    draining: bool,
    next_id: u64,
}

impl LinkState {
    fn push_result(&mut self, assignment_id: String, attempt: u32, output: AgentOutput) {
        if self.closed {
            return;
        }
        // Echo both the id and the attempt: a result for a superseded attempt is ignored.
        self.results.push(AssignmentResult { assignment_id, attempt, output: Some(output) });
        if self.draining && self.running.is_empty() {
            self.closed = true;
        }
    }
}

/// One connected session: its outbox, the calls waiting for answers and the
/// running assignments.
#[derive(Default)]
struct Link {
    state: Mutex<LinkState>,
    wake: Notify,
}

impl Link {
    fn draining(&self) -> bool {
        self.state.lock().unwrap().draining
    }

    fn finish(&self, id: String, attempt: u32, output: AgentOutput) {
        let mut st = self.state.lock().unwrap();
        if st.running.remove(&id).is_none() {
            return;
        }
        st.push_result(id, attempt, output);
        drop(st);
        self.wake.notify_one();
    }

    async fn call(&self, mut call: RuntimeCall) -> Result<call_result::Result, Error> {
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.state.lock().unwrap();
            if st.closed {
                return Err(Error::SessionEnded);
            }
            st.next_id += 1;
            call.call_id = st.next_id.to_string();
            st.pending.insert(call.call_id.clone(), tx);
            st.calls.push(call);
        }
        self.wake.notify_one();
        let result = rx.await.map_err(|_| Error::SessionEnded)?;
        match result.result {
            Some(call_result::Result::Error(e)) => {
                Err(Error::Call { code: tonic::Code::from_i32(e.code), message: e.message })
            }
            Some(r) => Ok(r),
            None => Err(Error::Other("the sidecar answered a call with no result".into())),
        }
    }

    fn fire(&self, call: RuntimeCall) {
        let mut st = self.state.lock().unwrap();
        if !st.closed {
            st.calls.push(call);
        }
        drop(st);
        self.wake.notify_one();
    }

    fn end(&self) {
        let mut st = self.state.lock().unwrap();
        st.closed = true;
        st.pending.clear(); // waiting calls fail with SessionEnded
        for (_, running) in st.running.drain() {
            running.abort.abort();
        }
        drop(st);
        self.wake.notify_one();
    }
}

struct EndOnDrop(Arc<Link>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// The only sender: batches everything queued into one frame, and sends a
/// heartbeat after half an interval of silence. Returning drops `tx`, which
/// closes the worker's side of the stream.
async fn send_loop(link: Arc<Link>, tx: mpsc::Sender<ConnectRequest>, heartbeat: Duration) {
    loop {
        let timed_out = tokio::time::timeout(heartbeat, link.wake.notified()).await.is_err();
        let (frame, closed) = {
            let mut st = link.state.lock().unwrap();
            let frame = ConnectRequest {
                results: std::mem::take(&mut st.results),
                calls: std::mem::take(&mut st.calls),
                ..Default::default()
            };
            (frame, st.closed)
        };
        let frame = if !frame.results.is_empty() || !frame.calls.is_empty() {
            Some(frame)
        } else if timed_out && !closed {
            Some(ConnectRequest { heartbeat: Some(carv1::Heartbeat {}), ..Default::default() })
        } else {
            None
        };
        if let Some(frame) = frame {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
        if closed {
            return;
        }
    }
}

/// A client's answer to a suspended tool call.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Resume (true) or cancel (false).
    pub approved: bool,
    /// The value a resume carries.
    pub result: Json,
    pub reason: String,
    pub decision_id: String,
}

/// One assignment as its handler sees it, with the runtime calls an agent
/// makes back into the sidecar.
#[derive(Clone)]
pub struct AgentContext {
    pub assignment_id: String,
    pub attempt: u32,
    pub run_id: String,
    pub thread_id: String,
    /// The name the worker was matched on (Assignment.agent).
    pub agent: String,
    /// The instance name a pattern may have chosen (mapper i runs as `{mapper}_{i}`).
    pub name: String,
    pub task: String,
    pub spec: AgentSpec,
    pub deadline_unix_ms: i64,
    /// The step's W3C trace context from the sidecar (`traceparent`,
    /// `tracestate`; empty when it does not trace). With the `otel` feature the
    /// SDK makes the agent's span its child; without it, hand it to any tracer.
    pub trace_context: HashMap<String, String>,
    link: Arc<Link>,
    usage: Arc<Mutex<carv1::TokenAccounting>>,
}

impl AgentContext {
    fn new(link: Arc<Link>, a: &Assignment) -> Self {
        let spec = a.spec.clone().unwrap_or_default();
        let agent = if a.agent.is_empty() { spec.name.clone() } else { a.agent.clone() };
        AgentContext {
            assignment_id: a.assignment_id.clone(),
            attempt: a.attempt,
            run_id: a.run_id.clone(),
            thread_id: a.thread_id.clone(),
            agent,
            name: spec.name.clone(),
            task: a.task.clone(),
            spec,
            deadline_unix_ms: a.deadline_unix_ms,
            trace_context: a.trace_context.clone(),
            link,
            usage: Arc::default(),
        }
    }

    /// Makes any runtime call and waits for its result.
    pub async fn call(&self, op: runtime_call::Op) -> Result<call_result::Result, Error> {
        self.link
            .call(RuntimeCall { call_id: String::new(), assignment_id: self.assignment_id.clone(), op: Some(op) })
            .await
    }

    fn fire(&self, op: runtime_call::Op) {
        self.link.fire(RuntimeCall { call_id: String::new(), assignment_id: self.assignment_id.clone(), op: Some(op) });
    }

    /// Adds self-reported spend to the output (the run's budget adds it up).
    pub fn report_usage(&self, input_tokens: u64, output_tokens: u64, cost_usd: f64) {
        let mut u = self.usage.lock().unwrap();
        u.input_tokens += input_tokens;
        u.output_tokens += output_tokens;
        u.cost_usd += cost_usd;
    }

    /// Reads a key of the run's state (the agent's overlay when isolated).
    pub async fn state_get(&self, key: &str) -> Result<Option<Json>, Error> {
        match self.call(runtime_call::Op::StateGet(carv1::StateGetCall { key: key.into() })).await? {
            call_result::Result::StateGet(r) if r.found => Ok(Some(opt_from_value(&r.value))),
            _ => Ok(None),
        }
    }

    /// Writes a key; returns the transition index.
    pub async fn state_set(&self, key: &str, value: Json) -> Result<u64, Error> {
        let op = runtime_call::Op::StateSet(carv1::StateSetCall { key: key.into(), value: Some(to_value(&value)) });
        match self.call(op).await? {
            call_result::Result::StateWrite(w) => Ok(w.index),
            _ => Ok(0),
        }
    }

    /// Deletes a key; returns whether it existed.
    pub async fn state_delete(&self, key: &str) -> Result<bool, Error> {
        match self.call(runtime_call::Op::StateDelete(carv1::StateDeleteCall { key: key.into() })).await? {
            call_result::Result::StateWrite(w) => Ok(w.existed),
            _ => Ok(false),
        }
    }

    /// Lists keys starting with `prefix`, sorted.
    pub async fn state_keys(&self, prefix: &str) -> Result<Vec<String>, Error> {
        match self.call(runtime_call::Op::StateKeys(carv1::StateKeysCall { prefix: prefix.into() })).await? {
            call_result::Result::StateKeys(k) => Ok(k.keys),
            _ => Ok(Vec::new()),
        }
    }

    /// Sends a message to another agent of the run.
    pub async fn send(&self, to: &str, payload: Json) -> Result<(), Error> {
        self.mailbox_send(to, payload, false).await
    }

    /// Sends a message to every other agent of the run.
    pub async fn broadcast(&self, payload: Json) -> Result<(), Error> {
        self.mailbox_send("", payload, true).await
    }

    async fn mailbox_send(&self, to: &str, payload: Json, broadcast: bool) -> Result<(), Error> {
        let message = carv1::Message {
            to_agent: to.into(),
            kind: carv1::MessageKind::Custom as i32,
            payload: Some(to_value(&payload)),
            ..Default::default()
        };
        self.call(runtime_call::Op::MailboxSend(carv1::MailboxSendCall { message: Some(message), broadcast }))
            .await
            .map(|_| ())
    }

    /// Waits for the next message to this agent (None: the sidecar's default
    /// timeout). A timeout is `Error::Call` with `Code::DeadlineExceeded`.
    pub async fn recv(&self, timeout: Option<Duration>) -> Result<carv1::Message, Error> {
        let timeout_ms = timeout.map(|t| t.as_millis() as u32).unwrap_or(0);
        match self.call(runtime_call::Op::MailboxRecv(carv1::MailboxRecvCall { timeout_ms })).await? {
            call_result::Result::Message(m) => Ok(m),
            _ => Err(Error::Other("mailbox_recv answered without a message".into())),
        }
    }

    /// Appends a custom event to the run's stream (fire and forget).
    pub fn emit(&self, kind: &str, payload: Json) {
        self.fire(runtime_call::Op::Emit(carv1::EmitEventCall {
            kind: kind.into(),
            payload: Some(to_value(&payload)),
        }));
    }

    /// Reports progress to the run's watchers (fire and forget).
    pub fn progress(&self, message: &str, fraction: Option<f64>) {
        self.fire(runtime_call::Op::Progress(carv1::ProgressCall { message: message.into(), fraction }));
    }

    /// Suspends a tool call until a client approves or denies it (human in the
    /// loop). The tool must be in the agent's spec; the run is WAITING meanwhile.
    pub async fn suspend_tool_call(
        &self,
        tool_call_id: &str,
        tool_name: &str,
        arguments: Json,
        reason: &str,
        timeout: Option<Duration>,
    ) -> Result<Decision, Error> {
        let op = runtime_call::Op::SuspendToolCall(carv1::SuspendToolCall {
            tool_call_id: tool_call_id.into(),
            tool_name: tool_name.into(),
            arguments: Some(to_value(&arguments)),
            reason: reason.into(),
            timeout_ms: timeout.map(|t| t.as_millis() as u32).unwrap_or(0),
        });
        match self.call(op).await? {
            call_result::Result::Decision(d) => Ok(Decision {
                approved: d.action == carv1::DecisionAction::Resume as i32,
                result: opt_from_value(&d.result),
                reason: d.reason,
                decision_id: d.decision_id,
            }),
            _ => Err(Error::Other("suspend_tool_call answered without a decision".into())),
        }
    }

    /// Hands `subtask` to a named specialist (delegator pattern); returns its output.
    pub async fn delegate(&self, specialist: &str, subtask: &str) -> Result<AgentOutput, Error> {
        let op =
            runtime_call::Op::Delegate(carv1::DelegateCall { specialist: specialist.into(), subtask: subtask.into() });
        match self.call(op).await? {
            call_result::Result::AgentOutput(o) => Ok(o),
            _ => Err(Error::Other("delegate answered without an output".into())),
        }
    }

    /// Spawns an ephemeral sub-agent with a subset of this agent's tools.
    pub async fn spawn_subtask(&self, task: &str, tools: Vec<String>, name: &str) -> Result<AgentOutput, Error> {
        let op =
            runtime_call::Op::SpawnSubtask(carv1::SpawnSubtaskCall { task: task.into(), tools, name: name.into() });
        match self.call(op).await? {
            call_result::Result::AgentOutput(o) => Ok(o),
            _ => Err(Error::Other("spawn_subtask answered without an output".into())),
        }
    }

    /// Asks the run's advisor (advisor pattern) for a verdict.
    pub async fn consult_advisor(&self, prompt: &str) -> Result<carv1::AdvisorConsultation, Error> {
        match self.call(runtime_call::Op::ConsultAdvisor(carv1::ConsultAdvisorCall { prompt: prompt.into() })).await? {
            call_result::Result::Consultation(c) => Ok(c),
            _ => Err(Error::Other("consult_advisor answered without a consultation".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{glob_match, valid_token, Worker, REFUSED_CODES};
    use crate::Error;

    #[test]
    fn refused_credentials_are_final() {
        assert!(REFUSED_CODES.contains(&tonic::Code::Unauthenticated));
        assert!(REFUSED_CODES.contains(&tonic::Code::PermissionDenied));
        assert!(!REFUSED_CODES.contains(&tonic::Code::Unavailable));
        let e = Error::Refused {
            target: "127.0.0.1:50051".into(),
            status: tonic::Status::unauthenticated("the bearer token is not a worker token of this sidecar"),
        };
        assert_eq!(
            e.to_string(),
            "the sidecar at 127.0.0.1:50051 refused the worker's credentials \
             (Unauthenticated: the bearer token is not a worker token of this sidecar); check the worker token"
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn tokens_are_printable_ascii_without_spaces() {
        assert!(valid_token("w-8b7f2c41d0e6a95f3e1b"));
        assert!(!valid_token(""));
        assert!(!valid_token("two words"));
        assert!(!valid_token("tab\there"));
        assert!(!valid_token("caf\u{e9}"));
    }

    #[tokio::test]
    async fn a_malformed_token_fails_before_connecting() {
        let worker = Worker::new("127.0.0.1:1").token("two words").agent("a", |_ctx| async { Ok(String::new()) });
        match worker.run().await {
            Err(Error::Other(m)) => assert!(m.contains("not a valid token") && !m.contains("two words"), "{m}"),
            other => panic!("run returned {other:?}"),
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("mapper*", "mapper_3"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("mapper", "mapper_3"));
        assert!(!glob_match("a?c", "ac"));
    }
}
