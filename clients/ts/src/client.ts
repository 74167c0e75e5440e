/**
 * Start, watch, cancel and answer runs from TypeScript (Node.js).
 *
 *     const client = new Client("127.0.0.1:50051");
 *     const run = await client.run(mapReduce(agent("summarizer"), agent("combiner"), "Summarize", ["a", "b"]));
 *     console.log(run.result?.mapReduce?.reducedAnswer);
 *     client.close();
 *
 * A pattern is the StartRunRequest member that names it: the builders below
 * return `{ single: ... }` and `{ mapReduce: ... }`; any other pattern is
 * passed the same way, e.g. `{ swarm: { agents, mode, task } }`.
 */
import { ChannelCredentials, ClientReadableStream, ServiceError } from "@grpc/grpc-js";

import { EventServiceClient, RunEvent } from "./gen/car/v1/events";
import { AgentRef, MapReduceRun, RunResult, SingleRun } from "./gen/car/v1/patterns";
import { RegistryServiceClient } from "./gen/car/v1/registry";
import {
  CancelRunResponse,
  OnBusy,
  ReadRunResultResponse,
  Run,
  RunServiceClient,
  StartRunRequest,
  SubmitDecisionsResponse,
  WatchRunResponse,
} from "./gen/car/v1/runs";
import { StateServiceClient } from "./gen/car/v1/state";
import { messageLimitOptions } from "./worker";
import { AgentSpec, BudgetLimits, DecisionAction, RunHandle, ToolCallDecision } from "./gen/car/v1/types";

const PATTERNS = [
  "single",
  "swarm",
  "pipeline",
  "supervisor",
  "delegator",
  "spawnSubtask",
  "mapReduce",
  "vote",
  "fleet",
  "adversarialReview",
  "tournament",
  "advisor",
] as const;

type PatternName = (typeof PATTERNS)[number];

/** Exactly one pattern member of StartRunRequest, e.g. `{ mapReduce: {...} }`. */
export type Pattern = { [K in PatternName]: { [P in K]: NonNullable<StartRunRequest[K]> } }[PatternName];

export interface RunOptions {
  threadId?: string;
  agentId?: string;
  runId?: string;
  onBusy?: OnBusy;
  budget?: Partial<BudgetLimits>;
  budgetId?: string;
  stateScope?: string;
  labels?: Record<string, string>;
  timeoutMs?: number;
  initialDecisions?: ToolCallDecision[];
}

export interface ClientOptions {
  /** The largest message the client sends or receives; default 16 MiB (the sidecar's limit). */
  maxMessageBytes?: number;
  /** grpc-js channel options; they override the defaults (message limits, reconnect backoff). */
  channelOptions?: Record<string, unknown>;
}

/**
 * The cap on grpc-js's reconnect backoff on a client's channel (its own
 * default grows to 120 s), so calls succeed again within a few seconds after
 * a sidecar outage.
 */
export const CLIENT_RECONNECT_MAX_DELAY_MS = 5000;

type Callback<T> = (err: ServiceError | null, value?: T) => void;

function unary<T>(invoke: (cb: Callback<T>) => unknown): Promise<T> {
  return new Promise((resolve, reject) => {
    invoke((err, value) => (err ? reject(err) : resolve(value as T)));
  });
}

/** A client for the run, event, registry and state services. */
export class Client {
  readonly runs: RunServiceClient;
  readonly events: EventServiceClient;
  readonly registry: RegistryServiceClient;
  readonly state: StateServiceClient;

  /**
   * A client for the sidecar at `target` ("host:port"); connects lazily. A
   * response the client cannot decode fails its call with INTERNAL
   * ("Response message parsing error: ...").
   */
  constructor(target: string, options: ClientOptions = {}) {
    const creds = ChannelCredentials.createInsecure();
    const channelOptions = {
      ...messageLimitOptions(options.maxMessageBytes),
      "grpc.initial_reconnect_backoff_ms": 100,
      "grpc.max_reconnect_backoff_ms": CLIENT_RECONNECT_MAX_DELAY_MS,
      ...options.channelOptions,
    };
    this.runs = new RunServiceClient(target, creds, channelOptions);
    // The other stubs share the run stub's channel.
    const shared = { channelOverride: this.runs.getChannel() };
    this.events = new EventServiceClient(target, creds, shared);
    this.registry = new RegistryServiceClient(target, creds, shared);
    this.state = new StateServiceClient(target, creds, shared);
  }

  close(): void {
    this.runs.close();
  }

  /** Builds the StartRunRequest for a pattern. */
  static startRequest(pattern: Pattern, options: RunOptions = {}): StartRunRequest {
    const names = Object.keys(pattern).filter((k) => (PATTERNS as readonly string[]).includes(k));
    if (names.length !== 1) throw new TypeError(`a run needs exactly one pattern, got: ${names.join(", ") || "none"}`);
    return StartRunRequest.fromPartial({ ...options, ...pattern } as Partial<StartRunRequest>);
  }

