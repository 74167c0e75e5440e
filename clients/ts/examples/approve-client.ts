/**
 * Human in the loop: starts a single "deployer" run, waits for its suspended
 * tool call, approves it with --value (or denies it with --deny REASON), and
 * prints the outcome; --json prints one JSON object.
 *
 *     node dist/examples/approve-client.js --target 127.0.0.1:50051 --value v2
 */
import { parseArgs } from "node:util";

import { Client, agent, deny, resume, single, types } from "../src/index";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.CARSVC_TARGET ?? "127.0.0.1:50051" },
    agent: { type: "string", default: "deployer" },
    task: { type: "string", default: "production" },
    value: { type: "string", default: "approved-by-ts" },
    deny: { type: "string" },
    json: { type: "boolean", default: false },
  },
});

async function main(): Promise<number> {
  const client = new Client(args.target!);
  const owner = "approve-client-ts";
  try {
    const handle = await client.startRun(single(agent(args.agent!, { tools: ["deploy"] }), args.task!), { agentId: owner });
    const suspended: unknown[] = [];
    let finishedBy = "";
    for await (const event of client.watch(handle.runId)) {
      const s = event.toolCallSuspended;
      if (s) {
        suspended.push({ tool_call_id: s.toolCallId, tool_name: s.toolName, arguments: s.arguments, reason: s.reason });
        const decision = args.deny !== undefined ? deny(s.toolCallId, args.deny) : resume(s.toolCallId, args.value);
        const answer = await client.submitDecisions(handle.runId, [decision], { agentId: owner });
        if (!args.json) console.log(`decided ${s.toolCallId} (${s.toolName} ${JSON.stringify(s.arguments)}): applied ${answer.appliedDecisionIds}`);
      }
      if (event.agentFinished) finishedBy = event.agentFinished.workerId;
    }
    const run = await client.getRun(handle.runId);
    const output = run.result?.single?.output;
    const status = types.runStatusToJSON(run.status);
    if (args.json) {
      console.log(JSON.stringify({ run_id: run.runId, status, answer: output?.answer ?? "", error: output?.error ?? "", suspended, finished_by: finishedBy }));
    } else {
      console.log(`run ${run.runId}: ${status}: ${output?.answer || output?.error}`);
    }
    return run.status === types.RunStatus.RUN_STATUS_SUCCEEDED ? 0 : 1;
  } finally {
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error("approve-client:", err);
    process.exit(1);
  },
);
