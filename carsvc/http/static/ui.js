// Small DOM helpers. Text always goes in as text (never as HTML).

export function h(tag, attrs, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") element.addEventListener(key.slice(2), value);
    else if (key === "class") element.className = value;
    else if (key === "dataset") Object.assign(element.dataset, value);
    else if (value === true) element.setAttribute(key, "");
    else element.setAttribute(key, String(value));
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

export function replace(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

// Sets textContent only when it changed (keeps selection and screen readers calm).
export function setText(element, text) {
  const value = String(text ?? "");
  if (element.textContent !== value) element.textContent = value;
}

export const STATUSES = ["PENDING", "RUNNING", "WAITING", "SUCCEEDED", "FAILED", "CANCELLED"];
export const ACTIVE = new Set(["PENDING", "RUNNING", "WAITING"]);
export const PATTERNS = [
  "single", "map_reduce", "swarm", "pipeline", "supervisor", "delegator", "spawn_subtask",
  "vote", "fleet", "adversarial_review", "tournament", "advisor",
];

export const statusName = (status) => (status || "RUN_STATUS_UNSPECIFIED").replace(/^RUN_STATUS_/, "");

export function badge(status) {
  const name = statusName(status);
  return h("span", { class: `badge status-${name.toLowerCase()}` }, name);
}

export function time(ms) {
  const value = Number(ms || 0);
  if (!value) return "–";
  return new Date(value).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });
}

export function ago(ms) {
  const value = Number(ms || 0);
  if (!value) return "–";
  const seconds = Math.round((Date.now() - value) / 1000);
  const future = seconds < 0;
  const s = Math.abs(seconds);
  const text = s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m` : s < 86400
    ? `${Math.floor(s / 3600)}h` : `${Math.floor(s / 86400)}d`;
  return future ? `in ${text}` : `${text} ago`;
}

export function cut(text, limit) {
  const value = String(text ?? "");
  return value.length > limit ? `${value.slice(0, limit)}… (${value.length.toLocaleString()} characters)` : value;
}

export function json(value, limit = 20000) {
  return cut(JSON.stringify(value ?? null, null, 2), limit);
}

export function number(value) {
  return Number(value || 0).toLocaleString();
}

// The message shown for an ApiError or any other failure.
export function errorText(error) {
  if (error && error.code) return `${error.code}: ${error.message}`;
  return String(error?.message || error);
}

// Calls fn now and every `ms` while the page is visible, until stop().
export function every(ms, fn) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    timer = null;
    if (stopped) return;
    if (!document.hidden) {
      try { await fn(); } catch { /* fn shows its own errors */ }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; if (timer) clearTimeout(timer); };
}

// Runs fn at most once per animation frame (and at most every `ms`).
export function throttled(fn, ms = 200) {
  let queued = false;
  let lastRun = 0;
  return () => {
    if (queued) return;
    queued = true;
    const wait = Math.max(0, ms - (performance.now() - lastRun));
    setTimeout(() => requestAnimationFrame(() => {
      queued = false;
      lastRun = performance.now();
      fn();
    }), wait);
  };
}

// A pager: « Newer | page N | Older » over any source of pages.
export function pager(label, { onPrev, onNext, prevText = "‹ Previous", nextText = "Next ›" }) {
  const prev = h("button", { type: "button", class: "secondary", onclick: () => onPrev() }, prevText);
  const next = h("button", { type: "button", class: "secondary", onclick: () => onNext() }, nextText);
  const where = h("span", { class: "muted" });
  const element = h("nav", { class: "pager", "aria-label": label }, prev, where, next);
  return {
    element,
    update(text, hasPrev, hasNext) {
      setText(where, text);
      prev.disabled = !hasPrev;
      next.disabled = !hasNext;
      element.hidden = !hasPrev && !hasNext;
    },
  };
}

// Announces a short message to screen readers.
export function announce(text) {
  const live = document.getElementById("live");
  if (live) live.textContent = text;
}

export function field(id, labelText, input) {
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, labelText), input);
}
