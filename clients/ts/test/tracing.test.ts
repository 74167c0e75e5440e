import { test } from "node:test";
import assert from "node:assert/strict";

import * as api from "@opentelemetry/api";

import { extractTraceContext } from "../src/tracing";

test("an assignment's W3C trace context becomes the parent span context", () => {
  const carrier = {
    traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    tracestate: "vendor=x",
  };
  const parent = api.trace.getSpanContext(extractTraceContext(api, carrier, api.ROOT_CONTEXT));
  assert.ok(parent);
  assert.equal(parent.traceId, "0af7651916cd43dd8448eb211c80319c");
  assert.equal(parent.spanId, "b7ad6b7169203331");
  assert.equal(parent.traceFlags, 1);
  assert.equal(parent.isRemote, true);
  assert.equal(parent.traceState?.get("vendor"), "x");
});

test("no or a malformed traceparent leaves the context as it was", () => {
  const carriers: Record<string, string>[] = [{}, { traceparent: "garbage" }, { traceparent: `00-${"0".repeat(32)}-b7ad6b7169203331-01` }];
  for (const carrier of carriers) {
    assert.equal(extractTraceContext(api, carrier, api.ROOT_CONTEXT), api.ROOT_CONTEXT);
  }
});
