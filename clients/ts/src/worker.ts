/**
 * Write a carsvc worker in TypeScript (Node.js).
 *
 *     const worker = new Worker("127.0.0.1:50051", { maxInFlight: 4 });
 *     worker.agent("summarizer", async (ctx) => {
 *       ctx.progress("reading");
 *       await ctx.state.set("seen", ((await ctx.state.get("seen")) ?? 0) + 1);
 *       return `summary of ${ctx.task}`;
 *     });
 *     await worker.run(); // until worker.stop()
 *
 * A handler gets an AgentContext and returns the answer (a string) or a
 * Result. A thrown error becomes the output's error. When the sidecar cancels
 * an assignment, `ctx.signal` is aborted and the cancel is answered at once.
 * Heartbeats, batching of results and calls into frames, and reconnecting
 * after the sidecar restarts (a crash, or a drain before a graceful restart)
 * are handled here. Given several sidecar addresses (replicas sharing one
 * store), the worker connects to the first that answers and, when that
 * session ends, reconnects to the next. A refused credential is final: run()
 * rejects with a WorkerRefusedError instead of reconnecting.
 */
import * as os from "node:os";
import { ChannelCredentials, ClientDuplexStream, Metadata, ServiceError, status } from "@grpc/grpc-js";

import { AgentOutput, AgentSpec, DecisionAction, Message, MessageKind } from "./gen/car/v1/types";
import { AdvisorConsultation } from "./gen/car/v1/patterns";
import { startAgentSpan } from "./tracing";
import {
  Assignment,
  AssignmentResult,
  CallResult,
  ConnectRequest,
  ConnectResponse,
  RuntimeCall,
  WorkerServiceClient,
} from "./gen/car/v1/worker";

export const SDK = "carsvc-ts/0.1.0";

/** What a handler may return instead of a bare answer. */
export interface Result {
  answer?: string;
  error?: string;
  turns?: number;
  toolCalls?: number;
  inputTokens?: number;
  outputTokens?: number;
  costUsd?: number;
  toolsUsed?: string[];
}

export type Handler = (ctx: AgentContext) => Promise<string | Result>;

/** A client's answer to a suspended tool call. */
export interface Decision {
  approved: boolean; // resume (true) or cancel (false)
  result: unknown; // the value a resume carries
  reason: string;
  decisionId: string;
}

/** The sidecar refused a runtime call; `code` is a gRPC status code. */
export class RuntimeCallError extends Error {
  constructor(
    readonly code: status,
    message: string,
  ) {
    super(message);
    this.name = "RuntimeCallError";
  }
}

/** The reason of `ctx.signal` when the sidecar cancelled the assignment. */
export class CancelledError extends Error {
  constructor(readonly reason: string) {
    super(`cancelled: ${reason}`);
    this.name = "CancelledError";
  }
}

export class SessionEndedError extends Error {
  constructor() {
    super("the worker's session with the sidecar has ended");
    this.name = "SessionEndedError";
  }
}

/** Statuses of the Connect stream that no reconnect can fix. */
export const REFUSED_CODES: readonly status[] = [status.UNAUTHENTICATED, status.PERMISSION_DENIED];

/**
 * The sidecar refused the worker's credentials: Connect ended with
 * UNAUTHENTICATED (a missing or wrong worker token, or a client token) or
 * PERMISSION_DENIED. Retrying cannot fix a credential, so run() rejects with
 * this instead of reconnecting. `details` is the sidecar's message (it never
 * contains the token); `cause` is the grpc-js ServiceError.
 */
export class WorkerRefusedError extends Error {
  constructor(
    readonly code: status,
    readonly details: string,
    readonly target: string,
    options?: { cause?: unknown },
  ) {
    super(
      `the sidecar at ${target} refused the worker's credentials (${status[code]}: ${details}); check the worker token`,
      options,
    );
    this.name = "WorkerRefusedError";
  }
}

/**
 * The session ended because a message from the sidecar could not be decoded
 * (garbage bytes, or a value nested deeper than the protobuf decoder allows).
 * The worker reconnects after it like after any other lost session; run()
 * rejects with it only when `reconnect` is false. `cause` is the grpc-js
 * ServiceError (INTERNAL).
 */
export class UndecodableFrameError extends Error {
  constructor(
    readonly details: string,
    options?: { cause?: unknown },
  ) {
    super(`a frame from the sidecar could not be decoded: ${details}`, options);
    this.name = "UndecodableFrameError";
  }
}

