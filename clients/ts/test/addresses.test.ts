/**
 * Several sidecar addresses: the worker tries them in turn, one attempt each,
 * with one backoff; the client calls the first that answers and a watch whose
 * replica went away resumes at the next after the last event it yielded.
 * Against real grpc-js servers on loopback. Run with `npm test`.
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { test } from "node:test";

import { Server, ServerCredentials, ServerDuplexStream, ServerWritableStream, status } from "@grpc/grpc-js";

import { addresses, Client, Worker } from "../src/index";
import { WatchRunRequest, WatchRunResponse } from "../src/gen/car/v1/runs";
import { ConnectRequest, ConnectResponse } from "../src/gen/car/v1/worker";

type Stream = ServerDuplexStream<ConnectRequest, ConnectResponse>;

/** A loopback address nothing listens on. */
async function deadAddress(): Promise<string> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise((resolve) => server.close(resolve));
  return `127.0.0.1:${port}`;
}

async function bind(server: Server): Promise<string> {
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return `127.0.0.1:${port}`;
}

/** A WorkerService that records its name for each Connect and hands the stream (after the hello) to `serve`. */
async function fakeSidecar(name: string, order: string[], serve: (stream: Stream) => void): Promise<[string, Server]> {
  const server = new Server();
  server.addService(
    {
      connect: {
        path: "/car.v1.WorkerService/Connect",
        requestStream: true,
        responseStream: true,
        requestSerialize: (m: ConnectRequest) => Buffer.from(ConnectRequest.encode(m).finish()),
        requestDeserialize: (b: Buffer) => ConnectRequest.decode(b),
        responseSerialize: (m: ConnectResponse) => Buffer.from(ConnectResponse.encode(m).finish()),
        responseDeserialize: (b: Buffer) => ConnectResponse.decode(b),
      },
    },
    {
      connect: (stream: Stream) => {
        order.push(name);
        stream.on("error", () => {});
        stream.once("data", () => serve(stream)); // the hello
      },
    },
  );
  return [await bind(server), server];
}

function welcome(session: string): ConnectResponse {
  return ConnectResponse.fromPartial({ welcome: { sessionId: session, heartbeatIntervalMs: 2000 } });
}

/**
 * A RunService whose WatchRun sends `events` after the request's after_seq:
 * the last is run_finished unless `dies`, in which case the call ends with
 * UNAVAILABLE and the server shuts down (its port refuses), as a replica going
 * away does. `asked` collects the after_seq of each WatchRun.
 */
async function replica(events: number[], dies: boolean): Promise<{ target: string; server: Server; asked: number[] }> {
  const server = new Server();
  const asked: number[] = [];
  server.addService(
    {
      watchRun: {
        path: "/car.v1.RunService/WatchRun",
        requestStream: false,
        responseStream: true,
        requestSerialize: (m: WatchRunRequest) => Buffer.from(WatchRunRequest.encode(m).finish()),
        requestDeserialize: (b: Buffer) => WatchRunRequest.decode(b),
        responseSerialize: (m: WatchRunResponse) => Buffer.from(WatchRunResponse.encode(m).finish()),
        responseDeserialize: (b: Buffer) => WatchRunResponse.decode(b),
      },
    },
    {
      watchRun: (call: ServerWritableStream<WatchRunRequest, WatchRunResponse>) => {
        asked.push(call.request.afterSeq);
        const last = events[events.length - 1];
        for (const seq of events.filter((s) => s > call.request.afterSeq)) {
          const finished = seq === last && !dies ? { runFinished: {} } : {};
          call.write(WatchRunResponse.fromPartial({ events: [{ seq, runId: call.request.runId, ...finished }] }));
        }
        if (!dies) return call.end();
        call.emit("error", { code: status.UNAVAILABLE, details: "this replica is going away" });
        setTimeout(() => server.forceShutdown(), 100);
      },
    },
  );
  return { target: await bind(server), server, asked };
}

