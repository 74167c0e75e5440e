/**
 * Serves the example agents of clients/README.md: "summarizer" (a map-reduce
 * mapper), "combiner" (its reducer) and "deployer" (asks a human first).
 *
 *     npm run summarizer-worker -- --target 127.0.0.1:50051
 *
 * --target (or CARSVC_TARGET) may name several sidecar replicas, separated by
 * commas: the worker connects to the first that answers and moves on to the
 * next when its session ends. CARSVC_WORKER_TOKEN, when set, is the worker token (never a flag: a command
 * line is visible to every local user).
 */
import { parseArgs } from "node:util";

import { status } from "@grpc/grpc-js";

import { AgentContext, RuntimeCallError, Worker, WorkerRefusedError } from "../src/index";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: process.env.CARSVC_TARGET ?? "127.0.0.1:50051" },
    "worker-id": { type: "string" },
    agents: { type: "string", default: "summarizer,combiner,deployer,pinger,ponger" },
    "max-in-flight": { type: "string", default: "4" },
    "sleep-ms": { type: "string", default: "0" },
  },
});

const ITEM_MARKER = "Process this item: ";
const sleepMs = Number(args["sleep-ms"]);

const worker = new Worker(args.target!, {
  workerId: args["worker-id"],
  maxInFlight: Number(args["max-in-flight"]),
  labels: { lang: "ts" },
  token: process.env.CARSVC_WORKER_TOKEN || undefined,
  onConnect: (session) => console.log(`ready ${worker.workerId} ${session}`),
});

/** Answers "summary(<item>)" after recording the item in the run's state and emitting an event. */
async function summarize(ctx: AgentContext): Promise<string> {
  const at = ctx.task.lastIndexOf(ITEM_MARKER);
  const item = at >= 0 ? ctx.task.slice(at + ITEM_MARKER.length) : ctx.task;
  ctx.progress(`summarizing ${item}`);
  const key = `summaries/${item}`;
  await ctx.state.set(key, { worker: worker.workerId, sdk: "ts" });
  if ((await ctx.state.get(key)) === undefined) throw new Error(`state read back failed for ${key}`);
  ctx.emit("summarized", { item, worker: worker.workerId });
  await ctx.sleep(sleepMs);
  ctx.reportUsage(ctx.task.length, item.length);
  return `summary(${item})`;
}

/** Joins the mapper answers listed in the reducer's task. */
async function combine(ctx: AgentContext): Promise<string> {
  const answers = ctx.task
    .split("\n")
    .filter((line) => line.startsWith("- ["))
    .map((line) => line.slice(line.indexOf("] ") + 2));
  return `combined ${answers.length}: ${answers.join("; ")}`;
}

/** Asks a human before it "deploys" the task's target. */
async function deploy(ctx: AgentContext): Promise<string> {
  const decision = await ctx.suspendToolCall("deploy-1", "deploy", { target: ctx.task }, {
    reason: `deploys to ${ctx.task}`,
    timeoutMs: 300_000,
  });
  if (!decision.approved) return `denied: ${decision.reason}`;
  return `approved: ${typeof decision.result === "string" ? decision.result : JSON.stringify(decision.result)}`;
}

/** Sends "ping from <worker>" to the run's "ponger" (retrying while it has not started) and answers with the reply. */
async function ping(ctx: AgentContext): Promise<string> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      await ctx.send("ponger", `ping from ${worker.workerId}`);
      break;
    } catch (err) {
      const notFound = err instanceof RuntimeCallError && err.code === status.NOT_FOUND;
      if (!notFound || Date.now() > deadline) throw err;
      await ctx.sleep(50);
    }
  }
  const reply = await ctx.recv(10_000);
  return `pinger got ${reply.payload}`;
}

/** Waits for a message and answers its sender with "pong from <worker>". */
async function pong(ctx: AgentContext): Promise<string> {
  const message = await ctx.recv(10_000);
  await ctx.send(message.fromAgent, `pong from ${worker.workerId}`);
  return `ponger got ${message.payload} from ${message.fromAgent}`;
}

const handlers: Record<string, (ctx: AgentContext) => Promise<string>> = {
  summarizer: summarize,
  combiner: combine,
  deployer: deploy,
  pinger: ping,
  ponger: pong,
};

for (const name of args.agents!.split(",")) {
  const handler = handlers[name];
  if (!handler) {
    console.error(`unknown agent ${name}`);
    process.exit(2);
  }
  worker.agent(name, async (ctx) => {
    console.log(`started ${ctx.assignmentId} ${ctx.agent} ${ctx.attempt}`);
    return handler(ctx);
  });
}

for (const signal of ["SIGINT", "SIGTERM"] as const) process.on(signal, () => worker.stop());
worker.run().catch((err) => {
  // A refused token was logged by the worker already; its message says it all.
  console.error("worker:", err instanceof WorkerRefusedError ? err.message : err);
  process.exit(1);
});