/** grpc-js reports a message it could not deserialize as INTERNAL with this prefix. */
const PARSE_ERROR = "Response message parsing error: ";

function undecodable(error: Error | undefined): UndecodableFrameError | undefined {
  const e = error as ServiceError | undefined;
  if (e?.code !== status.INTERNAL || !e.details?.startsWith(PARSE_ERROR)) return undefined;
  return new UndecodableFrameError(e.details.slice(PARSE_ERROR.length), { cause: e });
}

/**
 * The largest message a worker or client channel sends or receives by
 * default: 16 MiB, the sidecar's max_message_bytes (grpc-js's own receive
 * default is 4 MiB, too small for a reducer's task).
 */
export const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

/** grpc-js channel options for a message limit of `maxBytes`, both ways. */
export function messageLimitOptions(maxBytes = DEFAULT_MAX_MESSAGE_BYTES): Record<string, number> {
  return { "grpc.max_receive_message_length": maxBytes, "grpc.max_send_message_length": maxBytes };
}

/**
 * The sidecar addresses in a target: one "host:port", several separated by
 * commas ("h1:50051,h2:50051", as CARSVC_TARGET may hold them), or a list.
 */
export function addresses(target: string | readonly string[]): string[] {
  const parts = typeof target === "string" ? target.split(",") : target;
  const found = parts.map((a) => a.trim()).filter((a) => a !== "");
  if (found.length === 0) {
    throw new Error(`no sidecar address in ${JSON.stringify(target)}: give host:port, or several separated by commas`);
  }
  return found;
}

/** A token travels as metadata: printable ASCII without spaces. */
function validToken(token: string): boolean {
  return /^[\x21-\x7e]+$/.test(token);
}

export interface WorkerOptions {
  workerId?: string; // default host-pid
  maxInFlight?: number; // default 1
  labels?: Record<string, string>;
  /**
   * Reconnect after the stream ends (a crash, a drain before a restart, or a
   * frame the worker could not decode), to the next address when there are
   * several, with one backoff across them all. Default true. Every attempt
   * uses a fresh channel, so grpc-js's own reconnect backoff never delays it.
   */
  reconnect?: boolean;
  reconnectMaxDelayMs?: number; // default 5000
  /** The largest message the worker sends or receives; default 16 MiB (the sidecar's limit). */
  maxMessageBytes?: number;
  /** Stop (resolve run()) after a drain instead of reconnecting. Default false. */
  stopOnDrain?: boolean;
  /**
   * A worker token, sent as `authorization: Bearer <token>` metadata on the
   * Connect stream. A refused token rejects run() with a WorkerRefusedError.
   */
  token?: string;
  /** Called with the session id after every welcome. */
  onConnect?: (sessionId: string) => void;
  log?: (level: "info" | "warn" | "error", message: string) => void;
  /** grpc-js channel options; they override the defaults above (message limits, backoff). */
  channelOptions?: Record<string, unknown>;
}

/** The running agent's state (its overlay when the pattern isolates it). */
export class StateView {
  constructor(private readonly ctx: AgentContext) {}

  async get<T = unknown>(key: string, fallback?: T): Promise<T | undefined> {
    const r = await this.ctx.call({ stateGet: { key } });
    return r.stateGet?.found ? (r.stateGet.value as T) : fallback;
  }

  /** Writes `key`; returns the transition index. */
  async set(key: string, value: unknown): Promise<number> {
    const r = await this.ctx.call({ stateSet: { key, value } });
    return r.stateWrite?.index ?? 0;
  }

  /** Deletes `key`; returns whether it existed. */
  async delete(key: string): Promise<boolean> {
    const r = await this.ctx.call({ stateDelete: { key } });
    return r.stateWrite?.existed ?? false;
  }

  async keys(prefix = ""): Promise<string[]> {
    const r = await this.ctx.call({ stateKeys: { prefix } });
    return r.stateKeys?.keys ?? [];
  }
}

type Op = Omit<Partial<RuntimeCall>, "callId" | "assignmentId">;

/** One assignment as its handler sees it. */
export class AgentContext {
  readonly assignmentId: string;
  readonly attempt: number;
  readonly runId: string;
  readonly threadId: string;
  /** The name the worker was matched on (Assignment.agent). */
  readonly agent: string;
  /** The instance name a pattern may have chosen (mapper i runs as `{mapper}_{i}`). */
  readonly name: string;
  readonly task: string;
  readonly spec: AgentSpec | undefined;
  readonly state: StateView;
  /** Aborted when the sidecar cancels the assignment or the session ends. */
  readonly signal: AbortSignal;
  usage = { inputTokens: 0, outputTokens: 0, costUsd: 0 };