async function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<T>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what} within ${ms}ms`)), ms)));
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

test("addresses: one, a comma-separated list, or a list", () => {
  assert.deepEqual(addresses("h1:1"), ["h1:1"]);
  assert.deepEqual(addresses(" h1:1 , h2:2, "), ["h1:1", "h2:2"]);
  assert.deepEqual(addresses(["h1:1", "h2:2"]), ["h1:1", "h2:2"]);
  assert.throws(() => addresses(" , "), /no sidecar address/);
  assert.deepEqual(new Worker("a:1,b:2").targets, ["a:1", "b:2"]);
  assert.deepEqual(new Client(["a:1", "b:2"]).targets, ["a:1", "b:2"]);
});

test("the worker connects to the first address that answers", async () => {
  const dead = await deadAddress();
  const order: string[] = [];
  const [live, server] = await fakeSidecar("live", order, (stream) => stream.write(welcome("s1")));
  const lines: string[] = [];
  let connected: () => void = () => {};
  const first = new Promise<void>((resolve) => (connected = resolve));
  const worker = new Worker([dead, live], {
    workerId: "w",
    log: (level, message) => lines.push(`${level}: ${message}`),
    onConnect: () => connected(),
  }).agent("a", async () => "ok");
  const running = worker.run();
  try {
    await within(first, 10_000, "never connected");
    assert.deepEqual(order, ["live"]);
    assert.equal(worker.target, live);
    assert.match(lines[0], new RegExp(`^warn: session ended \\(.+\\) at ${dead}; reconnecting in 100ms \\(attempt 1\\)$`));
    assert.equal(lines[1], `info: connected to ${live} (session s1), serving a`);
  } finally {
    worker.stop();
    await running;
    server.forceShutdown();
  }
});

test("the worker moves to the next address whenever its session ends", async () => {
  const order: string[] = [];
  let n = 0;
  const drainAtOnce = (stream: Stream) => {
    n += 1;
    stream.write(ConnectResponse.fromPartial({ ...welcome(`s${n}`), drain: { reason: "restarting", graceMs: 1000 } }));
    stream.on("end", () => stream.end());
  };
  const [a, serverA] = await fakeSidecar("a", order, drainAtOnce);
  const [b, serverB] = await fakeSidecar("b", order, drainAtOnce);
  let connects = 0;
  let fourth: () => void = () => {};
  const done = new Promise<void>((resolve) => (fourth = resolve));
  const worker = new Worker(`${a},${b}`, {
    reconnectMaxDelayMs: 20,
    log: () => {},
    onConnect: () => {
      if (++connects === 4) fourth();
    },
  }).agent("a", async () => "ok");
  const running = worker.run();
  try {
    await within(done, 10_000, "four sessions");
    assert.deepEqual(order.slice(0, 4), ["a", "b", "a", "b"]);
  } finally {
    worker.stop();
    await running;
    serverA.forceShutdown();
    serverB.forceShutdown();
  }
});

test("a watch resumes at the next address after its replica died", async () => {
  const a = await replica([1, 2], true);
  const b = await replica([1, 2, 3], false);
  const client = new Client([a.target, b.target]);
  try {
    const seqs: number[] = [];
    await within(
      (async () => {
        for await (const event of client.watch("r1")) seqs.push(event.seq);
      })(),
      20_000,
      "the watch did not end",
    );
    assert.deepEqual(seqs, [1, 2, 3]);
    assert.deepEqual(a.asked, [0]);
    assert.deepEqual(b.asked, [2]); // resumed after the last event
    assert.equal(client.target, b.target);
  } finally {
    client.close();
    b.server.forceShutdown();
  }
});

test("a client given a dead address first calls the live one", async () => {
  const b = await replica([1], false);
  const client = new Client(`${await deadAddress()}, ${b.target}`);
  try {
    const events = [];
    for await (const event of client.watch("r1")) events.push(event);
    assert.equal(events.length, 1);
    assert.ok(events[0].runFinished);
    assert.deepEqual(b.asked, [0]);
  } finally {
    client.close();
    b.server.forceShutdown();
  }
});
