// The pending-approvals inbox: every tool call a WAITING run's agent has
// suspended and nobody has decided yet, with its arguments, and Approve / Deny.
// Runs are listed with ListRuns (status WAITING, paged); a run's pending calls
// are read from its events (tool_call_suspended minus tool_call_resumed), again
// only when its last seq moved.

import { get, post, readEvents, runPath, settings } from "./api.js";
import { ago, announce, cut, errorText, every, h, json, pager, setText, time } from "./ui.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 2000;

// Tool calls still waiting, in order, from a run's events.
export class PendingCalls {
  constructor() { this.calls = new Map(); } // `${call id}#${seq}` -> {seq, time, call}

  ingest(event) {
    if (event.tool_call_suspended) {
      const call = event.tool_call_suspended;
      this.calls.set(`${call.tool_call_id}#${event.seq}`, { seq: Number(event.seq), time: event.time_unix_ms, call });
    } else if (event.tool_call_resumed) {
      const id = event.tool_call_resumed.tool_call_id;
      for (const [key, entry] of this.calls) {
        if (entry.call.tool_call_id === id) { this.calls.delete(key); break; }
      }
    } else if (event.run_finished) {
      this.calls.clear();
    }
  }

  get size() { return this.calls.size; }
  list() { return [...this.calls.values()]; }
}

// One suspended tool call with its arguments, and the buttons that decide it.
export function approvalCard(run, entry, onDecided) {
  const { call, seq } = entry;
  const noteId = `note-${run.run_id}-${seq}`;
  const note = h("input", { id: noteId, type: "text", autocomplete: "off", placeholder: "optional" });
  const outcome = h("p", { class: "outcome", role: "status" });
  const approve = h("button", { type: "button", class: "approve" }, "Approve");
  const deny = h("button", { type: "button", class: "danger" }, "Deny");
  approve.setAttribute("aria-label", `Approve ${call.tool_name} (${call.tool_call_id}) of run ${run.run_id}`);
  deny.setAttribute("aria-label", `Deny ${call.tool_name} (${call.tool_call_id}) of run ${run.run_id}`);

  async function decide(action) {
    approve.disabled = deny.disabled = true;
    setText(outcome, "Sending…");
    const decision = {
      target_id: call.tool_call_id,
      // One decision per suspension: a double click is a duplicate, not a second answer.
      decision_id: `console:${call.tool_call_id}:${seq}`,
      action,
      reason: note.value.trim(),
    };
    try {
      const answer = await post(`${runPath(run.run_id)}/decisions`, {
        agent_id: settings.agentId, decisions: [decision],
      });
      const verb = action === "DECISION_ACTION_RESUME" ? "Approved" : "Denied";
      const how = (answer.applied_decision_ids || []).length ? "delivered to the agent"
        : (answer.queued_decision_ids || []).length ? "queued until the call suspends"
          : "already decided earlier";
      setText(outcome, `${verb}: ${how}.`);
      card.classList.add("decided");
      announce(`${verb} ${call.tool_name} of run ${run.run_id}`);
      onDecided?.();
    } catch (error) {
      setText(outcome, errorText(error));
      outcome.classList.add("error");
      approve.disabled = deny.disabled = false;
    }
  }
  approve.addEventListener("click", () => decide("DECISION_ACTION_RESUME"));
  deny.addEventListener("click", () => decide("DECISION_ACTION_CANCEL"));

  const deadline = Number(call.deadline_unix_ms || 0);
  const card = h("article", { class: "approval", dataset: { runId: run.run_id, callId: call.tool_call_id } },
    h("h3", {}, h("span", { class: "mono" }, call.tool_name || "(tool)"), " ",
      h("span", { class: "muted" }, `asked by ${call.agent || "an agent"}`)),
    h("dl", { class: "facts" },
      h("dt", {}, "Run"), h("dd", {}, h("a", { href: `#/runs/${encodeURIComponent(run.run_id)}`, class: "mono" },
        run.run_id)),
      h("dt", {}, "Owner"), h("dd", {}, run.agent_id || "–"),
      h("dt", {}, "Call"), h("dd", { class: "mono" }, call.tool_call_id),
      call.reason ? [h("dt", {}, "Reason"), h("dd", {}, cut(call.reason, 2000))] : null,
      h("dt", {}, "Suspended"), h("dd", {}, time(entry.time)),
      deadline ? [h("dt", {}, "Deadline"), h("dd", {}, `${time(deadline)} (${ago(deadline)})`)] : null),
    h("h4", {}, "Arguments"),
    h("pre", { class: "json", tabindex: "0" }, call.arguments === undefined ? "(none)" : json(call.arguments)),
    h("div", { class: "decide" },
      h("div", { class: "field" }, h("label", { for: noteId }, "Note"), note),
      h("div", { class: "row" }, approve, deny)),
    outcome);
  return card;
}

