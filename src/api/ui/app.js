// The dashboard: a small single-page app over the JSON API (/api/...). No framework, no build
// step. Every value that comes from the API is put into the page as text (text nodes,
// textContent), never as HTML: a run's output holding `<script>` shows as that text.

"use strict";

const main = document.getElementById("main");
const banner = document.getElementById("banner");

// ---- small helpers -------------------------------------------------------------------------

/** An element: `h("td", {class: "x", onclick: f}, "text", child, ...)`. Strings become text nodes. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function link(path, text) {
  return h("a", { href: path, "data-link": true }, text);
}

function runLink(id) {
  return link("/ui/runs/" + encodeURIComponent(id), id);
}

function workflowLink(id) {
  return link("/ui/workflows/" + encodeURIComponent(id), id);
}

function badge(status) {
  return h("span", { class: "badge " + String(status || "").replace(/[^a-z_]/g, "") }, status || "?");
}

function pretty(value) {
  return h("pre", {}, typeof value === "string" ? value : JSON.stringify(value, null, 2));
}

function when(text) {
  if (!text) return "—";
  const at = new Date(text);
  return isNaN(at) ? String(text) : at.toLocaleString();
}

function ago(text) {
  if (!text) return "—";
  const seconds = Math.round((Date.now() - new Date(text).getTime()) / 1000);
  if (!isFinite(seconds)) return String(text);
  if (Math.abs(seconds) < 60) return seconds + " s ago";
  if (Math.abs(seconds) < 3600) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function duration(ms) {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return ms + " ms";
  if (ms < 60000) return (ms / 1000).toFixed(1) + " s";
  if (ms < 3600000) return (ms / 60000).toFixed(1) + " min";
  return (ms / 3600000).toFixed(1) + " h";
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "Nothing here.");
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))), h("tbody", {}, rows));
}

function panel(title, ...children) {
  return h("section", { class: "panel" }, title ? h("h2", {}, title) : null, ...children);
}

const LIVE = ["pending", "running", "retrying", "sleeping", "waiting"];
const STATUSES = ["pending", "running", "retrying", "sleeping", "waiting", "completed", "failed", "cancelled", "timed_out"];

// ---- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API; a 401 shows the login form (and throws). */
async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: {}, credentials: "same-origin" };
  if (options.body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || response.statusText;
    if (response.status === 401 && !options.noLogin) showLogin();
    throw new ApiError(response.status, message);
  }
  return data;
}

// ---- pages, routing and polling ------------------------------------------------------------

let page = { alive: false, timers: [] };

/** A fresh page context: the previous page's polling stops. */
function newPage(name) {
  page.alive = false;
  for (const timer of page.timers) clearTimeout(timer);
  page = { alive: true, timers: [], name };
  document.body.dataset.page = name;
  delete document.body.dataset.ready;
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.nav === name.split("-")[0]);
  }
  return page;
}

/** Calls `step` now and then every `ms` while `ctx` is the current page. */
function poll(ctx, ms, step) {
  const tick = async () => {
    if (!ctx.alive) return;
    let again = true;
    try {
      again = (await step()) !== false;
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return;
      showError(err);
    }
    if (ctx.alive && again) ctx.timers.push(setTimeout(tick, ms));
  };
  return tick();
}

/** Says that the page has rendered its data (tests wait for it), and when: ms since navigation. */
function markReady(name) {
  document.body.dataset.ready = name;
  if (!document.body.dataset.firstReadyMs) document.body.dataset.firstReadyMs = String(Math.round(performance.now()));
}

function showError(err) {
  let box = document.getElementById("page-error");
  if (!box) {
    box = h("p", { id: "page-error", class: "error" });
    main.prepend(box);
  }
  box.textContent = "Error: " + (err && err.message ? err.message : String(err));
}

const routes = [
  [/^\/ui\/?$/, overviewPage],
  [/^\/ui\/workflows\/?$/, workflowsPage],
  [/^\/ui\/workflows\/([^/]+)\/?$/, workflowPage],
  [/^\/ui\/runs\/?$/, runsPage],
  [/^\/ui\/runs\/([^/]+)\/?$/, runPage],
  [/^\/ui\/events\/?$/, eventsPage],
];

function render() {
  const path = location.pathname;
  for (const [pattern, show] of routes) {
    const match = pattern.exec(path);
    if (match) {
      show(...match.slice(1).map(decodeURIComponent));
      return;
    }
  }
  newPage("missing");
  main.replaceChildren(h("h1", {}, "Not found"), h("p", {}, "No page at ", h("code", {}, path), ". ", link("/ui", "Overview")));
}

function navigate(path) {
  history.pushState(null, "", path);
  render();
  window.scrollTo(0, 0);
}

document.addEventListener("click", (event) => {
  const a = event.target.closest("a");
  if (!a || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin === location.origin && url.pathname.startsWith("/ui") && !a.target) {
    event.preventDefault();
    navigate(url.pathname + url.search);
  }
});
window.addEventListener("popstate", render);

// ---- access --------------------------------------------------------------------------------

