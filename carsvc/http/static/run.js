// One run's page: its facts and a cancel button, the tool calls waiting for a
// decision, per-agent progress and outputs, the budget, its events (live, paged)
// and its result, and its state scope. Events arrive on one Server-Sent Events
// stream; what the page shows is folded from them as they come, and redrawn at
// most every RENDER_MS. A 20,000-item map-reduce keeps the newest MAX_EVENTS
// events (the sidecar itself keeps event_retention) and draws one page of rows.

import { followEvents, get, post, runPath, settings } from "./api.js";
import { PendingCalls, approvalCard } from "./approvals.js";
import {
  ACTIVE, announce, badge, cut, errorText, field, h, json, number, pager, replace, setText, statusName, throttled,
  time,
} from "./ui.js";

const MAX_EVENTS = 10000;
const BIG_EVENT_CHARS = 16 * 1024;
const EVENTS_PAGE = 50;
const AGENTS_PAGE = 25;
const KEYS_PAGE = 100;
const RENDER_MS = 250;

const kindOf = (event) => Object.keys(event).find((key) => !["run_id", "seq", "time_unix_ms"].includes(key)) || "?";

function succeeded(output) {
  return output && output.error === undefined && Boolean(output.answer);
}

function summary(kind, body) {
  switch (kind) {
    case "run_started": return `pattern ${body.pattern} on thread ${body.thread_id}`;
    case "status_changed": return `${statusName(body.status)}${body.reason ? `: ${body.reason}` : ""}`;
    case "agent_started": return `${body.agent} (${body.role || "agent"} ${body.index || 0}) ${body.step || ""}`;
    case "agent_finished": {
      const output = body.output || {};
      const outcome = output.error !== undefined ? `error: ${output.error}` : output.answer || "(empty answer)";
      return `${output.name || ""} ${body.step || ""} on ${body.worker_id || "?"}: ${outcome}`;
    }
    case "agent_skipped": return `${body.role || "agent"} ${body.index || 0}: ${body.output?.error || "skipped"}`;
    case "agent_redispatched": return `${body.agent} attempt ${body.attempt}: ${body.reason || ""}`;
    case "budget_updated": {
      const b = body.budget || {};
      return `${number(b.total_tokens)} tokens, $${Number(b.cost_usd || 0).toFixed(4)}, ${number(b.agents_started)} agents`;
    }
    case "progress": {
      const part = body.fraction !== undefined ? ` (${Math.round(body.fraction * 100)}%)` : "";
      return `${body.agent}: ${body.message || ""}${part}`;
    }
    case "custom": return `${body.agent}: ${body.kind}`;
    case "tool_call_suspended": return `${body.agent} asks to run ${body.tool_name} (${body.tool_call_id})`;
    case "tool_call_resumed": {
      const action = body.decision?.action === "DECISION_ACTION_CANCEL" ? "denied" : "approved";
      return `${body.tool_call_id} ${action}${body.decision?.reason ? `: ${body.decision.reason}` : ""}`;
    }
    case "run_finished": return `${statusName(body.status)} ${body.reason || ""}${body.detail ? `: ${body.detail}` : ""}`;
    default: return "";
  }
}