export function approvalsView(main) {
  const tokens = [""];
  let page = 0;
  let next = "";
  const known = new Map(); // run_id -> {lastSeq, pending: PendingCalls}
  const controller = new AbortController();

  const message = h("p", { class: "error", role: "alert", hidden: true });
  const list = h("div", { class: "approvals" });
  const empty = h("p", { class: "muted", hidden: true }, "No tool call is waiting for a decision.");
  const pages = pager("Pages of waiting runs", {
    onPrev: () => { if (page > 0) { page -= 1; refresh(); } },
    onNext: () => { if (next) { tokens[page + 1] = next; page += 1; refresh(); } },
  });
  main.append(
    h("h1", {}, "Pending approvals"),
    h("p", { class: "muted" }, "Tool calls that agents of waiting runs have suspended. ",
      "Decisions are sent as the agent id under Connection", settings.agentId ? ` (${settings.agentId})` : "", "."),
    message, list, empty, pages.element);

  const cards = new Map(); // `${run}#${call}#${seq}` -> card
  let loading = false;

  async function refresh() {
    if (loading) return;
    loading = true;
    try {
      const answer = await get("/runs", { status: "WAITING", page_size: PAGE_SIZE, page_token: tokens[page] });
      message.hidden = true;
      next = answer.next_page_token || "";
      const runs = answer.runs || [];
      await Promise.all(runs.map(async (run) => {
        const entry = known.get(run.run_id);
        if (entry && entry.lastSeq === run.last_seq) return;
        const pending = new PendingCalls();
        const events = await readEvents(run.run_id, ["tool_call_suspended", "tool_call_resumed", "run_finished"],
          controller.signal);
        events.forEach((event) => pending.ingest(event));
        known.set(run.run_id, { lastSeq: run.last_seq, pending });
      }));
      render(runs);
      const listed = new Set(runs.map((run) => run.run_id));
      for (const runId of known.keys()) if (!listed.has(runId)) known.delete(runId);
      pages.update(`Page ${page + 1}`, page > 0, Boolean(next));
    } catch (error) {
      if (controller.signal.aborted) return;
      setText(message, errorText(error));
      message.hidden = false;
    } finally {
      loading = false;
    }
  }

  function render(runs) {
    const wanted = new Map();
    for (const run of runs) {
      for (const entry of known.get(run.run_id)?.pending.list() || []) {
        wanted.set(`${run.run_id}#${entry.call.tool_call_id}#${entry.seq}`, [run, entry]);
      }
    }
    for (const [key, card] of cards) {
      // A decided card stays until its run's events say so; an undecided one goes when its call does.
      if (!wanted.has(key)) { card.remove(); cards.delete(key); }
    }
    for (const [key, [run, entry]] of wanted) {
      if (!cards.has(key)) {
        const card = approvalCard(run, entry, () => known.delete(run.run_id));
        cards.set(key, card);
        list.append(card);
      }
    }
    empty.hidden = cards.size > 0;
  }

  const stop = every(REFRESH_MS, refresh);
  return () => { stop(); controller.abort(); };
}
