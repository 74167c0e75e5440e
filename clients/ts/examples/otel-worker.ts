/**
 * A worker whose program uses OpenTelemetry: it exports its spans with
 * OTLP/gRPC (OTEL_EXPORTER_OTLP_ENDPOINT and the other standard variables), so
 * each agent's "invoke_agent" span, made by the SDK as a child of the
 * sidecar's span of the step, and the handler's own "chat" span under it join
 * the client's trace (docs/operations.md, "Traces"; tests/crosslang/test_tracing.py runs it).
 *
 *     npm run otel-worker -- --target 127.0.0.1:50051 --agent traced-ts
 *
 * The SDK needs only @opentelemetry/api (an optional peer dependency); the
 * OpenTelemetry SDK and exporter here are this program's own.
 */
import { parseArgs } from "node:util";

import { context, SpanKind, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-grpc";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";

import { AgentContext, Worker } from "../src/index";

const { values: args } = parseArgs({
  options: {
    target: { type: "string", default: "127.0.0.1:50051" },
    agent: { type: "string", default: "traced-ts" },
    "worker-id": { type: "string" },
  },
});

// Each span is exported as it ends (a batch would wait): the test reads them at once.
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": process.env.OTEL_SERVICE_NAME ?? "otel-worker-ts" }),
  spanProcessors: [new SimpleSpanProcessor(new OTLPTraceExporter())],
});
trace.setGlobalTracerProvider(provider);
context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
const tracer = trace.getTracer("otel-worker");

const worker = new Worker(args.target!, {
  workerId: args["worker-id"],
  onConnect: (session) => console.log(`ready ${worker.workerId} ${session}`),
});

worker.agent(args.agent!, async (ctx: AgentContext) => {
  // The handler's own work (a model call) is a child of the agent's span.
  const chat = tracer.startSpan("chat fake-model", {
    kind: SpanKind.CLIENT,
    attributes: { "gen_ai.operation.name": "chat", "gen_ai.request.model": "fake-model" },
  });
  chat.end();
  ctx.reportUsage(10, 5, 0.001);
  return `ts: ${ctx.task}`;
});

async function main(): Promise<void> {
  const stop = (): void => void worker.stop();
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  await worker.run();
  await provider.shutdown();
}

main().catch((err) => {
  console.error("worker:", err);
  process.exit(1);
});