export function runView(main, runId) {
  const controller = new AbortController();
  const model = {
    run: null,
    events: [], // the newest MAX_EVENTS: {seq, time, kind, summary, body | text}
    dropped: 0,
    kinds: new Map(),
    agents: new Map(), // assignment id (or skipped:role:index) -> agent row
    counts: { started: 0, succeeded: 0, failed: 0, skipped: 0, redispatched: 0 },
    pending: new PendingCalls(),
    budget: null,
    stream: "connecting",
  };

  // -- the page's parts ------------------------------------------------------------------
  const title = h("h1", {}, "Run ", h("span", { class: "mono" }, runId));
  const statusSlot = h("span");
  const streamState = h("span", { class: "stream", role: "status" });
  const message = h("p", { class: "error", role: "alert", hidden: true });
  const facts = h("dl", { class: "facts wide" });
  const ending = h("p", { class: "ending", hidden: true });
  const cancelArea = h("div", { class: "cancel-area" });
  const approvals = h("div", { class: "approvals" });
  const approvalsSection = section("approvals", "Waiting for a decision", approvals);
  approvalsSection.hidden = true;
  const progress = progressPart(model);
  const budget = h("div");
  const events = eventsPart(model);
  const result = h("div");
  const resultSection = section("result", "Result", result);
  resultSection.hidden = true;
  const state = statePart(controller.signal);

  main.append(
    h("p", {}, h("a", { href: "#/runs" }, "‹ All runs")),
    h("div", { class: "run-head" }, title, statusSlot, streamState),
    message, ending, facts, cancelArea,
    approvalsSection,
    section("progress", "Agents", progress.element),
    section("budget", "Budget", budget),
    section("events", "Events", events.element),
    resultSection,
    section("state", "State", state.element),
  );

  // -- data ------------------------------------------------------------------------------
  function ingest(event, rawLength) {
    const kind = kindOf(event);
    const body = event[kind] || {};
    const seq = Number(event.seq);
    const kept = { seq, time: event.time_unix_ms, kind, summary: cut(summary(kind, body), 300) };
    if (rawLength > BIG_EVENT_CHARS) kept.text = `${cut(JSON.stringify(event), BIG_EVENT_CHARS)}`;
    else kept.body = event;
    model.events.push(kept);
    if (model.events.length > MAX_EVENTS + 1000) {
      model.events.splice(0, 1000);
      model.dropped += 1000;
    }
    model.kinds.set(kind, (model.kinds.get(kind) || 0) + 1);
    model.pending.ingest(event);
    foldAgent(kind, body);
    if (kind === "budget_updated") model.budget = body.budget;
    if (kind === "run_finished") model.budget = body.budget || model.budget;
    if (model.run && seq > Number(model.run.last_seq || 0)) model.run.last_seq = String(seq);
    if (["run_started", "status_changed", "run_finished", "tool_call_suspended", "tool_call_resumed"].includes(kind)) {
      reload();
    }
    draw();
  }

  function foldAgent(kind, body) {
    const { agents, counts } = model;
    if (kind === "agent_started") {
      counts.started += 1;
      agents.set(body.assignment_id, {
        id: body.assignment_id, agent: body.agent, role: body.role || "agent", index: body.index || 0,
        step: body.step || "", state: "running", attempt: 1, message: "", fraction: undefined,
        worker: "", answer: "",
      });
    } else if (kind === "progress" || kind === "agent_redispatched" || kind === "tool_call_suspended"
               || kind === "tool_call_resumed") {
      const agent = agents.get(body.assignment_id);
      if (!agent) return;
      if (kind === "progress") { agent.message = body.message || ""; agent.fraction = body.fraction; }
      if (kind === "agent_redispatched") {
        counts.redispatched += 1;
        agent.attempt = body.attempt; agent.message = `redispatched: ${body.reason || ""}`;
      }
      if (kind === "tool_call_suspended") { agent.state = "waiting"; agent.message = `waits: ${body.tool_name}`; }
    } else if (kind === "agent_finished") {
      const output = body.output || {};
      let agent = agents.get(body.assignment_id);
      if (!agent) {
        agent = { id: body.assignment_id, agent: output.name, role: body.role, index: body.index, step: body.step };
        agents.set(body.assignment_id, agent);
      }
      if (agent.state !== "succeeded" && agent.state !== "failed") counts[succeeded(output) ? "succeeded" : "failed"] += 1;
      agent.state = succeeded(output) ? "succeeded" : "failed";
      agent.worker = body.worker_id || "";
      agent.attempt = body.attempt || agent.attempt;
      agent.answer = cut(output.error !== undefined ? `error: ${output.error}` : output.answer || "(empty answer)", 300);
      agent.message = "";
    } else if (kind === "agent_skipped") {
      counts.skipped += 1;
      const key = `skipped:${body.role}:${body.index}`;
      agents.set(key, {
        id: key, agent: body.output?.name || "", role: body.role || "agent", index: body.index || 0, step: "",
        state: "skipped", attempt: 0, message: "", worker: "", answer: cut(body.output?.error || "", 300),
      });
    }
  }

  let reloading = null;
  function reload() {
    if (reloading) return;
    reloading = setTimeout(async () => {
      reloading = null;
      try {
        model.run = (await get(runPath(runId), undefined, controller.signal)).run;
        message.hidden = true;
        draw();
      } catch (error) {
        if (!controller.signal.aborted) showError(error);
      }
    }, 150);
  }

  function showError(error) {
    setText(message, errorText(error));
    message.hidden = false;
  }

  // -- drawing ---------------------------------------------------------------------------
  let cancelFor = "";
  const draw = throttled(() => {
    const { run } = model;
    setText(streamState, model.stream === "live" ? "● live" : model.stream === "ended" ? "" : model.stream);
    if (run) {
      statusSlot.replaceChildren(badge(run.status));
      drawFacts(run);
      const active = ACTIVE.has(statusName(run.status));
      if (active && cancelFor !== run.run_id) { cancelFor = run.run_id; replace(cancelArea, cancelForm(run)); }
      if (!active && cancelFor) { cancelFor = ""; replace(cancelArea); }
      if (!active) drawResult(run);
      state.scope(run.state_scope || run.thread_id);
    }
    drawApprovals();
    progress.draw();
    drawBudget();
    events.draw();
  }, RENDER_MS);

  function drawFacts(run) {
    const labels = Object.entries(run.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
    const rows = [
      ["Pattern", run.pattern], ["Thread", run.thread_id], ["Owner", run.agent_id || "–"],
      ["State scope", run.state_scope || run.thread_id], ["Created", time(run.created_unix_ms)],
      ["Started", time(run.started_unix_ms)], ["Finished", time(run.finished_unix_ms)],
      ["Events", number(run.last_seq)], labels ? ["Labels", labels] : null,
    ].filter(Boolean);
    replace(facts, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    if (run.termination_reason) {
      setText(ending, `${run.termination_reason}${run.termination_detail ? `: ${run.termination_detail}` : ""}`);
      ending.hidden = false;
    }
  }

  function cancelForm(run) {
    const reason = h("input", { type: "text", autocomplete: "off", placeholder: "optional" });
    const button = h("button", { type: "submit", class: "danger" }, "Cancel run");
    const form = h("form", { class: "cancel-form" }, field("cancel-reason", "Cancel reason", reason), button);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      button.disabled = true;
      try {
        const answer = await post(`${runPath(run.run_id)}/cancel`, {
          agent_id: settings.agentId, reason: reason.value.trim() || "cancelled from the console",
        });
        announce(answer.already_finished ? "The run had already finished" : "Run cancelled");
        reload();
      } catch (error) {
        showError(error);
        button.disabled = false;
      }
    });
    return form;
  }

  const cards = new Map();
  function drawApprovals() {
    const wanted = new Map(model.pending.list().map((entry) => [`${entry.call.tool_call_id}#${entry.seq}`, entry]));
    for (const [key, card] of cards) if (!wanted.has(key)) { card.remove(); cards.delete(key); }
    for (const [key, entry] of wanted) {
      if (!cards.has(key) && model.run) {
        const card = approvalCard(model.run, entry);
        cards.set(key, card);
        approvals.append(card);
      }
    }
    approvalsSection.hidden = cards.size === 0;
  }

  function drawBudget() {
    const b = model.budget || model.run?.budget;
    if (!b) { replace(budget, h("p", { class: "muted" }, "Nothing spent yet.")); return; }
    const limits = b.limits || {};
    const row = (name, used, limit, format = number) => [
      h("dt", {}, name),
      h("dd", {}, format(used), limit !== undefined ? ` of ${format(limit)}` : "",
        limit !== undefined ? h("meter", { min: 0, max: Number(limit) || 1, value: Number(used || 0),
          "aria-label": `${name} used` }) : ""),
    ];
    const dollars = (v) => `$${Number(v || 0).toFixed(4)}`;
    replace(budget,
      h("dl", { class: "facts" },
        row("Input tokens", b.input_tokens, limits.max_input_tokens),
        row("Output tokens", b.output_tokens, limits.max_output_tokens),
        row("Total tokens", b.total_tokens, limits.max_total_tokens),
        row("Cost", b.cost_usd, limits.max_cost_usd, dollars),
        row("Agents started", b.agents_started, limits.max_agents),
        b.agents_denied ? row("Agents refused", b.agents_denied) : null,
        b.budget_id ? [h("dt", {}, "Shared budget"), h("dd", { class: "mono" }, b.budget_id)] : null),
      b.exhausted ? h("p", { class: "warning" }, "The budget is exhausted.") : null);
  }

  let resultShown = "";
  function drawResult(run) {
    const key = `${run.run_id}:${run.status}:${run.result_omitted}:${Boolean(run.result)}`;
    if (key === resultShown) return;
    resultShown = key;
    resultSection.hidden = false;
    if (run.result_omitted) {
      replace(result, h("p", { class: "muted" },
        `The result is ${number(run.result_bytes)} bytes, too large to send inline; read it with `,
        h("code", {}, "RunService.ReadRunResult"), " (the agents' outputs are above)."));
    } else if (run.result) {
      replace(result, h("pre", { class: "json", tabindex: "0" }, json(run.result, 100000)));
    } else {
      replace(result, h("p", { class: "muted" }, "The run ended without a result."));
    }
  }

  // -- start -----------------------------------------------------------------------------
  (async () => {
    try {
      model.run = (await get(runPath(runId), undefined, controller.signal)).run;
      draw();
      await followEvents(runId, {
        signal: controller.signal,
        onEvent: ingest,
        onState: (value) => { model.stream = value; draw(); },
      });
      model.stream = "ended";
      draw();
    } catch (error) {
      if (controller.signal.aborted) return;
      showError(error);
      model.stream = "";
      draw();
    }
  })();

  return () => controller.abort();
}