function showLogin() {
  const ctx = newPage("login");
  ctx.alive = false;
  const error = h("p", { id: "login-error", class: "error", role: "alert" });
  const input = h("input", { id: "login-token", type: "password", autocomplete: "current-password", required: true });
  const form = h(
    "form",
    {
      id: "login-form",
      onsubmit: async (event) => {
        event.preventDefault();
        error.textContent = "";
        try {
          await api("/ui/login", { method: "POST", body: { token: input.value }, noLogin: true });
          input.value = "";
          document.getElementById("logout").hidden = false;
          render();
        } catch (err) {
          error.textContent = err.status === 401 ? "That token is not valid." : "Login failed: " + err.message;
        }
      },
    },
    h("label", {}, "API token", input),
    h("div", { class: "actions" }, h("button", { class: "primary", type: "submit", id: "login-submit" }, "Log in")),
    error,
  );
  main.replaceChildren(
    h("section", { class: "panel", id: "login-panel" }, h("h1", {}, "Log in"),
      h("p", { class: "muted" }, "This service has an API token. Enter it once; a session cookie keeps you logged in for 12 hours."),
      form),
  );
  markReady("login");
  input.focus();
}

document.getElementById("logout").addEventListener("click", async () => {
  await api("/ui/logout", { method: "POST", body: {}, noLogin: true }).catch(() => {});
  document.getElementById("logout").hidden = true;
  showLogin();
});

/** Asks for confirmation in a dialog; resolves to true when confirmed. */
function confirmAction(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

// ---- Overview ------------------------------------------------------------------------------

function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "n", id }, value), h("div", { class: "l" }, label));
}

function chart(hours) {
  const max = Math.max(1, ...hours.map((x) => x.started));
  const bar = (kind, n, start) => {
    const el = h("div", { class: "bar " + kind, title: `${when(start)}: ${n} ${kind}` });
    el.style.height = (100 * n) / max + "%";
    return el;
  };
  return h("div", {},
    h("div", { class: "chart", id: "chart" }, hours.map((x) => h("div", { class: "hour" }, bar("started", x.started, x.start), bar("completed", x.completed, x.start), bar("failed", x.failed, x.start)))),
    h("div", { class: "legend" }, legend("started", "var(--idle)"), legend("completed", "var(--ok)"), legend("failed", "var(--bad)"), h("span", {}, "the last 24 hours, by the hour runs were started")));
}

function legend(text, color) {
  const el = h("span", {}, text);
  el.style.setProperty("--c", color);
  return el;
}

// The step column: where a live run is, and where a failed run failed.
function summaryRows(runs) {
  return runs.map((r) => h("tr", {}, h("td", {}, runLink(r.runId)), h("td", {}, workflowLink(r.workflowId)), h("td", {}, badge(r.status)),
    h("td", { class: "hide-narrow" }, r.trigger || "—"), h("td", {}, r.step || "—"), h("td", { class: "hide-narrow" }, when(r.createdAt)),
    h("td", {}, duration(r.durationMs))));
}
const SUMMARY_HEAD = ["Run", "Workflow", "Status", "Trigger", "Step", "Created", "Duration"];

