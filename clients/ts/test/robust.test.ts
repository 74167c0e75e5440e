/**
 * Undecodable frames, deep values, 16 MiB messages and the reconnect cap,
 * against real grpc-js servers on loopback (a fake sidecar that can send raw
 * bytes). Run with `npm test`.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { Server, ServerCredentials, ServerDuplexStream, ServiceError, status } from "@grpc/grpc-js";

import { Client, UndecodableFrameError, Worker } from "../src/index";
import { WatchRunResponse, GetRunResponse } from "../src/gen/car/v1/runs";
import { AssignmentResult, ConnectRequest, ConnectResponse } from "../src/gen/car/v1/worker";

type Frame = ConnectResponse | Buffer;
type Stream = ServerDuplexStream<ConnectRequest, Frame>;

/** Field 1, length-delimited, with a length far past the end: no message decodes it. */
const GARBAGE = Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
const SERVER_OPTIONS = { "grpc.max_receive_message_length": 64 << 20, "grpc.max_send_message_length": 64 << 20 };

/** A JSON object nested `depth` levels deep: {"a": {"a": ... 1}}. */
function deepValue(depth: number): unknown {
  let v: unknown = 1;
  for (let i = 0; i < depth; i++) v = { a: v };
  return v;
}

function depthOf(v: unknown): number {
  if (Array.isArray(v)) return 1 + Math.max(0, ...v.map(depthOf));
  if (v !== null && typeof v === "object") return 1 + Math.max(0, ...Object.values(v).map(depthOf));
  return 0;
}

function raw<T>(encode: (m: T) => { finish(): Uint8Array }): (v: T | Buffer) => Buffer {
  return (v) => (Buffer.isBuffer(v) ? v : Buffer.from(encode(v as T).finish()));
}

const CONNECT = {
  connect: {
    path: "/car.v1.WorkerService/Connect",
    requestStream: true,
    responseStream: true,
    requestSerialize: raw(ConnectRequest.encode),
    requestDeserialize: (b: Buffer) => ConnectRequest.decode(b),
    responseSerialize: raw(ConnectResponse.encode),
    responseDeserialize: (b: Buffer) => ConnectResponse.decode(b),
  },
};

/** A WorkerService that counts Connects and hands each stream (after the hello) to `serve`. */
class FakeSidecar {
  connects = 0;
  server = new Server(SERVER_OPTIONS);
  port = 0;

  constructor(private readonly serve: (n: number, stream: Stream) => void) {}

  async start(port = 0): Promise<string> {
    this.server = new Server(SERVER_OPTIONS);
    this.server.addService(CONNECT, {
      connect: (stream: Stream) => {
        const n = ++this.connects;
        stream.once("data", () => this.serve(n, stream)); // the hello
        stream.on("error", () => {});
      },
    });
    this.port = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync(`127.0.0.1:${port}`, ServerCredentials.createInsecure(), (err, p) =>
        err ? reject(err) : resolve(p),
      ),
    );
    return `127.0.0.1:${this.port}`;
  }

  stop(): void {
    this.server.forceShutdown();
  }
}

function welcome(n: number): ConnectResponse {
  return ConnectResponse.fromPartial({ welcome: { sessionId: `s${n}`, heartbeatIntervalMs: 2000 } });
}

function assignment(id: string, task: string): ConnectResponse {
  return ConnectResponse.fromPartial({
    assignments: [{ assignmentId: id, attempt: 1, runId: `r-${id}`, agent: "a", task, spec: { name: "a" } }],
  });
}