  /** @internal */
  constructor(
    private readonly link: Link,
    readonly assignment: Assignment,
    readonly controller: AbortController,
  ) {
    this.assignmentId = assignment.assignmentId;
    this.attempt = assignment.attempt;
    this.runId = assignment.runId;
    this.threadId = assignment.threadId;
    this.name = assignment.spec?.name ?? "";
    this.agent = assignment.agent || this.name;
    this.task = assignment.task;
    this.spec = assignment.spec;
    this.state = new StateView(this);
    this.signal = controller.signal;
  }

  /** Makes a runtime call and waits for its result (throws RuntimeCallError). */
  call(op: Op): Promise<CallResult> {
    return this.link.call(RuntimeCall.fromPartial({ ...op, assignmentId: this.assignmentId }));
  }

  private fire(op: Op): void {
    this.link.fire(RuntimeCall.fromPartial({ ...op, assignmentId: this.assignmentId }));
  }

  /** Adds self-reported spend to the output (the run's budget adds it up). */
  reportUsage(inputTokens: number, outputTokens: number, costUsd = 0): void {
    this.usage.inputTokens += inputTokens;
    this.usage.outputTokens += outputTokens;
    this.usage.costUsd += costUsd;
  }

  /** Waits `ms`, or rejects with the cancel reason when the assignment is cancelled. */
  sleep(ms: number): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.signal.aborted) return reject(this.signal.reason);
      const onAbort = () => {
        clearTimeout(timer);
        reject(this.signal.reason);
      };
      const timer = setTimeout(() => {
        this.signal.removeEventListener("abort", onAbort);
        resolve();
      }, ms);
      this.signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Sends a message to another agent of the run. */
  async send(to: string, payload: unknown, kind = MessageKind.MESSAGE_KIND_CUSTOM): Promise<void> {
    await this.call({ mailboxSend: { message: Message.fromPartial({ toAgent: to, kind, payload }), broadcast: false } });
  }

  async broadcast(payload: unknown, kind = MessageKind.MESSAGE_KIND_CUSTOM): Promise<void> {
    await this.call({ mailboxSend: { message: Message.fromPartial({ kind, payload }), broadcast: true } });
  }

  /** Waits for the next message to this agent (0: the sidecar's default timeout). */
  async recv(timeoutMs = 0): Promise<Message> {
    const r = await this.call({ mailboxRecv: { timeoutMs } });
    return r.message as Message;
  }

  /** Appends a custom event to the run's stream (fire and forget). */
  emit(kind: string, payload?: unknown): void {
    this.fire({ emit: { kind, payload } });
  }

  /** Reports progress to the run's watchers (fire and forget). */
  progress(message: string, fraction?: number): void {
    this.fire({ progress: { message, fraction } });
  }

  /**
   * Suspends a tool call until a client approves or denies it (human in the
   * loop). The tool must be in the agent's spec; the run is WAITING meanwhile.
   */
  async suspendToolCall(
    toolCallId: string,
    toolName: string,
    args?: unknown,
    options: { reason?: string; timeoutMs?: number } = {},
  ): Promise<Decision> {
    const r = await this.call({
      suspendToolCall: {
        toolCallId,
        toolName,
        arguments: args,
        reason: options.reason ?? "",
        timeoutMs: options.timeoutMs ?? 0,
      },
    });
    const d = r.decision;
    return {
      approved: d?.action === DecisionAction.DECISION_ACTION_RESUME,
      result: d?.result,
      reason: d?.reason ?? "",
      decisionId: d?.decisionId ?? "",
    };
  }

  /** Hands `subtask` to a named specialist (delegator pattern); returns its output. */
  async delegate(specialist: string, subtask: string): Promise<AgentOutput> {
    return (await this.call({ delegate: { specialist, subtask } })).agentOutput as AgentOutput;
  }

  /** Spawns an ephemeral sub-agent with a subset of this agent's tools. */
  async spawnSubtask(task: string, tools: string[] = [], name = ""): Promise<AgentOutput> {
    return (await this.call({ spawnSubtask: { task, tools, name } })).agentOutput as AgentOutput;
  }

  /** Asks the run's advisor (advisor pattern) for a verdict. */
  async consultAdvisor(prompt: string): Promise<AdvisorConsultation> {
    return (await this.call({ consultAdvisor: { prompt } })).consultation as AdvisorConsultation;
  }
}

