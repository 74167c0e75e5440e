/** carsvc for Node.js: worker and client helpers over the code generated from proto/car/v1. */
export * from "./worker";
export * from "./client";
// The generated code, one namespace per .proto file.
export * as budget from "./gen/car/v1/budget";
export * as events from "./gen/car/v1/events";
export * as patterns from "./gen/car/v1/patterns";
export * as registry from "./gen/car/v1/registry";
export * as runs from "./gen/car/v1/runs";
export * as state from "./gen/car/v1/state";
export * as types from "./gen/car/v1/types";
export * as worker from "./gen/car/v1/worker";
