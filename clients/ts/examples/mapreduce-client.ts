/**
 * Runs a map-reduce of the example agents (clients/README.md) and prints the
 * result; --json prints one JSON object.
 *
 *     npm run mapreduce-client -- --target 127.0.0.1:50051 --items 10
 */
import { parseArgs } from "node:util";

import { Client, agent, mapReduce, runs, types } from "../src/index";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.CARSVC_TARGET ?? "127.0.0.1:50051" },
    items: { type: "string", default: "5" },
    mapper: { type: "string", default: "summarizer" },
    reducer: { type: "string", default: "combiner" },
    "max-concurrent": { type: "string", default: "8" },
    json: { type: "boolean", default: false },
    // Start and wait with Client.run instead of watching the events.
    run: { type: "boolean", default: false },
  },
});

async function main(): Promise<number> {
  const client = new Client(args.target!);
  try {
    const items = Array.from({ length: Number(args.items) }, (_, i) => `item-${i + 1}`);
    const maxConcurrent = Number(args["max-concurrent"]);
    const pattern = mapReduce(agent(args.mapper!), agent(args.reducer!), "Summarize each item", items, maxConcurrent);
    const finishedBy: Record<string, string> = {};
    let events = 0;
    let run: runs.Run;
    if (args.run) {
      run = await client.run(pattern, { agentId: "mapreduce-client-ts" });
    } else {
      const handle = await client.startRun(pattern, { agentId: "mapreduce-client-ts" });
      // Watch the events; a broken watch resumes after the last seq it saw.
      let lastSeq = 0;
      let done = false;
      while (!done) {
        try {
          for await (const event of client.watch(handle.runId, lastSeq)) {
            lastSeq = event.seq;
            events++;
            if (event.agentFinished) finishedBy[event.agentFinished.output?.name ?? ""] = event.agentFinished.workerId;
            if (event.runFinished) done = true;
          }
        } catch (err) {
          console.error(`watch broke, resuming after seq ${lastSeq}:`, err);
          await new Promise((r) => setTimeout(r, 200));
        }
      }
      // getRun reads a result too large to travel inline (ReadRunResult).
      run = await client.getRun(handle.runId);
    }
    const result = run.result?.mapReduce;
    const outputs = result?.mapOutputs ?? [];
    const status = types.runStatusToJSON(run.status);
    if (args.json) {
      console.log(
        JSON.stringify({
          run_id: run.runId,
          status,
          // Why it ended: "completed", "agent_failed", ... and a sentence.
          termination_reason: run.terminationReason,
          termination_detail: run.terminationDetail,
          reduced_answer: result?.reducedAnswer ?? "",
          answers: outputs.map((o) => o.answer),
          errors: outputs.map((o) => o.error ?? ""),
          finished_by: finishedBy,
          events,
          // Too large to travel inline (over 1 MiB): read with ReadRunResult.
          result_omitted: run.resultOmitted,
          result_bytes: run.resultBytes,
        }),
      );
    } else {
      console.log(`run ${run.runId}: ${status}`);
      if (run.status !== types.RunStatus.RUN_STATUS_SUCCEEDED) {
        console.log(`  why: ${run.terminationDetail} (${run.terminationReason})`);
      }
      for (const o of outputs) console.log(`  ${o.name.padEnd(14)} ${(o.answer || o.error || "").padEnd(20)} by ${finishedBy[o.name]}`);
      console.log(`reduced: ${result?.reducedAnswer}`);
    }
    if (run.status !== types.RunStatus.RUN_STATUS_SUCCEEDED) {
      console.error(`mapreduce-client: run ${run.runId} ${status}: ${run.terminationReason}: ${run.terminationDetail}`);
      return 1;
    }
    return 0;
  } finally {
    client.close();
  }
}

// exitCode, not exit(): a large JSON line to a pipe is written asynchronously,
// and process.exit() would cut it off.
main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    console.error("mapreduce-client:", err);
    process.exit(1);
  },
);
