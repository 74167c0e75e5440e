/**
 * The agent's span on this worker, when the program uses OpenTelemetry
 * (docs/operations.md, "Traces"). `@opentelemetry/api` is an optional peer
 * dependency: this SDK loads it only if it is installed, and it records only
 * when the program registered a tracer provider; otherwise nothing is traced
 * and nothing more is loaded.
 *
 * The span, "invoke_agent {name}", is a child of the sidecar's span of the
 * step (the assignment's W3C `trace_context`), and the active span while the
 * handler runs (with a context manager registered, e.g.
 * @opentelemetry/context-async-hooks), so the spans of the handler's own work
 * (model calls, tools) are its children.
 */
import type * as OtelApi from "@opentelemetry/api";
import { Assignment } from "./gen/car/v1/worker";
import { AgentOutput } from "./gen/car/v1/types";

type Api = typeof OtelApi;
let loaded: Api | null | undefined;

/** `@opentelemetry/api` if it is installed (loaded once), else null. */
function otel(): Api | null {
  if (loaded === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      loaded = require("@opentelemetry/api") as Api;
    } catch {
      loaded = null;
    }
  }
  return loaded;
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/** The context of a W3C trace context carrier (traceparent, tracestate), on `base`. */
export function extractTraceContext(api: Api, carrier: Record<string, string>, base: OtelApi.Context): OtelApi.Context {
  const m = TRACEPARENT.exec((carrier["traceparent"] ?? "").trim());
  if (!m || m[1] === "ff") return base;
  const spanContext: OtelApi.SpanContext = {
    traceId: m[2],
    spanId: m[3],
    traceFlags: parseInt(m[4], 16) & 1,
    isRemote: true,
  };
  if (!api.isSpanContextValid(spanContext)) return base;
  const state = carrier["tracestate"];
  if (state) spanContext.traceState = api.createTraceState(state);
  return api.trace.setSpanContext(base, spanContext);
}

/** A started agent span and the context to run the handler in. */
export interface AgentSpan {
  run<T>(fn: () => Promise<T>): Promise<T>;
  end(output: AgentOutput): void;
}

export function startAgentSpan(assignment: Assignment, name: string, workerId: string): AgentSpan | null {
  const api = otel();
  if (api === null) return null;
  const carrier = assignment.traceContext ?? {};
  const parent = extractTraceContext(api, carrier, api.context.active());
  const span = api.trace.getTracer("carsvc-ts").startSpan(
    `invoke_agent ${name}`,
    {
      kind: api.SpanKind.SERVER,
      attributes: {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": name,
        "gen_ai.conversation.id": assignment.threadId,
        "carsvc.run.id": assignment.runId,
        "carsvc.assignment.id": assignment.assignmentId,
        "carsvc.attempt": assignment.attempt,
        "carsvc.worker.id": workerId,
      },
    },
    parent,
  );
  const active = api.trace.setSpan(parent, span);
  return {
    run: (fn) => api.context.with(active, fn),
    end(output: AgentOutput): void {
      if (span.isRecording()) {
        const t = output.tokens;
        if (t) {
          span.setAttribute("gen_ai.usage.input_tokens", t.inputTokens);
          span.setAttribute("gen_ai.usage.output_tokens", t.outputTokens);
          span.setAttribute("carsvc.usage.cost_usd", t.costUsd);
        }
        if (output.error !== undefined) {
          span.setStatus({ code: api.SpanStatusCode.ERROR, message: output.error });
          span.setAttribute("error.type", output.error.startsWith("cancelled") ? "cancelled" : "agent_error");
        }
      }
      span.end();
    },
  };
}