// A `datetime-local` input's value (local time) as RFC 3339, and back.
function toInstant(local) {
  const at = new Date(local);
  return isNaN(at) ? "" : at.toISOString();
}
function toLocalInput(instant) {
  if (!instant) return "";
  const at = new Date(instant);
  if (isNaN(at)) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${at.getFullYear()}-${pad(at.getMonth() + 1)}-${pad(at.getDate())}T${pad(at.getHours())}:${pad(at.getMinutes())}`;
}

async function overviewPage() {
  const ctx = newPage("overview");
  main.replaceChildren(h("h1", {}, "Overview"), h("div", { id: "overview" }, h("p", { class: "muted" }, "Loading…")));
  await poll(ctx, 5000, async () => {
    const health = await fetch("/health", { credentials: "same-origin" }).then((r) => r.json()).catch(() => ({ storeStatus: "unreachable" }));
    const [stats, replicas, running, failed] = await Promise.all([
      api("/api/stats"),
      api("/api/replicas"),
      api("/api/runs?status=running&limit=20"),
      api("/api/runs?status=failed&limit=10"),
    ]);
    if (!ctx.alive) return false;
    const warnings = health.warnings || [];
    const content = h("div", { id: "overview" },
      h("h2", {}, "Runs started"),
      h("div", { class: "cards" },
        card("started, last hour", stats.lastHour.started, "started-hour"),
        card("completed, last hour", stats.lastHour.completed, "completed-hour"),
        card("failed, last hour", stats.lastHour.failed, "failed-hour"),
        card("started, last day", stats.lastDay.started, "started-day"),
        card("completed, last day", stats.lastDay.completed, "completed-day"),
        card("failed, last day", stats.lastDay.failed, "failed-day")),
      stats.capped ? h("p", { class: "muted" }, "More runs than are counted here: the figures are lower bounds.") : null,
      panel(null, chart(stats.hours)),
      panel("Running now", table(SUMMARY_HEAD, summaryRows(running.runs), "No run is running.")),
      panel("Recent failures", table(SUMMARY_HEAD, summaryRows(failed.runs), "No failed runs.")),
      panel("Store",
        h("dl", { class: "kv" },
          h("dt", {}, "kind"), h("dd", {}, health.store || "?"),
          h("dt", {}, "status"), h("dd", { id: "store-status" }, health.storeStatus || "?"),
          h("dt", {}, "version"), h("dd", {}, health.storeVersion || "—"),
          h("dt", {}, "bus length"), h("dd", { id: "bus-length" }, stats.bus.length),
          h("dt", {}, "bus pending"), h("dd", {}, stats.bus.pending),
          h("dt", {}, "dead letters"), h("dd", {}, link("/ui/events", String(stats.bus.dead))),
          h("dt", {}, "steps in flight"), h("dd", {}, stats.steps.inFlight)),
        health.error ? h("p", { class: "error" }, health.error) : null,
        warnings.length ? h("ul", { class: "warnings" }, warnings.map((w) => h("li", {}, w))) : h("p", { class: "muted" }, "No warnings.")),
      panel("Live replicas",
        table(["Replica", "Version", "Executors busy", "Started", "Last seen"],
          replicas.replicas.map((r) => h("tr", { class: "replica" }, h("td", {}, r.id), h("td", {}, r.version),
            h("td", {}, `${r.executorsBusy} / ${r.executorsTotal}`), h("td", {}, when(r.startedAt)), h("td", {}, ago(r.lastSeen)))),
          "No replica has sent a heartbeat in the last " + replicas.ttlSeconds + " s.")),
    );
    document.getElementById("overview").replaceWith(content);
    markReady("overview");
  });
}

// ---- Workflows -----------------------------------------------------------------------------

/** A cron expression in words, for the common shapes; otherwise null. */
function cronWords(cron) {
  if (!cron) return null;
  let f = cron.trim().split(/\s+/);
  let seconds = "0";
  if (f.length === 6) seconds = f.shift();
  if (f.length !== 5) return null;
  const [min, hour, dom, mon, dow] = f;
  const num = (x) => /^\d+$/.test(x);
  const at = (hh, mm) => String(hh).padStart(2, "0") + ":" + String(mm).padStart(2, "0");
  const days = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
  if (seconds !== "0" && /^\*\/\d+$/.test(seconds) && [min, hour, dom, mon, dow].every((x) => x === "*")) return "every " + seconds.slice(2) + " seconds";
  if (seconds !== "0") return null;
  if (min === "*" && hour === "*" && dom === "*" && mon === "*" && dow === "*") return "every minute";
  if (/^\*\/\d+$/.test(min) && hour === "*" && dom === "*" && mon === "*" && dow === "*") return "every " + min.slice(2) + " minutes";
  if (num(min) && hour === "*" && dom === "*" && mon === "*" && dow === "*") return "every hour at minute " + min;
  if (num(min) && /^\*\/\d+$/.test(hour) && dom === "*" && mon === "*" && dow === "*") return "every " + hour.slice(2) + " hours at minute " + min;
  if (num(min) && num(hour) && dom === "*" && mon === "*" && dow === "*") return "every day at " + at(hour, min);
  if (num(min) && num(hour) && dom === "*" && mon === "*" && num(dow)) return "every " + days[Number(dow)] + " at " + at(hour, min);
  if (num(min) && num(hour) && dom === "*" && mon === "*" && dow === "1-5") return "every weekday at " + at(hour, min);
  if (num(min) && num(hour) && num(dom) && mon === "*" && dow === "*") return "on day " + dom + " of every month at " + at(hour, min);
  return null;
}

function schedule(w) {
  if (!w.schedule) return "—";
  const words = cronWords(w.schedule);
  return words ? `${words} (${w.schedule})` : w.schedule;
}

async function workflowsPage() {
  const ctx = newPage("workflows");
  main.replaceChildren(h("h1", {}, "Workflows"), h("p", { class: "muted" }, "Loading…"));
  try {
    const { workflows } = await api("/api/workflows");
    if (!ctx.alive) return;
    main.replaceChildren(h("h1", {}, "Workflows"), panel(null, table(
      ["Workflow", "Description", "Schedule", "Time zone", "Next run", "Events", "Steps"],
      workflows.map((w) => h("tr", { class: "workflow" }, h("td", {}, workflowLink(w.id)), h("td", {}, w.description || ""),
        h("td", {}, schedule(w)), h("td", {}, w.timezone), h("td", {}, when(w.nextRunAt)),
        h("td", {}, (w.events || []).join(", ") || "—"), h("td", {}, w.steps.length))),
      "No workflows are loaded.")));
    markReady("workflows");
  } catch (err) {
    if (err.status !== 401) showError(err);
  }
}

async function workflowPage(id) {
  const ctx = newPage("workflows-one");
  main.replaceChildren(h("h1", {}, id), h("div", { id: "workflow-status" }, h("p", { class: "muted" }, "Loading…")));
  let workflow;
  try {
    const { workflows } = await api("/api/workflows");
    workflow = workflows.find((w) => w.id === id);
  } catch (err) {
    if (err.status !== 401) showError(err);
    return;
  }
  if (!ctx.alive) return;
  if (!workflow) {
    main.replaceChildren(h("h1", {}, "Not found"), h("p", {}, "No workflow ", h("code", {}, id), ". ", link("/ui/workflows", "All workflows")));
    return;
  }
  const input = h("textarea", { id: "trigger-input", spellcheck: "false", "aria-label": "input (JSON)" }, "{}");
  const problem = h("p", { id: "trigger-error", class: "error", role: "alert" });
  const trigger = h("form", {
    id: "trigger-form",
    onsubmit: async (event) => {
      event.preventDefault();
      problem.textContent = "";
      let inputData;
      try {
        inputData = JSON.parse(input.value || "{}");
      } catch (err) {
        problem.textContent = "The input is not valid JSON: " + err.message;
        return;
      }
      if (inputData === null || typeof inputData !== "object" || Array.isArray(inputData)) {
        problem.textContent = "The input must be a JSON object, such as {\"reason\": \"manual\"}.";
        return;
      }
      try {
        const started = await api("/api/workflows/" + encodeURIComponent(id) + "/trigger", { method: "POST", body: { inputData } });
        navigate("/ui/runs/" + encodeURIComponent(started.runId));
      } catch (err) {
        problem.textContent = "Not started: " + err.message;
      }
    },
  }, h("label", {}, "Input (a JSON object)", input), h("div", { class: "actions" }, h("button", { class: "primary", type: "submit", id: "trigger-submit" }, "Trigger a run")), problem);
  const graph = h("div", { class: "steps-graph", id: "steps-graph" });
  // Drawn in file order: an arrow where a step follows the one before it, else what it needs.
  workflow.steps.forEach((s, i) => {
    const follows = i > 0 && s.needs.length === 1 && s.needs[0] === workflow.steps[i - 1].id;
    if (i > 0) graph.append(h("span", { class: "arrow" }, follows ? "→" : "·"));
    const after = follows || s.needs.length === 0 ? null : h("small", { class: "needs" }, "after " + s.needs.join(", "));
    graph.append(h("div", { class: "node", "data-needs": s.needs.join(",") }, s.id, h("small", {}, s.action), after));
  });
  main.replaceChildren(
    h("h1", {}, workflow.id),
    h("p", {}, workflow.description || ""),
    panel(null, h("dl", { class: "kv" },
      h("dt", {}, "schedule"), h("dd", {}, schedule(workflow)),
      h("dt", {}, "time zone"), h("dd", {}, workflow.timezone),
      h("dt", {}, "next run"), h("dd", {}, when(workflow.nextRunAt)),
      h("dt", {}, "catch-up / overlap"), h("dd", {}, `${workflow.catchup || "—"} / ${workflow.overlap || "—"}`),
      h("dt", {}, "events"), h("dd", {}, (workflow.events || []).join(", ") || "—"),
      h("dt", {}, "definition"), h("dd", {}, workflow.definitionHash || "—"))),
    panel("Steps, in order", graph),
    panel("Trigger", trigger),
    h("div", { id: "workflow-status" }, h("p", { class: "muted" }, "Loading…")),
  );
  await poll(ctx, 3000, async () => {
    const status = await api("/api/workflows/" + encodeURIComponent(id) + "/status");
    if (!ctx.alive) return false;
    const counts = Object.entries(status.counts || {}).map(([s, n]) => h("div", { class: "card" }, h("div", { class: "n" }, n), h("div", { class: "l" }, badge(s))));
    const fires = status.nextFires || [];
    document.getElementById("workflow-status").replaceWith(h("div", { id: "workflow-status" },
      fires.length ? panel("Next fires", h("ol", { id: "next-fires" }, fires.map((f) => h("li", {}, when(f), h("span", { class: "muted" }, " (" + f + ")"))))) : null,
      panel("Runs by status", h("div", { class: "cards" }, counts)),
      panel("Active runs", table(SUMMARY_HEAD, summaryRows(status.activeRuns), "None.")),
      panel("Last runs", table(SUMMARY_HEAD, summaryRows(status.recentRuns), "No runs yet."), h("p", {}, link("/ui/runs?workflowId=" + encodeURIComponent(id), "All runs of this workflow")))));
    markReady("workflow");
  });
}

// ---- Runs ----------------------------------------------------------------------------------

async function runsPage() {
  const ctx = newPage("runs");
  const params = new URLSearchParams(location.search);
  const workflowSelect = h("select", { id: "filter-workflow" }, h("option", { value: "" }, "any workflow"));
  const statusSelect = h("select", { id: "filter-status" }, h("option", { value: "" }, "any status"), STATUSES.map((s) => h("option", { value: s }, s)));
  statusSelect.value = params.get("status") || "";
  const afterInput = h("input", { id: "filter-after", type: "datetime-local" });
  const beforeInput = h("input", { id: "filter-before", type: "datetime-local" });
  afterInput.value = toLocalInput(params.get("createdAfter"));
  beforeInput.value = toLocalInput(params.get("createdBefore"));
  // A search by an input field the selected workflow indexes (its `search`).
  const searched = [...params.keys()].find((name) => name.startsWith("input.")) || null;
  const fieldSelect = h("select", { id: "filter-field" });
  const valueInput = h("input", { id: "filter-value", type: "search", placeholder: "value" });
  const searchLabel = h("label", { hidden: true }, "Input field", fieldSelect, valueInput);
  if (searched) valueInput.value = params.get(searched);
  const apply = () => {
    const query = new URLSearchParams();
    if (workflowSelect.value) query.set("workflowId", workflowSelect.value);
    if (workflowSelect.value && !searchLabel.hidden && fieldSelect.value && valueInput.value) {
      query.set("input." + fieldSelect.value, valueInput.value);
    } else if (statusSelect.value) {
      query.set("status", statusSelect.value);
    }
    if (toInstant(afterInput.value)) query.set("createdAfter", toInstant(afterInput.value));
    if (toInstant(beforeInput.value)) query.set("createdBefore", toInstant(beforeInput.value));
    navigate("/ui/runs" + (query.toString() ? "?" + query : ""));
  };
  workflowSelect.addEventListener("change", apply);
  statusSelect.addEventListener("change", apply);
  afterInput.addEventListener("change", apply);
  beforeInput.addEventListener("change", apply);
  valueInput.addEventListener("change", apply);
  const list = h("div", { id: "runs-list" }, h("p", { class: "muted" }, "Loading…"));
  const pager = h("div", { class: "actions" });
  main.replaceChildren(h("h1", {}, "Runs"),
    h("form", { class: "inline", onsubmit: (e) => e.preventDefault() }, h("label", {}, "Workflow", workflowSelect), h("label", {}, "Status", statusSelect),
      h("label", {}, "Created after", afterInput), h("label", {}, "Created before", beforeInput), searchLabel),
    panel(null, list, pager));
  try {
    const { workflows } = await api("/api/workflows");
    for (const w of workflows) workflowSelect.append(h("option", { value: w.id }, w.id));
    workflowSelect.value = params.get("workflowId") || "";
    const fields = (workflows.find((w) => w.id === workflowSelect.value) || {}).search || [];
    fieldSelect.replaceChildren(...fields.map((f) => h("option", { value: f }, f)));
    if (searched) fieldSelect.value = searched.slice("input.".length);
    searchLabel.hidden = !fields.length;
  } catch (err) {
    if (err.status !== 401) showError(err);
    return;
  }
  // Cursor paging: the cursors of the pages before this one, to go back.
  const cursors = [];
  let cursor = null;
  const load = async () => {
    const query = new URLSearchParams({ limit: "25" });
    if (params.get("workflowId")) query.set("workflowId", params.get("workflowId"));
    for (const name of ["status", "createdAfter", "createdBefore"]) {
      if (params.get(name)) query.set(name, params.get(name));
    }
    if (searched) query.set(searched, params.get(searched));
    if (cursor) query.set("cursor", cursor);
    const listed = await api("/api/runs?" + query);
    if (!ctx.alive) return false;
    list.replaceChildren(table(SUMMARY_HEAD, summaryRows(listed.runs), "No runs match."));
    pager.replaceChildren(
      h("button", { id: "page-newer", type: "button", disabled: !cursors.length, onclick: () => { cursor = cursors.pop() ?? null; load().catch(showError); } }, "← Newer"),
      h("button", { id: "page-older", type: "button", disabled: !listed.nextCursor, onclick: () => { cursors.push(cursor); cursor = listed.nextCursor; load().catch(showError); } }, "Older →"));
    markReady("runs");
  };
  await poll(ctx, 5000, load);
}

// ---- A run ---------------------------------------------------------------------------------

/** The Gantt rows of a run from its history: per step, its attempts, back-offs, sleeps and waits. */
function timeline(run, transitions) {
  const t = (x) => new Date(x).getTime();
  const start = transitions.length ? t(transitions[0].at) : Date.now();
  const live = LIVE.includes(run.status);
  const last = transitions.length ? t(transitions[transitions.length - 1].at) : start;
  const end = Math.max(live ? Date.now() : last, start + 1);
  const rows = new Map(run.steps.map((s) => [s.id, []]));
  const open = new Map(); // step -> start of the current attempt, suspension or back-off
  for (const x of transitions) {
    const segs = x.step !== null && x.step !== undefined ? rows.get(x.step) : null;
    if (!segs) continue;
    const at = t(x.at);
    const closeGap = () => {
      const gap = open.get(x.step);
      if (gap && gap.kind !== "attempt") {
        segs.push({ kind: gap.kind, from: gap.from, to: at, title: gap.title });
        open.delete(x.step);
      }
    };
    switch (x.type) {
      case "step_started":
        closeGap();
        open.set(x.step, { kind: "attempt", from: at, attempt: x.attempt });
        break;
      case "step_completed": {
        const o = open.get(x.step);
        segs.push({ kind: "ok", from: o && o.kind === "attempt" ? o.from : at, to: at, title: `attempt ${x.attempt} completed` });
        open.delete(x.step);
        break;
      }
      case "step_reused":
        segs.push({ kind: "reused", from: at, to: at, title: "output reused from an earlier run" });
        break;
      case "step_failed": {
        const o = open.get(x.step);
        segs.push({ kind: "failed", from: o && o.kind === "attempt" ? o.from : at, to: at, title: `attempt ${x.attempt} failed: ${x.error || ""}` });
        open.delete(x.step);
        if (x.retryAt) open.set(x.step, { kind: "backoff", from: at, title: "back-off until " + when(x.retryAt) });
        break;
      }
      case "step_sleeping":
      case "step_waiting":
        open.set(x.step, { kind: x.type === "step_sleeping" ? "sleep" : "wait", from: at,
          title: (x.type === "step_sleeping" ? "sleeping until " : `waiting for ${x.event} until `) + when(x.until) });
        break;
      case "timer_fired":
      case "event_received":
        closeGap();
        break;
      default:
        break;
    }
  }
  for (const [step, o] of open) {
    const segs = rows.get(step);
    if (live) segs.push({ kind: o.kind === "attempt" ? "running" : o.kind, from: o.from, to: end, title: o.title || "running" });
  }
  if (live) {
    // Every live step (steps of a graph run at once) not drawn from an open attempt above.
    for (const current of run.steps.filter((s) => LIVE.includes(s.status))) {
      if (!open.has(current.id) && current.status !== "pending") {
        rows.get(current.id).push({ kind: "running", from: last, to: end, title: current.status });
      }
    }
  }
  const span = end - start;
  const gantt = h("div", { class: "gantt" });
  for (const [step, segs] of rows) {
    const track = h("div", { class: "track" });
    for (const s of segs) {
      const el = h("div", { class: "seg " + s.kind, title: `${s.title || s.kind} (${duration(Math.max(0, s.to - s.from))})`, "data-kind": s.kind });
      el.style.left = (100 * (s.from - start)) / span + "%";
      el.style.width = Math.max(0.3, (100 * (s.to - s.from)) / span) + "%";
      track.append(el);
    }
    gantt.append(h("div", { class: "row", "data-step": step }, h("div", { class: "name", title: step }, step), track));
  }
  gantt.append(h("div", { class: "axis" }, h("span", {}, when(new Date(start).toISOString())), h("span", {}, duration(span)), h("span", {}, live ? "now" : when(new Date(end).toISOString()))));
  return gantt;
}

function stepDetails(run, opened) {
  return h("div", { id: "step-details" }, run.steps.map((s) => {
    const d = h("details", { "data-step": s.id, open: opened.has(s.id) },
      h("summary", {}, s.id, " ", badge(s.status), ` ${s.attempts} attempt${s.attempts === 1 ? "" : "s"}`),
      h("div", {}, h("strong", {}, "output"), s.output === null ? h("p", { class: "muted" }, "none") : pretty(s.output)),
      s.error ? h("div", {}, h("strong", {}, "error"), pretty(s.error)) : null);
    d.addEventListener("toggle", () => (d.open ? opened.add(s.id) : opened.delete(s.id)));
    return d;
  }));
}

function transitionDetail(x) {
  const skip = new Set(["seq", "type", "at", "step", "attempt", "replica"]);
  const rest = Object.fromEntries(Object.entries(x).filter(([k, v]) => !skip.has(k) && v !== null && v !== undefined));
  return Object.keys(rest).length ? h("details", {}, h("summary", {}, Object.keys(rest).join(", ")), pretty(rest)) : "";
}

async function runPage(id) {
  const ctx = newPage("run");
  const opened = new Set();
  let selected = null; // the seq the step-through shows
  let lastSeq = 0;
  let transitions = [];
  const head = h("div", { id: "run-head" });
  const actions = h("div", { class: "actions", id: "run-actions" });
  const message = h("p", { id: "action-message", role: "status" });
  const gantt = h("div", { id: "gantt" });
  const details = h("div", { id: "step-details" });
  const stateView = h("div", { id: "state-view" }, h("p", { class: "muted" }, "Pick a transition in the history to see the run right after it."));
  const historyBox = h("div", { id: "history" });
  const foldCheck = h("p", { id: "fold-check", class: "muted" });
  main.replaceChildren(h("h1", {}, "Run ", h("span", { id: "run-id" }, id)), head, actions, message,
    panel("Timeline", gantt, h("div", { class: "legend" }, legend("attempt", "var(--ok)"), legend("failed attempt", "var(--bad)"), legend("back-off", "#f3c969"), legend("sleep / wait", "#b9a6ea"), legend("running", "var(--live)"))),
    panel("Steps", details), panel("Step-through", stateView), panel("History", foldCheck, historyBox));

  const act = async (question, path, body, after) => {
    if (!(await confirmAction(question))) return;
    message.textContent = "";
    message.className = "";
    try {
      const answer = await api(path, { method: "POST", body });
      message.textContent = "Done.";
      if (after) after(answer);
      else watch();
    } catch (err) {
      message.className = "error";
      message.textContent = "Refused: " + err.message;
    }
  };

  const showState = async (seq) => {
    selected = seq;
    for (const row of historyBox.querySelectorAll("tr[data-seq]")) row.classList.toggle("selected", Number(row.dataset.seq) === seq);
    const state = await api(`/api/runs/${encodeURIComponent(id)}/state?at=${seq}`);
    if (!ctx.alive || selected !== seq) return;
    const x = transitions.find((t) => t.seq === seq);
    const cur = state.current || {};
    stateView.replaceChildren(
      h("div", { class: "stepper" },
        h("button", { type: "button", id: "state-prev", disabled: seq <= 1, onclick: () => showState(seq - 1).catch(showError) }, "← Previous"),
        h("strong", { id: "state-at" }, `After #${seq}`, x ? ` ${x.type}${x.step ? " (" + x.step + ")" : ""}` : ""),
        h("button", { type: "button", id: "state-next", disabled: seq >= lastSeq, onclick: () => showState(seq + 1).catch(showError) }, "Next →")),
      h("dl", { class: "kv" },
        h("dt", {}, "status"), h("dd", { id: "state-status" }, badge(state.status)),
        h("dt", {}, "current step"), h("dd", {}, cur.step ? `${cur.step} (attempt ${cur.attempt})` : "—"),
        cur.retryAt ? [h("dt", {}, "retry at"), h("dd", {}, when(cur.retryAt))] : null,
        cur.until ? [h("dt", {}, "until"), h("dd", {}, when(cur.until))] : null,
        cur.event ? [h("dt", {}, "waiting for"), h("dd", {}, cur.event)] : null,
        cur.lastError ? [h("dt", {}, "last error"), h("dd", {}, `${cur.lastError.step} attempt ${cur.lastError.attempt}: ${cur.lastError.message}`)] : null),
      table(["Step", "Status", "Attempts", "Output"], state.steps.map((s) => h("tr", {}, h("td", {}, s.id), h("td", {}, badge(s.status)), h("td", {}, s.attempts),
        h("td", {}, s.output === null ? (s.error ? h("span", { class: "error" }, s.error) : "—") : pretty(s.output))))));
  };

  const refresh = async () => {
    const [run, history] = await Promise.all([api("/api/runs/" + encodeURIComponent(id)), api(`/api/runs/${encodeURIComponent(id)}/history`)]);
    if (!ctx.alive) return false;
    transitions = history.transitions;
    lastSeq = transitions.length ? transitions[transitions.length - 1].seq : 0;
    const live = LIVE.includes(run.status);
    head.replaceChildren(panel(null, h("dl", { class: "kv" },
      h("dt", {}, "workflow"), h("dd", {}, workflowLink(run.workflowId)),
      h("dt", {}, "status"), h("dd", { id: "run-status", "data-status": run.status }, badge(run.status)),
      h("dt", {}, "created"), h("dd", {}, when(run.createdAt)),
      h("dt", {}, "updated"), h("dd", {}, when(run.updatedAt)),
      h("dt", {}, "trigger"), h("dd", {}, JSON.stringify(run.trigger)),
      run.parentRunId ? [h("dt", {}, "parent"), h("dd", { id: "run-parent" }, runLink(run.parentRunId), " step ", run.parentStep)] : null,
      run.children.length ? [h("dt", {}, "children"), h("dd", { id: "run-children" }, run.children.map((c) => h("div", {}, c.step, ` attempt ${c.attempt}: `, runLink(c.runId))))] : null,
      run.error ? [h("dt", {}, "error"), h("dd", { class: "error", id: "run-error" }, run.error)] : null,
      h("dt", {}, "input"), h("dd", {}, h("details", {}, h("summary", {}, "show"), pretty(run.input))))));
    const from = h("select", { id: "rerun-from" }, run.steps.map((s) => h("option", { value: s.id }, s.id)));
    // (DOM's replaceChildren would show a null as the text "null": leave them out.)
    const buttons = [
      live ? h("button", { class: "danger", id: "cancel-run", type: "button", onclick: () => act(`Cancel run ${id}?`, `/api/runs/${encodeURIComponent(id)}/cancel`, {}) }, "Cancel") : null,
      run.status === "failed" ? h("button", { class: "primary", id: "retry-run", type: "button", onclick: () => act(`Retry run ${id} from its failed step?`, `/api/runs/${encodeURIComponent(id)}/retry`, {}) }, "Retry") : null,
      h("label", {}, "Rerun from step", from),
      h("button", { id: "rerun-run", type: "button", onclick: () => act(`Start a new run from step ${from.value}? It reuses the recorded outputs of the steps that do not come after it.`,
        `/api/runs/${encodeURIComponent(id)}/rerun`, { fromStep: from.value }, (answer) => navigate("/ui/runs/" + encodeURIComponent(answer.runId))) }, "Rerun")];
    actions.replaceChildren(...buttons.filter(Boolean));
    gantt.replaceChildren(timeline(run, transitions));
    details.replaceChildren(stepDetails(run, opened));
    historyBox.replaceChildren(table(["#", "Type", "At", "Step", "Attempt", "Replica", "Details"], transitions.map((x) =>
      h("tr", { class: "clickable" + (x.seq === selected ? " selected" : ""), "data-seq": x.seq, onclick: (e) => { if (!e.target.closest("details")) showState(x.seq).catch(showError); } },
        h("td", {}, x.seq), h("td", {}, x.type), h("td", {}, when(x.at)), h("td", {}, x.step || "—"), h("td", {}, x.attempt ?? "—"),
        h("td", { class: "hide-narrow" }, x.replica || "—"), h("td", {}, transitionDetail(x))))));
    if (!live) {
      // Once the run rests: replay's check, that the fold of this log is what the store holds.
      const folded = await api(`/api/runs/${encodeURIComponent(id)}/state`);
      if (!ctx.alive) return false;
      foldCheck.className = folded.foldMatchesStored ? "muted" : "error";
      foldCheck.textContent = folded.foldMatchesStored
        ? `Replay check: the ${folded.at} transitions fold to the stored state (${folded.status}).`
        : `Replay check FAILED: the fold of the log (${folded.status}, seq ${folded.at}) differs from the stored state.`;
    } else {
      foldCheck.textContent = "";
    }
    markReady("run");
    document.body.dataset.runStatus = run.status;
    // Live while the run is live; a finished run changes only by an action (which watches
    // it again).
    return live;
  };
  let polling = false;
  const watch = () => {
    if (polling) return;
    polling = true;
    return poll(ctx, 1000, async () => {
      const live = await refresh();
      polling = live !== false;
      return live;
    });
  };
  await watch();
}

