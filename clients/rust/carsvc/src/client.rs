//! The client helper: start a run of any pattern, watch it from a seq,
//! cancel it, answer its suspended tool calls.

use prost::Message as _;
use serde_json::Value as Json;
use tonic::transport::{Channel, Endpoint};

use crate::carv1::{
    self, agent_ref, event_service_client::EventServiceClient, registry_service_client::RegistryServiceClient,
    run_service_client::RunServiceClient, start_run_request::Pattern, state_service_client::StateServiceClient,
    AgentRef, AgentSpec, BudgetLimits, CancelRunRequest, CancelRunResponse, GetRunRequest, MapReduceRun, OnBusy,
    ReadRunResultRequest, Run, RunEvent, RunHandle, RunResult, SingleRun, StartRunRequest, SubmitDecisionsRequest,
    SubmitDecisionsResponse, ToolCallDecision, WatchRunRequest, WatchRunResponse,
};
use crate::values::to_value;
use crate::{Error, DEFAULT_MAX_MESSAGE_BYTES};

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

/// Starts, watches, inspects, cancels and answers runs. The generated stubs
/// are public for everything the helpers do not cover; cloning is cheap.
#[derive(Clone)]
pub struct Client {
    pub runs: RunServiceClient<Channel>,
    pub events: EventServiceClient<Channel>,
    pub registry: RegistryServiceClient<Channel>,
    pub state: StateServiceClient<Channel>,
}

/// A run's events in seq order; `next` is None after run_finished.
pub struct EventStream {
    inner: tonic::codec::Streaming<WatchRunResponse>,
    batch: std::collections::VecDeque<RunEvent>,
}

impl EventStream {
    /// The next event; Ok(None) once the run has finished and every event was read.
    pub async fn next(&mut self) -> Result<Option<RunEvent>, Error> {
        loop {
            if let Some(event) = self.batch.pop_front() {
                return Ok(Some(event));
            }
            match self.inner.message().await? {
                Some(batch) => self.batch.extend(batch.events),
                None => return Ok(None),
            }
        }
    }
}

impl Client {
    /// A client for the sidecar at `target` ("host:port"); connects lazily.
    /// Its stubs send and receive messages up to [`DEFAULT_MAX_MESSAGE_BYTES`]
    /// (16 MiB, the sidecar's limit; change it with [`Client::max_message_bytes`]).
    /// A response the client cannot decode fails its call with
    /// `Error::Status` (`Internal`, "failed to decode Protobuf message: ...").
    pub fn connect(target: &str) -> Result<Self, Error> {
        let channel = Endpoint::from_shared(format!("http://{target}"))?.connect_lazy();
        let client = Client {
            runs: RunServiceClient::new(channel.clone()),
            events: EventServiceClient::new(channel.clone()),
            registry: RegistryServiceClient::new(channel.clone()),
            state: StateServiceClient::new(channel),
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
        let response = self.runs.clone().start_run(Self::start_request(pattern, options)).await?;
        response.into_inner().run.ok_or_else(|| Error::Other("StartRun answered without a run".into()))
    }

    /// A run's events after `after_seq` (0: from the first), ending with run_finished.
    pub async fn watch(&self, run_id: &str, after_seq: u64) -> Result<EventStream, Error> {
        let request = WatchRunRequest { run_id: run_id.into(), after_seq };
        let inner = self.runs.clone().watch_run(request).await?.into_inner();
        Ok(EventStream { inner, batch: Default::default() })
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
        let response = self.runs.clone().get_run(request).await?;
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
        Ok(self.runs.clone().cancel_run(request).await?.into_inner())
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
        Ok(self.runs.clone().submit_decisions(request).await?.into_inner())
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