/** One connected session: the outbox, calls waiting for answers, running assignments. */
class Link {
  results: AssignmentResult[] = [];
  calls: RuntimeCall[] = [];
  pending = new Map<string, { resolve: (r: CallResult) => void; reject: (e: Error) => void }>();
  running = new Map<string, AgentContext>();
  closed = false;
  draining = false;
  heartbeatMs = 2500;
  private nextId = 1;
  private flushQueued = false;
  private lastSent = Date.now();

  constructor(private readonly stream: ClientDuplexStream<ConnectRequest, ConnectResponse>) {}

  write(frame: Partial<ConnectRequest>): void {
    this.lastSent = Date.now();
    this.stream.write(ConnectRequest.fromPartial(frame));
  }

  /** Everything queued in this turn of the event loop goes out as one frame. */
  schedule(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    setImmediate(() => this.flush());
  }

  flush(): void {
    this.flushQueued = false;
    if (this.results.length || this.calls.length) {
      const frame = { results: this.results, calls: this.calls };
      this.results = [];
      this.calls = [];
      try {
        this.write(frame);
      } catch {
        // the stream already ended; the session's end handler cleans up
      }
    }
    if (this.closed && !this.ended) {
      this.ended = true;
      this.stream.end();
    }
  }
  private ended = false;

  heartbeat(): void {
    if (Date.now() - this.lastSent >= this.heartbeatMs && !this.closed) this.write({ heartbeat: {} });
  }

  call(call: RuntimeCall): Promise<CallResult> {
    if (this.closed) return Promise.reject(new SessionEndedError());
    call.callId = String(this.nextId++);
    return new Promise((resolve, reject) => {
      this.pending.set(call.callId, { resolve, reject });
      this.calls.push(call);
      this.schedule();
    }).then((r) => {
      const result = r as CallResult;
      if (result.error) throw new RuntimeCallError(result.error.code as status, result.error.message);
      return result;
    });
  }

  fire(call: RuntimeCall): void {
    if (this.closed) return;
    this.calls.push(call);
    this.schedule();
  }

  answer(result: CallResult): void {
    const waiter = this.pending.get(result.callId);
    if (waiter) {
      this.pending.delete(result.callId);
      waiter.resolve(result);
    }
  }

  addResult(result: AssignmentResult): void {
    if (this.closed) return;
    this.results.push(result);
    if (this.draining && this.running.size === 0) this.closed = true;
    this.schedule();
  }

  end(): void {
    this.closed = true;
    for (const waiter of this.pending.values()) waiter.reject(new SessionEndedError());
    this.pending.clear();
    for (const ctx of this.running.values()) ctx.controller.abort(new SessionEndedError());
    this.running.clear();
  }
}

function hostId(): string {
  return `${os.hostname()}-${process.pid}`;
}

function globMatch(pattern: string, name: string): boolean {
  const re = pattern.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(`^${re}$`).test(name);
}

/** A worker process's connection to the sidecar. */
export class Worker {
  readonly workerId: string;
  readonly maxInFlight: number;
  /** The sidecar addresses, tried in turn from the first. */
  readonly targets: readonly string[];
  /** The address of the current (or last) session. */
  target: string;
  private readonly handlers = new Map<string, Handler>();
  private stopped = false;
  private stream: ClientDuplexStream<ConnectRequest, ConnectResponse> | undefined;
  private wakeUp: (() => void) | undefined;
  sessionId = "";

  /**
   * A worker for the sidecar at `target`: "host:port", or several replicas'
   * addresses (a list, or one string with commas: "h1:50051,h2:50051").
   */
  constructor(
    target: string | readonly string[],
    private readonly options: WorkerOptions = {},
  ) {
    this.targets = addresses(target);
    this.target = this.targets[0];
    this.workerId = options.workerId ?? hostId();
    this.maxInFlight = options.maxInFlight ?? 1;
  }

  /** Serves agent `name` (an exact name or a glob such as `mapper*`). */
  agent(name: string, handler: Handler): this {
    if (!name) throw new Error("an agent name or glob must not be empty");
    this.handlers.set(name, handler);
    return this;
  }

  private handlerFor(agent: string): Handler | undefined {
    const exact = this.handlers.get(agent);
    if (exact) return exact;
    for (const [pattern, handler] of this.handlers) if (globMatch(pattern, agent)) return handler;
    return undefined;
  }

