/**
 * Client.getRun and Client.readResult against a fake RunService on loopback:
 * a result left out of GetRun (resultOmitted) is read in chunks with
 * ReadRunResult; chunks out of place or a short stream are errors. Run with
 * `npm test`.
 */
import assert from "node:assert/strict";
import { test } from "node:test";

import { Server, ServerCredentials } from "@grpc/grpc-js";

import { Client } from "../src/index";
import { RunResult } from "../src/gen/car/v1/patterns";
import { GetRunResponse, ReadRunResultResponse } from "../src/gen/car/v1/runs";

/** A RunService answering GetRun with `run` and ReadRunResult with `pieces`. */
async function resultServer(run: Buffer, pieces: Buffer[]): Promise<{ target: string; server: Server }> {
  const server = new Server({ "grpc.max_send_message_length": 64 << 20 });
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
    {
      getRun: method("/car.v1.RunService/GetRun", false),
      readRunResult: method("/car.v1.RunService/ReadRunResult", true),
    },
    {
      getRun: (_call: any, callback: any) => callback(null, run),
      readRunResult: (call: any) => {
        for (const p of pieces) call.write(p);
        call.end();
      },
    },
  );
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  return { target: `127.0.0.1:${port}`, server };
}

/** A RunResult's serialization as ReadRunResultResponses of `n` bytes. */
function chunked(result: RunResult, n: number): Buffer[] {
  const data = Buffer.from(RunResult.encode(result).finish());
  const out: Buffer[] = [];
  for (let off = 0; off < data.length; off += n) {
    const piece = { chunk: data.subarray(off, off + n), offset: off, totalBytes: data.length };
    out.push(Buffer.from(ReadRunResultResponse.encode(piece).finish()));
  }
  return out;
}

test("getRun reads a result left out of GetRun in chunks", async () => {
  const answer = "z".repeat(3 << 20);
  const result = RunResult.fromPartial({ single: { output: { answer } } });
  const size = RunResult.encode(result).finish().length;
  const pieces = chunked(result, 1 << 20);
  assert.equal(pieces.length, 4);
  const run = GetRunResponse.fromPartial({ run: { runId: "r1", resultOmitted: true, resultBytes: size } });
  const { target, server } = await resultServer(Buffer.from(GetRunResponse.encode(run).finish()), pieces);
  const client = new Client(target);
  try {
    const got = await client.getRun("r1");
    assert.equal(got.result?.single?.output?.answer, answer);
    assert.equal(got.resultOmitted, true);
    assert.equal(got.resultBytes, size);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test("readResult refuses a missing chunk or a short stream", async () => {
  const result = RunResult.fromPartial({ single: { output: { answer: "q".repeat(4000) } } });
  const pieces = chunked(result, 1000);
  const cases: [Buffer[], RegExp][] = [
    [[pieces[0], ...pieces.slice(2)], /a result chunk at byte 2000, expected 1000/],
    [pieces.slice(0, 3), /ended after 3000 of \d+ bytes/],
  ];
  for (const [frames, want] of cases) {
    const { target, server } = await resultServer(Buffer.alloc(0), frames);
    const client = new Client(target);
    try {
      await assert.rejects(client.readResult("r1"), want);
    } finally {
      client.close();
      server.forceShutdown();
    }
  }
});
