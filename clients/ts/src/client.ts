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
 *
 * Given several sidecar addresses (replicas sharing one store), a client sends
 * its calls to the first that answers; when a call fails with UNAVAILABLE it
 * moves to the next, and retries there the calls that are safe to repeat
 * (getRun, readResult, and watch, which resumes after the last event it
 * yielded). startRun, cancel and submitDecisions reject instead: the sidecar
 * may have acted on them; the next call goes to the next address.
 */
import { ChannelCredentials, ClientReadableStream, connectivityState, ServiceError, status } from "@grpc/grpc-js";

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
import { addresses, messageLimitOptions } from "./worker";
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

/** The stubs of one address, on one channel. */
interface Stubs {
  runs: RunServiceClient;
  events: EventServiceClient;
  registry: RegistryServiceClient;
  state: StateServiceClient;
}

function isUnavailable(err: unknown): boolean {
  return (err as ServiceError | undefined)?.code === status.UNAVAILABLE;
}

/** A client for the run, event, registry and state services. */
export class Client {
  /** The sidecar addresses the client was given. */
  readonly targets: readonly string[];
  private at = 0;
  private readonly stubs = new Map<string, Stubs>();

  /**
   * A client for the sidecar at `target` ("host:port", or several replicas'
   * addresses: a list, or one string with commas); connects lazily. A
   * response the client cannot decode fails its call with INTERNAL
   * ("Response message parsing error: ...").
   */
  constructor(
    target: string | readonly string[],
    private readonly options: ClientOptions = {},
  ) {
    this.targets = addresses(target);
  }

  /** The address calls go to now. */
  get target(): string {
    return this.targets[this.at];
  }

  get runs(): RunServiceClient {
    return this.current().runs;
  }

  get events(): EventServiceClient {
    return this.current().events;
  }

  get registry(): RegistryServiceClient {
    return this.current().registry;
  }

  get state(): StateServiceClient {
    return this.current().state;
  }

  private current(): Stubs {
    const target = this.target;
    let stubs = this.stubs.get(target);
    if (!stubs) {
      const creds = ChannelCredentials.createInsecure();
      const runs = new RunServiceClient(target, creds, {
        ...messageLimitOptions(this.options.maxMessageBytes),
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": CLIENT_RECONNECT_MAX_DELAY_MS,
        ...this.options.channelOptions,
      });
      // The other stubs share the run stub's channel.
      const shared = { channelOverride: runs.getChannel() };
      stubs = {
        runs,
        events: new EventServiceClient(target, creds, shared),
        registry: new RegistryServiceClient(target, creds, shared),
        state: new StateServiceClient(target, creds, shared),
      };
      this.stubs.set(target, stubs);
    }
    return stubs;
  }

  close(): void {
    for (const stubs of this.stubs.values()) stubs.runs.close();
  }

  /** Moves to the address after `failed`, unless a concurrent call did already. */
  private moveOn(failed: string): void {
    if (this.targets.length > 1 && this.target === failed) this.at = (this.at + 1) % this.targets.length;
  }

  /**
   * With several addresses: makes the current one an address that answers,
   * trying each in turn from the current one. When none does, the call that
   * follows fails with UNAVAILABLE as it would with one.
   */
  private async connect(): Promise<void> {
    if (this.targets.length < 2) return;
    for (let i = 0; i < this.targets.length; i++) {
      const target = this.target;
      const channel = this.runs.getChannel();
      let state = channel.getConnectivityState(true);
      while (state === connectivityState.IDLE || state === connectivityState.CONNECTING) {
        const seen = state;
        await new Promise<void>((resolve) => channel.watchConnectivityState(seen, Date.now() + 30_000, () => resolve()));
        state = channel.getConnectivityState(true);
      }
      if (state === connectivityState.READY) return;
      this.moveOn(target);
    }
  }

  /**
   * `call()` on the current address; on UNAVAILABLE the client moves to the
   * next address, and with `retry` (a read) calls again there, once around
   * the list.
   */
  private async call<T>(call: () => Promise<T>, retry: boolean): Promise<T> {
    for (let left = this.targets.length - 1; ; left--) {
      await this.connect();
      const target = this.target;
      try {
        return await call();
      } catch (err) {
        if (!isUnavailable(err)) throw err;
        this.moveOn(target);
        if (!retry || left <= 0) throw err;
      }
    }
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
    const response = await this.call(() => unary<{ run?: RunHandle }>((cb) => this.runs.startRun(request, cb)), false);
    return response.run as RunHandle;
  }

  /**
   * A run's events after `afterSeq` (0: from the first), ending with
   * run_finished. With several addresses, a watch whose sidecar went away
   * resumes at the next after the last event it yielded (up to once per
   * address between two events).
   */
  async *watch(runId: string, afterSeq = 0): AsyncGenerator<RunEvent> {
    let last = afterSeq;
    let tries = 0; // since the last event
    for (;;) {
      await this.connect();
      const target = this.target;
      const stream: ClientReadableStream<WatchRunResponse> = this.runs.watchRun({ runId, afterSeq: last });
      try {
        for await (const batch of stream as AsyncIterable<WatchRunResponse>) {
          for (const event of batch.events) {
            last = event.seq;
            tries = 0;
            yield event;
          }
        }
        return;
      } catch (err) {
        if (!isUnavailable(err)) throw err;
        this.moveOn(target);
        if (++tries >= this.targets.length) throw err;
      } finally {
        stream.cancel();
      }
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
    const response = await this.call(() => unary<{ run?: Run }>((cb) => this.runs.getRun({ runId, threadId: "" }, cb)), true);
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
  readResult(runId: string): Promise<RunResult> {
    return this.call(() => this.readResultOnce(runId), true);
  }

  private async readResultOnce(runId: string): Promise<RunResult> {
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
    const request = { runId, threadId: "", agentId: options.agentId ?? "", reason: options.reason ?? "", wait: options.wait ?? false };
    return this.call(() => unary<CancelRunResponse>((cb) => this.runs.cancelRun(request, cb)), false);
  }

  /** Answers suspended tool calls of a run (see resume, deny). */
  submitDecisions(runId: string, decisions: ToolCallDecision[], options: { agentId?: string } = {}): Promise<SubmitDecisionsResponse> {
    const request = { runId, threadId: "", agentId: options.agentId ?? "", decisions };
    return this.call(() => unary<SubmitDecisionsResponse>((cb) => this.runs.submitDecisions(request, cb)), false);
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
