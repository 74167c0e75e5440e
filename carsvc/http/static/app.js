// The console's shell: the connection form, the router (#/runs, #/runs/ID,
// #/approvals, #/workers) and the count of runs waiting for a decision.

import { get, onUnauthenticated, settings } from "./api.js";
import { approvalsView } from "./approvals.js";
import { runView } from "./run.js";
import { runsView } from "./runs.js";
import { every, replace, setText } from "./ui.js";
import { workersView } from "./workers.js";

const main = document.getElementById("main");
const notice = document.getElementById("notice");
let cleanup = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/runs";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "runs" && parts.length === 2) return { name: "runs", view: runView, args: [parts[1]] };
  if (parts[0] === "approvals") return { name: "approvals", view: approvalsView, args: [params] };
  if (parts[0] === "workers") return { name: "workers", view: workersView, args: [params] };
  return { name: "runs", view: runsView, args: [params] };
}

function show() {
  if (cleanup) cleanup();
  const { name, view, args } = route();
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  replace(main);
  cleanup = view(main, ...args) || null;
}

// -- connection: the client token and the agent id ------------------------------------

const form = document.getElementById("connection-form");
const details = document.getElementById("connection");
const tokenInput = document.getElementById("token");
const agentInput = document.getElementById("agent-id");

function showConnection() {
  tokenInput.value = settings.token;
  agentInput.value = settings.agentId;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  settings.token = tokenInput.value.trim();
  settings.agentId = agentInput.value.trim();
  details.open = false;
  notice.hidden = true;
  show();
});
document.getElementById("forget").addEventListener("click", () => {
  settings.token = "";
  settings.agentId = "";
  showConnection();
});

onUnauthenticated((error) => {
  setText(notice, `This sidecar needs a client token: ${error.message}. Enter one under Connection.`);
  notice.hidden = false;
  details.open = true;
  tokenInput.focus();
});

// -- the count of runs waiting for a decision, in the navigation ------------------------

const waiting = document.getElementById("waiting-count");
async function countWaiting() {
  try {
    const page = await get("/runs", { status: "WAITING", page_size: 100 });
    const count = (page.runs || []).length;
    waiting.hidden = count === 0;
    setText(waiting, page.next_page_token ? "100+" : String(count));
    waiting.setAttribute("aria-label", `${count} runs waiting for a decision`);
  } catch {
    waiting.hidden = true;
  }
}

showConnection();
window.addEventListener("hashchange", () => { show(); countWaiting(); });
show();
every(5000, countWaiting);