/** Welcomes the worker, hands it one assignment and resolves its result. */
function serveOne(n: number, stream: Stream, task: string, onResult: (r: AssignmentResult) => void): void {
  const id = `as-${n}`;
  stream.on("data", (req: ConnectRequest) => {
    for (const r of req.results) if (r.assignmentId === id) onResult(r);
  });
  stream.write(welcome(n));
  stream.write(assignment(id, task));
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${ms}ms`)), ms)));
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

function logs(): { lines: string[]; log: (level: string, message: string) => void } {
  const lines: string[] = [];
  return { lines, log: (level, message) => lines.push(`${level}: ${message}`) };
}

const tooDeepCallResult = ConnectResponse.fromPartial({
  // 40 JSON levels are 121 nested messages, past the decoder's limit of 100.
  callResults: [{ callId: "1", stateGet: { found: true, value: deepValue(40) } }],
});

for (const [name, welcomeFirst, bad] of [
  ["garbage instead of the welcome", false, GARBAGE],
  ["garbage after the welcome", true, GARBAGE],
  ["a value nested past the decoder's limit", true, tooDeepCallResult],
] as const) {
  test(`an undecodable frame (${name}) is logged and the worker reconnects and serves`, async () => {
    let resolveResult: (r: AssignmentResult) => void = () => {};
    const result = new Promise<AssignmentResult>((resolve) => (resolveResult = resolve));
    const fake = new FakeSidecar((n, stream) => {
      if (n > 1) return serveOne(n, stream, "after the bad frame", resolveResult);
      if (welcomeFirst) stream.write(welcome(n));
      stream.write(bad);
    });
    const target = await fake.start();
    const { lines, log } = logs();
    const worker = new Worker(target, { workerId: "t", log }).agent("a", async () => "ok");
    const running = worker.run();
    try {
      const r = await withTimeout(
        Promise.race([result, running.then(() => Promise.reject(new Error("run() ended")))]),
        10_000,
        "no result after the reconnect",
      );
      assert.equal(r.output?.answer, "ok");
      assert.equal(fake.connects, 2);
      const line = lines.find((l) => l.includes("could not be decoded"));
      assert.ok(line, `no log line about the undecodable frame:\n${lines.join("\n")}`);
      assert.match(line, /^error: a frame from the sidecar could not be decoded: .+; the session is lost, reconnecting in 100ms \(attempt 1\)$/);
    } finally {
      worker.stop();
      await running;
      fake.stop();
    }
  });
}

test("without reconnect, an undecodable frame rejects run() with an UndecodableFrameError", async () => {
  const fake = new FakeSidecar((n, stream) => {
    stream.write(welcome(n));
    stream.write(GARBAGE);
  });
  const target = await fake.start();
  const worker = new Worker(target, { reconnect: false, log: () => {} }).agent("a", async () => "ok");
  try {
    await assert.rejects(withTimeout(worker.run(), 10_000, "run() did not end"), (err: Error) => {
      assert.ok(err instanceof UndecodableFrameError, `${err}`);
      assert.match(err.message, /^a frame from the sidecar could not be decoded: /);
      assert.equal(((err as UndecodableFrameError).cause as ServiceError).code, status.INTERNAL);
      return true;
    });
  } finally {
    fake.stop();
  }
});

test("a value nested 24 levels deep in a state_get answer reaches the handler", async () => {
  let resolveResult: (r: AssignmentResult) => void = () => {};
  const result = new Promise<AssignmentResult>((resolve) => (resolveResult = resolve));
  const fake = new FakeSidecar((n, stream) => {
    stream.on("data", (req: ConnectRequest) => {
      for (const c of req.calls) {
        if (c.stateGet) stream.write(ConnectResponse.fromPartial({ callResults: [{ callId: c.callId, stateGet: { found: true, value: deepValue(24) } }] }));
      }
      for (const r of req.results) resolveResult(r);
    });
    stream.write(welcome(n));
    stream.write(assignment("deep", "read"));
  });
  const target = await fake.start();
  const worker = new Worker(target, { log: () => {} }).agent("a", async (ctx) => String(depthOf(await ctx.state.get("deep"))));
  const running = worker.run();
  try {
    const r = await withTimeout(result, 10_000, "no result");
    assert.equal(r.output?.answer, "24", `error: ${r.output?.error}`);
  } finally {
    worker.stop();
    await running;
    fake.stop();
  }
});

test("the worker receives and sends messages over 4 MiB", async () => {
  const big = "x".repeat(6 << 20);
  let resolveResult: (r: AssignmentResult) => void = () => {};
  const result = new Promise<AssignmentResult>((resolve) => (resolveResult = resolve));
  const fake = new FakeSidecar((n, stream) => serveOne(n, stream, big, resolveResult));
  const target = await fake.start();
  const worker = new Worker(target, { log: () => {} }).agent("a", async (ctx) => ctx.task + "!");
  const running = worker.run();
  try {
    const r = await withTimeout(result, 20_000, "no result for a 6 MiB task");
    assert.equal(r.output?.answer.length, big.length + 1, `error: ${r.output?.error}`);
  } finally {
    worker.stop();
    await running;
    fake.stop();
  }
});

test("maxMessageBytes limits what the worker accepts", async () => {
  const fake = new FakeSidecar((n, stream) => {
    stream.write(welcome(n));
    stream.write(assignment("big", "x".repeat(2 << 20)));
  });
  const target = await fake.start();
  const worker = new Worker(target, { reconnect: false, maxMessageBytes: 1 << 20, log: () => {} }).agent("a", async () => "ok");
  try {
    await assert.rejects(withTimeout(worker.run(), 10_000, "run() did not end"), (err: ServiceError) => {
      assert.equal(err.code, status.RESOURCE_EXHAUSTED, `${err}`);
      return true;
    });
  } finally {
    fake.stop();
  }
});

test("the worker reconnects within its cap after an outage, whatever gRPC's own backoff", async () => {
  const capMs = 1000;
  let connected: () => void = () => {};
  const fake = new FakeSidecar((n, stream) => stream.write(welcome(n)));
  const target = await fake.start();
  const { lines, log } = logs();
  const worker = new Worker(target, {
    reconnectMaxDelayMs: capMs,
    log,
    onConnect: () => connected(),
    // gRPC's channel backoff as it stands after a long outage (it grows to
    // 120 s): it must not delay the worker's own reconnect attempts.
    channelOptions: { "grpc.initial_reconnect_backoff_ms": 20_000, "grpc.max_reconnect_backoff_ms": 20_000 },
  }).agent("a", async () => "ok");
  let first = new Promise<void>((resolve) => (connected = resolve));
  const running = worker.run();
  try {
    await withTimeout(first, 10_000, "never connected");
    fake.stop(); // down for 3 caps
    await new Promise((resolve) => setTimeout(resolve, 3 * capMs));
    const again = new Promise<void>((resolve) => (connected = resolve));
    await fake.start(fake.port);
    const back = Date.now();
    await withTimeout(again, capMs + 3000, "not reconnected within cap + 3 s of the sidecar's return");
    assert.ok(Date.now() - back <= capMs + 3000);
    // One log line per attempt, with its delay, never past the cap.
    const attempts = lines.filter((l) => /reconnecting in \d+ms \(attempt \d+\)$/.test(l));
    assert.ok(attempts.length >= 3, `too few reconnect lines:\n${lines.join("\n")}`);
    attempts.forEach((l, i) => {
      const [, delay, n] = /in (\d+)ms \(attempt (\d+)\)$/.exec(l)!;
      assert.ok(Number(delay) <= capMs, l);
      assert.equal(Number(n), i + 1, l);
    });
  } finally {
    worker.stop();
    await running;
    fake.stop();
  }
});

// -- the client ---------------------------------------------------------------

/** A RunService answering WatchRun and GetRun with the given raw frames. */
async function runServer(frames: Buffer[]): Promise<{ target: string; server: Server }> {
  const server = new Server(SERVER_OPTIONS);
  const method = (path: string, responseStream: boolean) => ({
    path,
    requestStream: false,
    responseStream,
    requestSerialize: (b: Buffer) => b,
    requestDeserialize: (b: Buffer) => b,
    responseSerialize: (b: Buffer) => b,
    responseDeserialize: (b: Buffer) => b,
  });
  server.addService(
    { watchRun: method("/car.v1.RunService/WatchRun", true), getRun: method("/car.v1.RunService/GetRun", false) },
    {
      watchRun: (call: any) => {
        for (const f of frames) call.write(f);
        call.end();
      },
      getRun: (_call: any, callback: any) => callback(null, frames[0]),
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { target: `127.0.0.1:${port}`, server };
}

test("the client decodes a 24-level evidence value inside a watched run_finished", async () => {
  const batch = WatchRunResponse.fromPartial({
    events: [
      {
        seq: 7,
        runFinished: {
          result: { mapReduce: { reducerOutput: { name: "r", outcome: { evidence: [{ description: "deep", data: deepValue(24) }] } } } },
        },
      },
    ],
  });
  const { target, server } = await runServer([Buffer.from(WatchRunResponse.encode(batch).finish())]);
  const client = new Client(target);
  try {
    const events = [];
    for await (const event of client.watch("r1")) events.push(event);
    assert.equal(events.length, 1);
    const data = events[0].runFinished?.result?.mapReduce?.reducerOutput?.outcome?.evidence[0].data;
    assert.equal(depthOf(data), 24);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test("client calls reject with a clear error for an undecodable response", async () => {
  const { target, server } = await runServer([GARBAGE]);
  const client = new Client(target);
  try {
    const clear = (err: ServiceError) => {
      assert.equal(err.code, status.INTERNAL, `${err}`);
      assert.match(err.details, /^Response message parsing error: /);
      return true;
    };
    await assert.rejects(withTimeout(client.getRun("r1"), 10_000, "getRun hung"), clear);
    await assert.rejects(
      withTimeout(
        (async () => {
          for await (const _ of client.watch("r1"));
        })(),
        10_000,
        "watch hung",
      ),
      clear,
    );
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test("the client receives messages over 4 MiB; maxMessageBytes limits it", async () => {
  const big = "y".repeat(6 << 20);
  const response = GetRunResponse.fromPartial({ run: { runId: "r1", result: { single: { output: { answer: big } } } } });
  const { target, server } = await runServer([Buffer.from(GetRunResponse.encode(response).finish())]);
  const client = new Client(target);
  const small = new Client(target, { maxMessageBytes: 1 << 20 });
  try {
    const run = await withTimeout(client.getRun("r1"), 20_000, "getRun of a 6 MiB run");
    assert.equal(run.result?.single?.output?.answer.length, big.length);
    await assert.rejects(small.getRun("r1"), (err: ServiceError) => err.code === status.RESOURCE_EXHAUSTED);
  } finally {
    client.close();
    small.close();
    server.forceShutdown();
  }
});
