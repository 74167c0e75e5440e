// The connected workers and their load (ListWorkers), refreshed every REFRESH_MS.

import { get } from "./api.js";
import { ago, errorText, every, h, number, setText, time } from "./ui.js";

const REFRESH_MS = 2000;

export function workersView(main) {
  const message = h("p", { class: "error", role: "alert", hidden: true });
  const totals = h("p", { class: "totals" });
  const body = h("tbody");
  const table = h("table", { class: "workers" },
    h("caption", { class: "visually-hidden" }, "Connected workers"),
    h("thead", {}, h("tr", {}, ["Worker", "Agents", "Load", "Completed", "SDK", "Labels", "Connected", "Last seen"]
      .map((t) => h("th", { scope: "col" }, t)))),
    body);
  const empty = h("p", { class: "muted", hidden: true }, "No worker is connected.");
  main.append(h("h1", {}, "Workers"), message, totals,
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Workers" }, table), empty);

  async function refresh() {
    try {
      const workers = (await get("/workers")).workers || [];
      message.hidden = true;
      const busy = workers.reduce((n, w) => n + (w.in_flight || 0), 0);
      const slots = workers.reduce((n, w) => n + (w.max_in_flight || 0), 0);
      setText(totals, `${workers.length} sessions · ${number(busy)} of ${number(slots)} slots busy`);
      body.replaceChildren(...workers.map((w) => {
        const load = w.in_flight || 0;
        const max = w.max_in_flight || 0;
        const labels = Object.entries(w.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
        return h("tr", { class: w.draining ? "draining" : "" },
          h("td", {}, h("span", { class: "mono" }, w.worker_id), h("br"),
            h("small", { class: "muted mono" }, w.session_id), w.draining ? h("span", { class: "badge" }, "draining") : ""),
          h("td", { class: "mono" }, (w.agents || []).join(", ")),
          h("td", {}, h("meter", { min: 0, max: Math.max(1, max), value: load, "aria-label": `load of ${w.worker_id}` }),
            ` ${load} / ${max}`),
          h("td", { class: "num" }, number(w.completed)),
          h("td", {}, w.sdk || ""),
          h("td", {}, labels),
          h("td", {}, time(w.connected_unix_ms)),
          h("td", {}, ago(w.last_seen_unix_ms)));
      }));
      table.hidden = workers.length === 0;
      empty.hidden = workers.length > 0;
    } catch (error) {
      setText(message, errorText(error));
      message.hidden = false;
    }
  }

  return every(REFRESH_MS, refresh);
}
