// The sidecar's HTTP/JSON API (docs/console.md), as the console uses it.
// The client token and the agent id live in sessionStorage: this tab only.

const PREFIX = "/api/v1";
const TOKEN_KEY = "carsvc.token";
const AGENT_KEY = "carsvc.agentId";

export const settings = {
  get token() { return sessionStorage.getItem(TOKEN_KEY) || ""; },
  set token(value) { store(TOKEN_KEY, value); },
  get agentId() { return sessionStorage.getItem(AGENT_KEY) || ""; },
  set agentId(value) { store(AGENT_KEY, value); },
};

function store(key, value) {
  if (value) sessionStorage.setItem(key, value);
  else sessionStorage.removeItem(key);
}

// An answer other than 2xx: `code` is the gRPC status name (NOT_FOUND, ...).
export class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || "";
  }
}

// Listeners told when the sidecar asks for a token (401).
const authListeners = new Set();
export function onUnauthenticated(listener) { authListeners.add(listener); }

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  if (settings.token) out.Authorization = `Bearer ${settings.token}`;
  return out;
}

async function failure(response) {
  let body = {};
  try { body = await response.json(); } catch { /* not JSON: a proxy's page */ }
  const error = new ApiError(
    response.status, body.code || `HTTP_${response.status}`, body.message || response.statusText, body.field,
  );
  if (response.status === 401) authListeners.forEach((listener) => listener(error));
  return error;
}

export function url(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
  }
  const text = query.toString();
  return `${PREFIX}${path}${text ? `?${text}` : ""}`;
}

export async function get(path, params, signal) {
  const response = await fetch(url(path, params), { headers: headers(), signal });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function post(path, body, signal) {
  const response = await fetch(url(path), {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body || {}),
    signal,
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export const runPath = (runId) => `/runs/${encodeURIComponent(runId)}`;

// The messages of a text/event-stream body: {id, event, data}.
async function* messages(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const abort = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", abort);
  let buffer = "";
  let message = { id: null, event: "message", data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split(/\r\n|\r|\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (line === "") {
          if (message.data.length) yield { ...message, data: message.data.join("\n") };
          message = { id: null, event: "message", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue; // a keepalive comment
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "data") message.data.push(text);
        else if (field === "id") message.id = text;
        else if (field === "event") message.event = text;
      }
    }
  } finally {
    signal?.removeEventListener("abort", abort);
  }
}

const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

// Follows a run's events (GET /runs/{id}/events, Server-Sent Events) through
// fetch, so the token travels as a header. Reconnects after the last seq it
// received (Last-Event-ID) when the stream breaks or the sidecar says the
// reader fell behind; ends after run_finished, at a 204, or when `signal`
// aborts. onEvent(event, rawLength) gets each RunEvent as JSON.
export async function followEvents(runId, { afterSeq = 0, kinds, follow = true, onEvent, onState, signal }) {
  let last = afterSeq;
  let failures = 0;
  while (!signal?.aborted) {
    let finished = false;
    try {
      const request = url(`${runPath(runId)}/events`, {
        after_seq: last, kinds: kinds ? kinds.join(",") : "", follow: follow ? "" : "false",
      });
      const response = await fetch(request, {
        headers: headers({ Accept: "text/event-stream", "Last-Event-ID": String(last) }),
        signal,
      });
      if (response.status === 204) return;
      if (!response.ok) {
        const error = await failure(response);
        if (response.status < 500 && error.code !== "UNAVAILABLE") throw error;
        throw Object.assign(error, { retry: true });
      }
      onState?.("live");
      failures = 0;
      for await (const message of messages(response.body, signal)) {
        if (message.event === "error") {
          const error = JSON.parse(message.data);
          if (error.resume_after_seq !== undefined) last = Number(error.resume_after_seq);
          if (error.code !== "RESOURCE_EXHAUSTED") throw new ApiError(200, error.code, error.message, error.field);
          break; // fell behind: resume at once from where it says
        }
        const event = JSON.parse(message.data);
        last = Number(event.seq);
        onEvent(event, message.data.length);
        if (event.run_finished) finished = true;
      }
      if (finished || !follow) return;
      await sleep(500, signal); // the stream ended early (the sidecar restarting?): follow on
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && !error.retry) throw error;
      failures += 1;
      onState?.("reconnecting");
      await sleep(Math.min(500 * 2 ** failures, 5000), signal);
    }
  }
}

// Every event of a run, read to its current end (no follow).
export async function readEvents(runId, kinds, signal) {
  const events = [];
  await followEvents(runId, { kinds, follow: false, signal, onEvent: (event) => events.push(event) });
  return events;
}