// ---- Events --------------------------------------------------------------------------------

async function eventsPage() {
  const ctx = newPage("events");
  const typeInput = h("input", { id: "event-type", placeholder: "user.registered", required: true, pattern: "[a-z0-9][a-z0-9_.\\-]{0,127}" });
  const payloadInput = h("textarea", { id: "event-payload", spellcheck: "false" }, "{}");
  const keyInput = h("input", { id: "event-key", placeholder: "optional" });
  const result = h("p", { id: "publish-result", role: "status" });
  const form = h("form", {
    id: "publish-form",
    onsubmit: async (event) => {
      event.preventDefault();
      result.className = "error";
      let payload;
      try {
        payload = JSON.parse(payloadInput.value || "{}");
      } catch (err) {
        result.textContent = "The payload is not valid JSON: " + err.message;
        return;
      }
      if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
        result.textContent = "The payload must be a JSON object.";
        return;
      }
      const body = { eventType: typeInput.value.trim(), payload, source: "dashboard" };
      if (keyInput.value.trim()) body.key = keyInput.value.trim();
      try {
        const published = await api("/api/events", { method: "POST", body });
        result.className = "";
        result.textContent = "Published " + published.eventId + ".";
        load().catch(showError);
      } catch (err) {
        result.textContent = "Not published: " + err.message;
      }
    },
  }, h("div", { class: "inline" }, h("label", {}, "Event type", typeInput), h("label", {}, "Key", keyInput)),
  h("label", {}, "Payload (a JSON object)", payloadInput), h("div", { class: "actions" }, h("button", { class: "primary", type: "submit", id: "publish-submit" }, "Publish")), result);
  const recent = h("div", { id: "events-list" }, h("p", { class: "muted" }, "Loading…"));
  const dead = h("div", { id: "dead-list" }, h("p", { class: "muted" }, "Loading…"));
  main.replaceChildren(h("h1", {}, "Events"), panel("Publish an event", form), panel("Recent events", recent), panel("Dead letters", dead));
  const load = async () => {
    const [events, letters] = await Promise.all([api("/api/events?limit=50"), api("/api/events/dead?limit=50")]);
    if (!ctx.alive) return false;
    recent.replaceChildren(table(["Event", "Type", "Published", "Source", "Payload", "Runs started"], events.events.map((e) =>
      h("tr", { class: "event" }, h("td", {}, e.eventId), h("td", {}, e.eventType || "?"), h("td", {}, when(e.publishedAt)), h("td", {}, e.source || "—"),
        h("td", {}, h("details", {}, h("summary", {}, e.truncated ? "payload (cut)" : "payload"), pretty(e.payload))),
        h("td", {}, !e.handled ? h("span", { class: "muted" }, "not handled yet") : e.runs.length ? e.runs.map((r) => h("div", {}, runLink(r.runId), " ", r.workflowId)) : "none"))),
      "No events on the bus."));
    dead.replaceChildren(table(["Dead letter", "Reason", "Event", "Bytes", "Fields"], letters.deadLetters.map((d) =>
      h("tr", { class: "dead-letter" }, h("td", {}, d.deadLetterId, h("br"), h("small", { class: "muted" }, when(d.deadLetteredAt))), h("td", { class: "error" }, d.reason || "?"),
        h("td", {}, d.eventId || "—"), h("td", {}, d.bytes ?? "—"), h("td", {}, h("details", {}, h("summary", {}, "fields"), pretty(d.fields))))),
      "No dead letters."));
    markReady("events");
  };
  await poll(ctx, 5000, load);
}

// ---- start ---------------------------------------------------------------------------------

async function start() {
  try {
    const session = await api("/ui/session", { noLogin: true });
    if (!session.tokenRequired) {
      banner.textContent = "The API is open: no API_TOKEN is set, so anyone who can reach this port can read and act on runs.";
      banner.hidden = false;
    } else if (session.authenticated) {
      document.getElementById("logout").hidden = false;
    } else {
      showLogin();
      return;
    }
  } catch (err) {
    showError(err);
  }
  render();
}

start();