function section(id, label, content) {
  return h("section", { class: "card", "aria-labelledby": `h-${id}` }, h("h2", { id: `h-${id}` }, label), content);
}

// Per-agent progress: counts, a bar, and a paged, filterable table of agents.
function progressPart(model) {
  let page = 0;
  const filter = h("select", {},
    ["all", "running", "waiting", "succeeded", "failed", "skipped"].map((v) => h("option", { value: v }, v)));
  filter.addEventListener("change", () => { page = 0; draw(); });
  const totals = h("p", { class: "totals" });
  const bar = h("progress", { max: 1, value: 0, "aria-label": "Agents finished" });
  const body = h("tbody");
  const table = h("table", { class: "agents" },
    h("caption", { class: "visually-hidden" }, "Agents of this run"),
    h("thead", {}, h("tr", {}, ["Step", "Agent", "State", "Progress", "Worker", "Try", "Output"].map(
      (t) => h("th", { scope: "col" }, t)))),
    body);
  const pages = pager("Pages of agents", {
    onPrev: () => { page = Math.max(0, page - 1); draw(); },
    onNext: () => { page += 1; draw(); },
  });
  const empty = h("p", { class: "muted" }, "No agent has started yet.");
  const element = h("div", {}, totals, bar,
    h("div", { class: "toolbar" }, field("agent-filter", "Show", filter)),
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Agents" }, table),
    empty, pages.element);

  function draw() {
    const { counts, agents } = model;
    const done = counts.succeeded + counts.failed;
    const running = Math.max(0, counts.started - done);
    setText(totals, `${number(counts.started)} started · ${number(running)} running · ${number(counts.succeeded)} `
      + `succeeded · ${number(counts.failed)} failed · ${number(counts.skipped)} skipped`
      + (counts.redispatched ? ` · ${number(counts.redispatched)} redispatched` : ""));
    bar.max = Math.max(1, counts.started + counts.skipped);
    bar.value = done + counts.skipped;
    const wanted = filter.value;
    const all = wanted === "all" ? [...agents.values()] : [...agents.values()].filter((a) => a.state === wanted);
    const pagesCount = Math.max(1, Math.ceil(all.length / AGENTS_PAGE));
    page = Math.min(page, pagesCount - 1);
    const shown = all.slice(page * AGENTS_PAGE, (page + 1) * AGENTS_PAGE);
    body.replaceChildren(...shown.map((a) => h("tr", { class: `agent-${a.state}` },
      h("td", { class: "mono" }, a.step || `${a.role} ${a.index}`),
      h("td", {}, a.agent || ""),
      h("td", {}, h("span", { class: `badge agent-state-${a.state}` }, a.state)),
      h("td", {}, a.fraction !== undefined && (a.state === "running" || a.state === "waiting")
        ? h("progress", { max: 1, value: a.fraction, "aria-label": `progress of ${a.agent}` }) : "",
        a.message ? ` ${cut(a.message, 120)}` : ""),
      h("td", { class: "mono" }, a.worker || ""),
      h("td", { class: "num" }, a.attempt || ""),
      h("td", { class: "output" }, a.answer || ""))));
    empty.hidden = agents.size > 0;
    table.hidden = agents.size === 0;
    pages.update(`Page ${page + 1} of ${pagesCount} (${number(all.length)} agents)`, page > 0, page + 1 < pagesCount);
  }

  return { element, draw };
}

