//! The client helper: start a run of any pattern, watch it from a seq,
//! cancel it, answer its suspended tool calls.
//!
//! Given several sidecar addresses (replicas sharing one store), a client
//! sends its calls to the first that answers; when a call fails because that
//! sidecar went away (`Unavailable`, or a connection that broke under a
//! stream) it moves to the next, and retries there the calls that are
//! safe to repeat (`get_run`, `read_result`, and watches, which resume after
//! the last event they yielded). `start_run`, `cancel` and `submit_decisions`
//! return the error instead: the sidecar may have acted on them.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message as _;
use serde_json::Value as Json;
use tonic::codegen::{http, BoxFuture, Service, StdError};
use tonic::transport::{Channel, Endpoint};

use crate::carv1::{
    self, agent_ref, event_service_client::EventServiceClient, registry_service_client::RegistryServiceClient,
    run_service_client::RunServiceClient, start_run_request::Pattern, state_service_client::StateServiceClient,
    AgentRef, AgentSpec, BudgetLimits, CancelRunRequest, CancelRunResponse, GetRunRequest, MapReduceRun, OnBusy,
    ReadRunResultRequest, Run, RunEvent, RunHandle, RunResult, SingleRun, StartRunRequest, SubmitDecisionsRequest,
    SubmitDecisionsResponse, ToolCallDecision, WatchRunRequest, WatchRunResponse,
};
use crate::values::to_value;
use crate::{addresses, Error, DEFAULT_MAX_MESSAGE_BYTES};

macro_rules! patterns {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(impl From<carv1::$ty> for Pattern {
            fn from(p: carv1::$ty) -> Self {
                Pattern::$variant(p)
            }
        })*
    };
}

patterns! {
    SingleRun => Single, SwarmRun => Swarm, PipelineRun => Pipeline, SupervisorRun => Supervisor,
    DelegatorRun => Delegator, SpawnSubtaskRun => SpawnSubtask, MapReduceRun => MapReduce, VoteRun => Vote,
    FleetRun => Fleet, AdversarialReviewRun => AdversarialReview, TournamentRun => Tournament,
    AdvisorRun => Advisor,
}

/// The optional fields of a StartRunRequest; `..Default::default()` the rest.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub thread_id: String,
    /// The run's owner; cancels and decisions must carry the same id.
    pub agent_id: String,
    pub run_id: String,
    pub on_busy: OnBusy,
    pub budget: Option<BudgetLimits>,
    pub budget_id: String,
    pub state_scope: String,
    pub labels: std::collections::HashMap<String, String>,
    pub timeout_ms: u32,
    pub initial_decisions: Vec<ToolCallDecision>,
    /// With a journal, whether the run resumes after a sidecar restart
    /// (None: the sidecar's `resume_runs` setting, on by default).
    pub resume: Option<bool>,
}

/// Whether a call's status says its sidecar could not be reached or went
/// away: `Unavailable`, or `Unknown` with a transport error as its source
/// (tonic's status for a connection that broke under a stream, e.g. "error
/// reading a body from connection" when the sidecar was killed).
fn sidecar_gone(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        || (status.code() == tonic::Code::Unknown && std::error::Error::source(status).is_some())
}

/// How long a client waits for one of several addresses to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The transport under a [`Client`]'s stubs: the channel to the sidecar, or,
/// given several addresses, to the first that accepts a connection. A call
/// that fails on a connection (refused, broken) drops it, and the next call
/// connects to the next address that answers. Cloning is cheap.
#[derive(Clone)]
pub struct Sidecars(Arc<SidecarsInner>);

struct SidecarsInner {
    targets: Vec<String>,
    /// One address: a lazy channel that reconnects by itself, never dropped.
    fixed: Option<Channel>,
    current: tokio::sync::Mutex<Current>,
}

/// The address in use and its channel; `generation` names the channel.
#[derive(Default)]
struct Current {
    at: usize,
    channel: Option<Channel>,
    generation: u64,
}

fn endpoint(target: &str) -> Result<Endpoint, Error> {
    Ok(Endpoint::from_shared(format!("http://{target}"))?)
}

impl Sidecars {
    fn new(targets: Vec<String>) -> Result<Self, Error> {
        for target in &targets {
            endpoint(target)?;
        }
        let fixed = match targets.as_slice() {
            [only] => Some(endpoint(only)?.connect_lazy()),
            _ => None,
        };
        Ok(Sidecars(Arc::new(SidecarsInner { targets, fixed, current: Default::default() })))
    }

    /// The sidecar addresses.
    pub fn targets(&self) -> &[String] {
        &self.0.targets
    }

    /// The address calls go to now.
    pub async fn target(&self) -> String {
        self.0.targets[self.0.current.lock().await.at].clone()
    }

