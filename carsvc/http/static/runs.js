// The runs list: filters (status, thread, pattern, owner) kept in the URL,
// pages of PAGE_SIZE from ListRuns (page tokens), refreshed every REFRESH_MS.

import { get, post, runPath, settings } from "./api.js";
import {
  ACTIVE, PATTERNS, STATUSES, announce, badge, errorText, every, field, h, pager, setText, statusName, time,
} from "./ui.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 2000;

export function runsView(main, params) {
  const filters = {
    status: params.get("status") || "",
    thread_id: params.get("thread") || "",
    pattern: params.get("pattern") || "",
    agent_id: params.get("owner") || "",
  };
  const tokens = [""]; // the token of each page seen so far: tokens[i] starts page i
  let page = 0;
  let next = "";

  const status = h("select", { name: "status" },
    h("option", { value: "" }, "any"), STATUSES.map((s) => h("option", { value: s }, s.toLowerCase())));
  status.value = filters.status;
  const pattern = h("select", { name: "pattern" },
    h("option", { value: "" }, "any"), PATTERNS.map((p) => h("option", { value: p }, p)));
  pattern.value = filters.pattern;
  const thread = h("input", { type: "search", name: "thread", value: filters.thread_id, spellcheck: "false" });
  const owner = h("input", { type: "search", name: "owner", value: filters.agent_id, spellcheck: "false" });
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter runs" },
    field("f-status", "Status", status),
    field("f-pattern", "Pattern", pattern),
    field("f-thread", "Thread", thread),
    field("f-owner", "Owner", owner),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
  status.addEventListener("change", apply);
  pattern.addEventListener("change", apply);

  function apply() {
    const query = new URLSearchParams();
    if (status.value) query.set("status", status.value);
    if (pattern.value) query.set("pattern", pattern.value);
    if (thread.value.trim()) query.set("thread", thread.value.trim());
    if (owner.value.trim()) query.set("owner", owner.value.trim());
    const text = query.toString();
    location.hash = `#/runs${text ? `?${text}` : ""}`;
  }

  const message = h("p", { class: "error", role: "alert", hidden: true });
  const body = h("tbody");
  const table = h("table", { class: "runs" },
    h("caption", { class: "visually-hidden" }, "Runs, newest first"),
    h("thead", {}, h("tr", {},
      ["Run", "Status", "Pattern", "Thread", "Owner", "Created", "Events", ""].map((t) => h("th", { scope: "col" }, t)))),
    body);
  const empty = h("p", { class: "muted", hidden: true }, "No run matches.");
  const pages = pager("Pages of runs", {
    onPrev: () => { if (page > 0) { page -= 1; refresh(true); } },
    onNext: () => { if (next) { tokens[page + 1] = next; page += 1; refresh(true); } },
  });
  main.append(
    h("h1", {}, "Runs"),
    form,
    message,
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Runs" }, table),
    empty,
    pages.element,
  );

  const rows = new Map(); // run_id -> {row, cells}
  let loading = false;

  async function refresh(moved) {
    if (loading) return;
    loading = true;
    try {
      const answer = await get("/runs", { ...filters, page_size: PAGE_SIZE, page_token: tokens[page] });
      message.hidden = true;
      const runs = answer.runs || [];
      next = answer.next_page_token || "";
      render(runs);
      empty.hidden = runs.length > 0;
      pages.update(`Page ${page + 1}`, page > 0, Boolean(next));
      if (moved) announce(`Page ${page + 1} of runs`);
    } catch (error) {
      setText(message, errorText(error));
      message.hidden = false;
    } finally {
      loading = false;
    }
  }

  function render(runs) {
    const seen = new Set();
    let previous = null;
    for (const run of runs) {
      seen.add(run.run_id);
      let entry = rows.get(run.run_id);
      if (!entry) entry = makeRow(run.run_id);
      update(entry, run);
      const expected = previous ? previous.nextSibling : body.firstChild;
      if (expected !== entry.row) body.insertBefore(entry.row, expected);
      previous = entry.row;
    }
    for (const [runId, entry] of rows) {
      if (!seen.has(runId)) { entry.row.remove(); rows.delete(runId); }
    }
  }

  function makeRow(runId) {
    const cells = {
      status: h("td"), pattern: h("td"), thread: h("td", { class: "mono" }), owner: h("td"),
      created: h("td"), events: h("td", { class: "num" }), actions: h("td", { class: "actions" }),
    };
    const link = h("a", { href: `#/runs/${encodeURIComponent(runId)}`, class: "mono" }, runId);
    const row = h("tr", { dataset: { runId } }, h("td", {}, link), cells.status, cells.pattern, cells.thread,
      cells.owner, cells.created, cells.events, cells.actions);
    const entry = { row, cells, status: "" };
    rows.set(runId, entry);
    return entry;
  }

  function update(entry, run) {
    const { cells } = entry;
    const name = statusName(run.status);
    if (entry.status !== name) {
      entry.status = name;
      cells.status.replaceChildren(badge(run.status));
      cells.actions.replaceChildren(ACTIVE.has(name) ? cancelButton(run) : "");
    }
    setText(cells.pattern, run.pattern);
    setText(cells.thread, run.thread_id);
    setText(cells.owner, run.agent_id || "–");
    setText(cells.created, time(run.created_unix_ms));
    setText(cells.events, Number(run.last_seq || 0).toLocaleString());
  }

  function cancelButton(run) {
    const button = h("button", { type: "button", class: "danger small", "aria-label": `Cancel run ${run.run_id}` },
      "Cancel");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await post(`${runPath(run.run_id)}/cancel`, { agent_id: settings.agentId, reason: "cancelled from the console" });
        announce(`Run ${run.run_id} cancelled`);
        refresh(false);
      } catch (error) {
        setText(message, errorText(error));
        message.hidden = false;
        button.disabled = false;
      }
    });
    return button;
  }

  const stop = every(REFRESH_MS, () => refresh(false));
  return stop;
}