// The events: a kind filter and a window of EVENTS_PAGE rows, the newest
// while "follow newest" is on, else anchored on the last seq it shows.
function eventsPart(model) {
  let anchor = 0; // the last seq shown when not following
  const kinds = h("select", {}, h("option", { value: "" }, "every kind"));
  const follow = h("input", { type: "checkbox", checked: true, id: "event-follow" });
  kinds.addEventListener("change", () => { follow.checked = true; draw(); });
  follow.addEventListener("change", () => { anchor = shownLast; draw(); });
  const body = h("tbody");
  const note = h("p", { class: "muted" });
  const table = h("table", { class: "events" },
    h("caption", { class: "visually-hidden" }, "Events of this run"),
    h("thead", {}, h("tr", {}, ["Seq", "Time", "Kind", "What"].map((t) => h("th", { scope: "col" }, t)))),
    body);
  const pages = pager("Older and newer events", {
    prevText: "‹ Older",
    nextText: "Newer ›",
    onPrev: () => {
      follow.checked = false;
      anchor = start > 0 ? list[Math.max(0, start - 1)].seq : shownLast;
      draw();
    },
    onNext: () => {
      const newest = Math.min(list.length, end + EVENTS_PAGE);
      if (newest >= list.length) follow.checked = true;
      else anchor = list[newest - 1].seq;
      draw();
    },
  });
  const element = h("div", {},
    h("div", { class: "toolbar" }, field("event-kind", "Kind", kinds),
      h("div", { class: "field inline" }, follow, h("label", { for: "event-follow" }, "Follow newest"))),
    note,
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Events" }, table),
    pages.element);
  let list = [];
  let start = 0;
  let end = 0;
  let shownLast = 0;
  let drawnKinds = "";

  // The index just after the last event with seq <= `seq` (the list is in seq order).
  function after(seq) {
    let low = 0;
    let high = list.length;
    while (low < high) {
      const middle = (low + high) >> 1;
      if (list[middle].seq <= seq) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  function draw() {
    const names = [...model.kinds.keys()].sort();
    const signature = names.map((n) => `${n}:${model.kinds.get(n)}`).join(",");
    if (signature !== drawnKinds) {
      drawnKinds = signature;
      const chosen = kinds.value;
      kinds.replaceChildren(h("option", { value: "" }, "every kind"),
        names.map((n) => h("option", { value: n }, `${n} (${number(model.kinds.get(n))})`)));
      kinds.value = chosen;
    }
    list = kinds.value ? model.events.filter((e) => e.kind === kinds.value) : model.events;
    end = follow.checked ? list.length : Math.max(Math.min(EVENTS_PAGE, list.length), after(anchor));
    start = Math.max(0, end - EVENTS_PAGE);
    const shown = list.slice(start, end);
    shownLast = shown.length ? shown[shown.length - 1].seq : 0;
    const first = body.firstElementChild?.dataset.seq;
    const last = body.lastElementChild?.dataset.seq;
    if (!shown.length || String(shown[0].seq) !== first || String(shownLast) !== last
        || body.childElementCount !== shown.length) {
      body.replaceChildren(...shown.map(row));
    }
    setText(note, model.dropped ? `The ${number(model.dropped)} oldest events received are not kept on this page.` : "");
    const range = shown.length ? `seq ${shown[0].seq}–${shownLast}` : "none";
    pages.update(`${range} (${number(list.length)} events)`, start > 0, end < list.length);
  }

  function row(event) {
    const details = h("details", {}, h("summary", {}, event.summary || event.kind));
    details.addEventListener("toggle", () => {
      if (details.open && details.childElementCount === 1) {
        details.append(h("pre", { class: "json" }, event.text || json(event.body)));
      }
    });
    return h("tr", { class: `kind-${event.kind}`, dataset: { seq: event.seq } },
      h("td", { class: "num" }, event.seq), h("td", {}, time(event.time)),
      h("td", { class: "mono" }, event.kind), h("td", {}, details));
  }

  return { element, draw };
}

// The run's state scope: its keys, a page at a time, and a key's value on demand.
function statePart(signal) {
  let scope = "";
  let token = "";
  const prefix = h("input", { type: "search", autocomplete: "off", spellcheck: "false" });
  const form = h("form", { class: "toolbar" }, field("state-prefix", "Key prefix", prefix),
    h("button", { type: "submit", class: "secondary" }, "List keys"));
  form.addEventListener("submit", (event) => { event.preventDefault(); load(true); });
  const heading = h("p", { class: "muted" });
  const keys = h("ul", { class: "keys" });
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More keys");
  more.addEventListener("click", () => load(false));
  const value = h("div", { class: "value" });
  const element = h("div", {}, heading, form, keys, more, value);

  async function load(fresh) {
    if (!scope) return;
    if (fresh) { token = ""; keys.replaceChildren(); replace(value); }
    try {
      const answer = await get("/state/keys", { scope, prefix: prefix.value, page_size: KEYS_PAGE, page_token: token },
        signal);
      for (const key of answer.keys || []) {
        const button = h("button", { type: "button", class: "link mono" }, key);
        button.addEventListener("click", () => show(key));
        keys.append(h("li", {}, button));
      }
      token = answer.next_page_token || "";
      more.hidden = !token;
      if (!keys.childElementCount) keys.append(h("li", { class: "muted" }, "No keys."));
    } catch (error) {
      if (!signal.aborted) replace(value, h("p", { class: "error" }, errorText(error)));
    }
  }

  async function show(key) {
    try {
      const answer = await get("/state", { scope, key }, signal);
      replace(value, h("h3", { class: "mono" }, key),
        answer.found ? [h("p", { class: "muted" }, `written by ${answer.writer || "?"}`),
          h("pre", { class: "json", tabindex: "0" }, json(answer.value))]
          : h("p", { class: "muted" }, "Not set (deleted since?)"));
    } catch (error) {
      replace(value, h("p", { class: "error" }, errorText(error)));
    }
  }

  return {
    element,
    scope(name) {
      if (name === scope) return;
      scope = name;
      setText(heading, `Scope ${scope}`);
      load(true);
    },
  };
}