  /** Starts a run and returns its handle at once. */
  async startRun(pattern: Pattern, options: RunOptions = {}): Promise<RunHandle> {
    const request = Client.startRequest(pattern, options);
    const response = await unary<{ run?: RunHandle }>((cb) => this.runs.startRun(request, cb));
    return response.run as RunHandle;
  }

  /** A run's events after `afterSeq` (0: from the first), ending with run_finished. */
  async *watch(runId: string, afterSeq = 0): AsyncGenerator<RunEvent> {
    const stream: ClientReadableStream<WatchRunResponse> = this.runs.watchRun({ runId, afterSeq });
    try {
      for await (const batch of stream as AsyncIterable<WatchRunResponse>) {
        for (const event of batch.events) yield event;
      }
    } finally {
      stream.cancel();
    }
  }

  /** Waits until the run has finished and returns it with its whole result (see getRun). */
  async wait(runId: string): Promise<Run> {
    for await (const _ of this.watch(runId)) {
      // drain the events
    }
    return this.getRun(runId);
  }

  /** Starts a run and waits for it to finish; the run comes with its whole result (see getRun). */
  async run(pattern: Pattern, options: RunOptions = {}): Promise<Run> {
    const handle = await this.startRun(pattern, options);
    return this.wait(handle.runId);
  }

  /**
   * The run, with its whole result once it has finished: a result too large
   * to travel inline (over the sidecar's max_inline_result_bytes, 1 MiB; the
   * run has `resultOmitted` set) is read with readResult.
   */
  async getRun(runId: string): Promise<Run> {
    const response = await unary<{ run?: Run }>((cb) => this.runs.getRun({ runId, threadId: "" }, cb));
    const run = response.run as Run;
    if (run.resultOmitted) run.result = await this.readResult(run.runId);
    return run;
  }

  /**
   * A finished run's result, read with RunService.ReadRunResult: the chunks
   * of the serialized RunResult, concatenated and parsed. This is how a result
   * that getRun, listRuns and run_finished leave out (`resultOmitted`,
   * `resultBytes` long) is read; it works for any finished run.
   */
  async readResult(runId: string): Promise<RunResult> {
    const stream: ClientReadableStream<ReadRunResultResponse> = this.runs.readRunResult({ runId, offset: 0 });
    const chunks: Buffer[] = [];
    let have = 0;
    let total = 0;
    try {
      for await (const piece of stream as AsyncIterable<ReadRunResultResponse>) {
        if (piece.offset !== have) {
          throw new Error(`run ${runId}: a result chunk at byte ${piece.offset}, expected ${have}`);
        }
        chunks.push(piece.chunk);
        have += piece.chunk.length;
        total = piece.totalBytes;
      }
    } finally {
      stream.cancel();
    }
    if (have !== total) throw new Error(`run ${runId}: the result stream ended after ${have} of ${total} bytes`);
    return RunResult.decode(Buffer.concat(chunks, have));
  }

  /** Cancels a run; `agentId` must be its owner. Cancelling a finished run is not an error. */
  cancel(runId: string, options: { agentId?: string; reason?: string; wait?: boolean } = {}): Promise<CancelRunResponse> {
    return unary((cb) =>
      this.runs.cancelRun(
        { runId, threadId: "", agentId: options.agentId ?? "", reason: options.reason ?? "", wait: options.wait ?? false },
        cb,
      ),
    );
  }

  /** Answers suspended tool calls of a run (see resume, deny). */
  submitDecisions(runId: string, decisions: ToolCallDecision[], options: { agentId?: string } = {}): Promise<SubmitDecisionsResponse> {
    return unary((cb) =>
      this.runs.submitDecisions({ runId, threadId: "", agentId: options.agentId ?? "", decisions }, cb),
    );
  }
}

/** An inline agent spec. */
export function agent(
  name: string,
  options: { systemPrompt?: string; tools?: string[]; maxTurns?: number; metadata?: Record<string, unknown> } = {},
): AgentRef {
  return { spec: AgentSpec.fromPartial({ name, ...options }), registeredName: undefined };
}

/** An agent registered with RegistryService, by name. */
export function registered(name: string): AgentRef {
  return { registeredName: name, spec: undefined };
}

export function single(agentRef: AgentRef, task: string): { single: SingleRun } {
  return { single: { agent: agentRef, task } };
}

/** One mapper per item, then the reducer; `maxConcurrent` unset means the sidecar's 5. */
export function mapReduce(
  mapper: AgentRef,
  reducer: AgentRef,
  task: string,
  items: string[],
  maxConcurrent?: number,
): { mapReduce: MapReduceRun } {
  return { mapReduce: { mapper, reducer, task, items, maxConcurrent } };
}

/** Approve a suspended tool call; `result` is handed to the waiting agent. */
export function resume(targetId: string, result?: unknown, decisionId = ""): ToolCallDecision {
  return ToolCallDecision.fromPartial({ targetId, decisionId, action: DecisionAction.DECISION_ACTION_RESUME, result });
}

/** Refuse a suspended tool call. */
export function deny(targetId: string, reason = "", decisionId = ""): ToolCallDecision {
  return ToolCallDecision.fromPartial({ targetId, decisionId, action: DecisionAction.DECISION_ACTION_CANCEL, reason });
}