    /// The channel calls go to, connecting to the first address that answers
    /// (from the current one) when there is none; and its generation.
    async fn channel(&self) -> Result<(u64, Channel), tonic::Status> {
        if let Some(channel) = &self.0.fixed {
            return Ok((0, channel.clone()));
        }
        let targets = &self.0.targets;
        let mut current = self.0.current.lock().await;
        if let Some(channel) = &current.channel {
            return Ok((current.generation, channel.clone()));
        }
        let mut failures = Vec::new();
        for _ in 0..targets.len() {
            let target = &targets[current.at];
            let connecting = endpoint(target).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            match connecting.connect_timeout(CONNECT_TIMEOUT).connect().await {
                Ok(channel) => {
                    current.generation += 1;
                    current.channel = Some(channel.clone());
                    return Ok((current.generation, channel));
                }
                Err(e) => {
                    failures.push(format!("{target}: {}", Error::Transport(e)));
                    current.at = (current.at + 1) % targets.len();
                }
            }
        }
        Err(tonic::Status::unavailable(format!("no sidecar answered ({})", failures.join("; "))))
    }

    /// The generation of the channel in use (0: none).
    async fn generation(&self) -> u64 {
        self.0.current.lock().await.generation
    }

    /// A call on channel `generation` failed with the connection: drop it and
    /// move on to the next address (unless a concurrent call did already).
    async fn failed(&self, generation: u64) {
        if self.0.fixed.is_some() {
            return;
        }
        let mut current = self.0.current.lock().await;
        if current.generation == generation && current.channel.is_some() {
            current.channel = None;
            current.at = (current.at + 1) % self.0.targets.len();
        }
    }
}

impl Service<http::Request<tonic::body::Body>> for Sidecars {
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(())) // each call waits for its own channel
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let (generation, mut channel) = me.channel().await?;
            let sent = async {
                std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
                channel.call(request).await
            };
            match sent.await {
                Ok(response) => Ok(response),
                Err(e) => {
                    me.failed(generation).await;
                    Err(e.into())
                }
            }
        })
    }
}

/// Starts, watches, inspects, cancels and answers runs. The generated stubs
/// are public for everything the helpers do not cover (over [`Sidecars`], the
/// client's connection); cloning is cheap.
#[derive(Clone)]
pub struct Client {
    pub runs: RunServiceClient<Sidecars>,
    pub events: EventServiceClient<Sidecars>,
    pub registry: RegistryServiceClient<Sidecars>,
    pub state: StateServiceClient<Sidecars>,
    sidecars: Sidecars,
}

/// A run's events in seq order; `next` is None after run_finished. With
/// several addresses, a watch whose sidecar went away resumes at the next
/// after the last event it yielded.
pub struct EventStream {
    client: Client,
    request: WatchRunRequest,
    inner: tonic::codec::Streaming<WatchRunResponse>,
    batch: std::collections::VecDeque<RunEvent>,
    tries: usize, // resumes since the last event
}