  private log(level: "info" | "warn" | "error", message: string): void {
    if (this.options.log) this.options.log(level, message);
    else console.error(`carsvc worker ${this.workerId}: ${level === "error" ? "error: " : ""}${message}`);
  }

  /**
   * Serves until stop(). Reconnects with backoff after the stream ends (a
   * crash, or a drain before a graceful restart), unless `reconnect` is false
   * (then a lost session rejects, a drain resolves) or `stopOnDrain` is set and
   * the sidecar drained this worker. Rejects with a WorkerRefusedError, without
   * retrying, when the sidecar refuses the worker's credentials.
   */
  async run(): Promise<void> {
    if (this.handlers.size === 0) throw new Error("register at least one agent before run()");
    const token = this.options.token;
    if (token !== undefined && !validToken(token)) {
      throw new Error("the worker token is not a valid token: tokens are printable ASCII without spaces");
    }
    const maxDelay = this.options.reconnectMaxDelayMs ?? 5000;
    let delay = Math.min(100, maxDelay);
    let attempt = 0; // reconnect attempts since the last session that lasted
    for (let turn = 0; !this.stopped; turn++) {
      // Every attempt goes to the next address: a replica that died or
      // drained this worker is tried again only after the others.
      this.target = this.targets[turn % this.targets.length];
      const { drained, error, connectedAt } = await this.session(maxDelay);
      if (this.stopped) return;
      const code = (error as ServiceError | undefined)?.code;
      if (code !== undefined && REFUSED_CODES.includes(code)) {
        const refused = new WorkerRefusedError(code, (error as ServiceError).details ?? "", this.target, {
          cause: error,
        });
        this.log("error", `${refused.message}; not reconnecting`);
        throw refused;
      }
      if (drained && (this.options.stopOnDrain || this.options.reconnect === false)) return;
      const bad = undecodable(error);
      if (this.options.reconnect === false) {
        if (bad) this.log("error", `${bad.message}; not reconnecting (reconnect is off)`);
        throw bad ?? error ?? new SessionEndedError();
      }
      if (connectedAt !== undefined && Date.now() - connectedAt > 10_000) {
        delay = Math.min(100, maxDelay);
        attempt = 0;
      }
      attempt += 1;
      const next = `reconnecting in ${delay}ms (attempt ${attempt})`;
      if (drained) this.log("info", `drained by ${this.target}; ${next}`);
      else if (bad) this.log("error", `${bad.message} (at ${this.target}); the session is lost, ${next}`);
      else this.log("warn", `session ended (${error?.message}) at ${this.target}; ${next}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.wakeUp = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wakeUp = undefined;
      delay = Math.min(delay * 2, maxDelay);
    }
  }

  /** Stops serving: running handlers are aborted and the stream is closed. */
  stop(): void {
    this.stopped = true;
    this.stream?.cancel();
    this.wakeUp?.();
  }

  /**
   * One connection on a fresh channel with its own subchannel: grpc-js shares
   * subchannels between channels by default, and a shared one would keep its
   * reconnect backoff (up to 120 s) across our attempts.
   */
  private session(maxDelay: number): Promise<{ drained: boolean; error?: Error; connectedAt?: number }> {
    const channelOptions = {
      ...messageLimitOptions(this.options.maxMessageBytes),
      "grpc.initial_reconnect_backoff_ms": Math.min(100, maxDelay),
      "grpc.max_reconnect_backoff_ms": maxDelay,
      ...this.options.channelOptions,
      "grpc.use_local_subchannel_pool": 1,
    };
    const client = new WorkerServiceClient(this.target, ChannelCredentials.createInsecure(), channelOptions);
    const metadata = new Metadata();
    if (this.options.token !== undefined) metadata.set("authorization", `Bearer ${this.options.token}`);
    const stream = client.connect(metadata);
    this.stream = stream;
    const link = new Link(stream);
    let heartbeat: NodeJS.Timeout | undefined;
    let connectedAt: number | undefined;
    return new Promise((resolve) => {
      let settled = false;
      const finish = (error?: Error) => {
        if (settled) return;
        settled = true;
        if (heartbeat) clearInterval(heartbeat);
        const drained = link.draining;
        link.end();
        client.close();
        this.stream = undefined;
        resolve({ drained, error, connectedAt });
      };
      stream.on("data", (frame: ConnectResponse) => {
        try {
          this.onFrame(link, frame, (ms) => {
            connectedAt = Date.now();
            heartbeat = setInterval(() => link.heartbeat(), Math.max(ms / 4, 10));
          });
        } catch (err) {
          // A frame this helper cannot handle ends the session (and the
          // worker reconnects); it must never escape as an uncaught exception.
          stream.cancel();
          finish(new Error(`a frame from the sidecar could not be handled: ${(err as Error)?.message ?? err}`));
        }
      });
      stream.on("error", (err: ServiceError) => finish(err));
      stream.on("end", () => finish(link.draining ? undefined : new Error("the sidecar ended the session")));
      link.write({
        hello: {
          workerId: this.workerId,
          agents: [...this.handlers.keys()],
          maxInFlight: this.maxInFlight,
          labels: this.options.labels ?? {},
          sdk: SDK,
        },
      });
    });
  }

  private onFrame(link: Link, frame: ConnectResponse, welcomed: (heartbeatMs: number) => void): void {
    if (frame.welcome) {
      this.sessionId = frame.welcome.sessionId;
      // Send well within the interval so one slow frame never lapses the lease.
      if (frame.welcome.heartbeatIntervalMs) link.heartbeatMs = frame.welcome.heartbeatIntervalMs / 2;
      welcomed(link.heartbeatMs);
      this.log("info", `connected to ${this.target} (session ${this.sessionId}), serving ${[...this.handlers.keys()].join(", ")}`);
      this.options.onConnect?.(this.sessionId);
    }
    for (const assignment of frame.assignments) this.start(link, assignment);
    for (const cancel of frame.cancels) {
      const ctx = link.running.get(cancel.assignmentId);
      if (!ctx) continue;
      // Stop the agent and answer the cancel at once; whatever the handler
      // returns later is dropped.
      link.running.delete(cancel.assignmentId);
      ctx.controller.abort(new CancelledError(cancel.reason));
      link.addResult({
        assignmentId: ctx.assignmentId,
        attempt: ctx.attempt,
        output: AgentOutput.fromPartial({ name: ctx.name, error: `cancelled: ${cancel.reason}` }),
      });
    }
    for (const result of frame.callResults) link.answer(result);
    for (const error of frame.errors) this.log("warn", `the sidecar refused ${error.field}: ${error.message}`);
    if (frame.drain) {
      this.log("info", `draining (${frame.drain.reason})`);
      link.draining = true;
      if (link.running.size === 0) {
        link.closed = true;
        link.schedule();
      }
    }
  }

  private start(link: Link, assignment: Assignment): void {
    const ctx = new AgentContext(link, assignment, new AbortController());
    link.running.set(assignment.assignmentId, ctx);
    const started = performance.now();
    // The agent's span when the program uses OpenTelemetry (src/tracing.ts), else null.
    const span = startAgentSpan(assignment, ctx.name, this.workerId);
    void (span ? span.run(() => this.execute(ctx)) : this.execute(ctx)).then((output) => {
      span?.end(output);
      if (link.running.get(ctx.assignmentId) !== ctx) return; // cancelled and answered already
      link.running.delete(ctx.assignmentId);
      output.durationMs = performance.now() - started;
      // Echo both the id and the attempt: a result for a superseded attempt is ignored.
      link.addResult({ assignmentId: ctx.assignmentId, attempt: ctx.attempt, output });
    });
  }

  private async execute(ctx: AgentContext): Promise<AgentOutput> {
    const handler = this.handlerFor(ctx.agent);
    try {
      if (!handler) throw new Error(`this worker has no handler for agent '${ctx.agent}'`);
      const value = await handler(ctx);
      const r: Result = typeof value === "string" ? { answer: value } : value;
      const u = ctx.usage;
      const tokens = {
        inputTokens: (r.inputTokens ?? 0) + u.inputTokens,
        outputTokens: (r.outputTokens ?? 0) + u.outputTokens,
        costUsd: (r.costUsd ?? 0) + u.costUsd,
      };
      return AgentOutput.fromPartial({
        name: ctx.name,
        answer: r.answer ?? "",
        error: r.error,
        turns: r.turns ?? 1,
        toolCalls: r.toolCalls ?? 0,
        toolsUsed: r.toolsUsed ?? [],
        tokens: tokens.inputTokens || tokens.outputTokens || tokens.costUsd ? tokens : undefined,
      });
    } catch (err) {
      const e = err as Error;
      return AgentOutput.fromPartial({ name: ctx.name, error: e instanceof Error ? `${e.name}: ${e.message}` : String(err) });
    }
  }
}