impl EventStream {
    /// The next event; Ok(None) once the run has finished and every event was read.
    pub async fn next(&mut self) -> Result<Option<RunEvent>, Error> {
        loop {
            if let Some(event) = self.batch.pop_front() {
                self.request.after_seq = event.seq;
                self.tries = 0;
                return Ok(Some(event));
            }
            match self.inner.message().await {
                Ok(Some(batch)) => self.batch.extend(batch.events),
                Ok(None) => return Ok(None),
                Err(status) if self.client.again(&status, self.tries + 1).await => {
                    self.tries += 1;
                    self.inner = self.client.open_watch(self.request.clone()).await?;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }
}

impl Client {
    /// A client for the sidecar at `target` ("host:port", or several
    /// replicas' addresses separated by commas: see the module's notes);
    /// connects lazily. Its stubs send and receive messages up to
    /// [`DEFAULT_MAX_MESSAGE_BYTES`] (16 MiB, the sidecar's limit; change it
    /// with [`Client::max_message_bytes`]). A response the client cannot
    /// decode fails its call with `Error::Status` (`Internal`, "failed to
    /// decode Protobuf message: ...").
    pub fn connect(target: &str) -> Result<Self, Error> {
        let targets = addresses(target);
        if targets.is_empty() {
            return Err(Error::Other(format!(
                "no sidecar address in {target:?}: give host:port, or several separated by commas"
            )));
        }
        let sidecars = Sidecars::new(targets)?;
        let client = Client {
            runs: RunServiceClient::new(sidecars.clone()),
            events: EventServiceClient::new(sidecars.clone()),
            registry: RegistryServiceClient::new(sidecars.clone()),
            state: StateServiceClient::new(sidecars.clone()),
            sidecars,
        };
        Ok(client.max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES))
    }

    /// Sets the largest message every stub sends and receives.
    pub fn max_message_bytes(self, n: usize) -> Self {
        Client {
            runs: self.runs.max_decoding_message_size(n).max_encoding_message_size(n),
            events: self.events.max_decoding_message_size(n).max_encoding_message_size(n),
            registry: self.registry.max_decoding_message_size(n).max_encoding_message_size(n),
            state: self.state.max_decoding_message_size(n).max_encoding_message_size(n),
            sidecars: self.sidecars,
        }
    }

    /// The client's connection: its addresses, and the one calls go to now.
    pub fn sidecars(&self) -> &Sidecars {
        &self.sidecars
    }

    /// Whether a read that failed with `status` is tried again (`tries`
    /// counts this try): with several addresses, after `Unavailable` the
    /// client moves on to the next address, and a read goes on there, up to
    /// once per address.
    async fn again(&self, status: &tonic::Status, tries: usize) -> bool {
        if !sidecar_gone(status) || self.sidecars.0.fixed.is_some() {
            return false;
        }
        self.sidecars.failed(self.sidecars.generation().await).await;
        tries < self.sidecars.targets().len()
    }

    async fn open_watch(
        &self,
        request: WatchRunRequest,
    ) -> Result<tonic::codec::Streaming<WatchRunResponse>, tonic::Status> {
        let mut tries = 1;
        loop {
            match self.runs.clone().watch_run(request.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if self.again(&status, tries).await => tries += 1,
                Err(status) => return Err(status),
            }
        }
    }

    /// Builds the StartRunRequest for a pattern (`SingleRun`, `MapReduceRun`, ...).
    pub fn start_request(pattern: impl Into<Pattern>, o: RunOptions) -> StartRunRequest {
        StartRunRequest {
            thread_id: o.thread_id,
            agent_id: o.agent_id,
            run_id: o.run_id,
            on_busy: o.on_busy as i32,
            budget: o.budget,
            budget_id: o.budget_id,
            state_scope: o.state_scope,
            labels: o.labels,
            pattern: Some(pattern.into()),
            initial_decisions: o.initial_decisions,
            timeout_ms: o.timeout_ms,
            resume: o.resume,
        }
    }

    /// Starts a run and returns its handle at once.
    pub async fn start_run(&self, pattern: impl Into<Pattern>, options: RunOptions) -> Result<RunHandle, Error> {
        let response = match self.runs.clone().start_run(Self::start_request(pattern, options)).await {
            Ok(response) => response,
            Err(status) => {
                self.again(&status, usize::MAX).await; // moves on, never retries
                return Err(status.into());
            }
        };
        response.into_inner().run.ok_or_else(|| Error::Other("StartRun answered without a run".into()))
    }

    /// A run's events after `after_seq` (0: from the first), ending with
    /// run_finished; with several addresses it resumes at the next after
    /// `Unavailable` (see [`EventStream`]).
    pub async fn watch(&self, run_id: &str, after_seq: u64) -> Result<EventStream, Error> {
        let request = WatchRunRequest { run_id: run_id.into(), after_seq };
        let inner = self.open_watch(request.clone()).await?;
        Ok(EventStream { client: self.clone(), request, inner, batch: Default::default(), tries: 0 })
    }

    /// Waits until the run has finished and returns it with its whole result
    /// (see [`Client::get_run`]).
    pub async fn wait(&self, run_id: &str) -> Result<Run, Error> {
        let mut events = self.watch(run_id, 0).await?;
        while events.next().await?.is_some() {}
        self.get_run(run_id).await
    }

    /// Starts a run and waits for it to finish; the run comes with its whole
    /// result (see [`Client::get_run`]).
    pub async fn run(&self, pattern: impl Into<Pattern>, options: RunOptions) -> Result<Run, Error> {
        let handle = self.start_run(pattern, options).await?;
        self.wait(&handle.run_id).await
    }

    /// The run, with its whole result once it has finished: a result too
    /// large to travel inline (over the sidecar's `max_inline_result_bytes`,
    /// 1 MiB; the run has `result_omitted` set) is read with [`Client::read_result`].
    pub async fn get_run(&self, run_id: &str) -> Result<Run, Error> {
        let request = GetRunRequest { run_id: run_id.into(), thread_id: String::new() };
        let mut tries = 1;
        let response = loop {
            match self.runs.clone().get_run(request.clone()).await {
                Ok(response) => break response,
                Err(status) if self.again(&status, tries).await => tries += 1,
                Err(status) => return Err(status.into()),
            }
        };
        let mut run = response.into_inner().run.ok_or_else(|| Error::Other("GetRun answered without a run".into()))?;
        if run.result_omitted {
            run.result = Some(self.read_result(&run.run_id).await?);
        }
        Ok(run)
    }

    /// A finished run's result, read with `RunService.ReadRunResult`: the
    /// chunks of the serialized `RunResult`, concatenated and parsed. This is
    /// how a result that GetRun, ListRuns and run_finished leave out
    /// (`result_omitted`, `result_bytes` long) is read; it works for any
    /// finished run.
    pub async fn read_result(&self, run_id: &str) -> Result<RunResult, Error> {
        let mut tries = 1;
        loop {
            match self.read_result_once(run_id).await {
                Err(Error::Status(status)) if self.again(&status, tries).await => tries += 1,
                done => return done,
            }
        }
    }

    async fn read_result_once(&self, run_id: &str) -> Result<RunResult, Error> {
        let request = ReadRunResultRequest { run_id: run_id.into(), offset: 0 };
        let mut stream = self.runs.clone().read_run_result(request).await?.into_inner();
        let mut data: Vec<u8> = Vec::new();
        let mut total = 0u64;
        while let Some(piece) = stream.message().await? {
            if piece.offset != data.len() as u64 {
                return Err(Error::Other(format!(
                    "run {run_id}: a result chunk at byte {}, expected {}",
                    piece.offset,
                    data.len()
                )));
            }
            if data.is_empty() {
                data.reserve(piece.total_bytes.min(64 << 20) as usize);
            }
            data.extend_from_slice(&piece.chunk);
            total = piece.total_bytes;
        }
        if data.len() as u64 != total {
            return Err(Error::Other(format!(
                "run {run_id}: the result stream ended after {} of {total} bytes",
                data.len()
            )));
        }
        RunResult::decode(data.as_slice())
            .map_err(|e| Error::Other(format!("run {run_id}: the result does not parse: {e}")))
    }

    /// Cancels a run; `agent_id` must be its owner. With `wait` the call
    /// returns once the run has ended. A finished run is not an error.
    pub async fn cancel(
        &self,
        run_id: &str,
        agent_id: &str,
        reason: &str,
        wait: bool,
    ) -> Result<CancelRunResponse, Error> {
        let request = CancelRunRequest {
            run_id: run_id.into(),
            thread_id: String::new(),
            agent_id: agent_id.into(),
            reason: reason.into(),
            wait,
        };
        match self.runs.clone().cancel_run(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                self.again(&status, usize::MAX).await; // moves on, never retries
                Err(status.into())
            }
        }
    }

    /// Answers suspended tool calls of a run (see [`resume`], [`deny`]).
    pub async fn submit_decisions(
        &self,
        run_id: &str,
        agent_id: &str,
        decisions: Vec<ToolCallDecision>,
    ) -> Result<SubmitDecisionsResponse, Error> {
        let request = SubmitDecisionsRequest {
            run_id: run_id.into(),
            thread_id: String::new(),
            agent_id: agent_id.into(),
            decisions,
        };
        match self.runs.clone().submit_decisions(request).await {
            Ok(response) => Ok(response.into_inner()),
            Err(status) => {
                self.again(&status, usize::MAX).await; // moves on, never retries
                Err(status.into())
            }
        }
    }
}

/// An inline agent spec with just a name.
pub fn agent(name: &str) -> AgentRef {
    agent_spec(AgentSpec { name: name.into(), ..Default::default() })
}

/// An inline agent spec: `agent_spec(AgentSpec { name, tools, ..Default::default() })`.
pub fn agent_spec(spec: AgentSpec) -> AgentRef {
    AgentRef { source: Some(agent_ref::Source::Spec(spec)) }
}

/// An agent registered with RegistryService, by name.
pub fn registered(name: &str) -> AgentRef {
    AgentRef { source: Some(agent_ref::Source::RegisteredName(name.into())) }
}

pub fn single(agent: AgentRef, task: &str) -> SingleRun {
    SingleRun { agent: Some(agent), task: task.into() }
}

/// One mapper per item, then the reducer; `max_concurrent` None means the sidecar's 5.
pub fn map_reduce(
    mapper: AgentRef,
    reducer: AgentRef,
    task: &str,
    items: Vec<String>,
    max_concurrent: Option<u32>,
) -> MapReduceRun {
    MapReduceRun { mapper: Some(mapper), reducer: Some(reducer), task: task.into(), items, max_concurrent }
}

/// Approve a suspended tool call; `result` is handed to the waiting agent.
pub fn resume(target_id: &str, result: Json) -> ToolCallDecision {
    ToolCallDecision {
        target_id: target_id.into(),
        action: carv1::DecisionAction::Resume as i32,
        result: Some(to_value(&result)),
        ..Default::default()
    }
}

/// Refuse a suspended tool call.
pub fn deny(target_id: &str, reason: &str) -> ToolCallDecision {
    ToolCallDecision {
        target_id: target_id.into(),
        action: carv1::DecisionAction::Cancel as i32,
        reason: reason.into(),
        ..Default::default()
    }
}
