// The dashboard's pages (the body's data-view says which): the overview, the dead letters and
// the retries, each refreshed every few seconds from the JSON API without a reload. Everything
// shown goes in as text (textContent), never as markup, so a job's content cannot become a
// script. Every action is confirmed first, then POSTed with the page's token.
"use strict";

const refreshMs = Number(document.body.dataset.refreshMs) || 2000;
const pageSize = Number(document.body.dataset.pageSize) || 25;
const token = document.querySelector('meta[name="csrf-token"]').content;
const status = document.getElementById("status");

function cell(row, value) {
  const td = document.createElement("td");
  td.textContent = value === null || value === undefined ? "–" : String(value);
  row.appendChild(td);
  return td;
}

function pair(p) {
  const show = (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} ms`);
  return `${show(p.p50)} / ${show(p.p99)}`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString() : "–";
}

function fill(tableId, rows, columns) {
  const body = document.querySelector(`#${tableId} tbody`);
  const fresh = document.createElement("tbody");
  for (const item of rows) {
    const row = document.createElement("tr");
    for (const column of columns) cell(row, column(item));
    fresh.appendChild(row);
  }
  body.replaceWith(fresh);
}

// The history as two lines (done, failed per second), scaled to the busiest bucket.
function chart(history) {
  const buckets = history.buckets;
  const width = 900, height = 200, pad = 4;
  const peak = Math.max(1, ...buckets.map((b) => Math.max(b.done_per_s, b.failed_per_s)));
  const step = buckets.length > 1 ? (width - 2 * pad) / (buckets.length - 1) : 0;
  const line = (pick) => buckets
    .map((b, i) => `${(pad + i * step).toFixed(1)},${(height - pad - (pick(b) / peak) * (height - 2 * pad)).toFixed(1)}`)
    .join(" ");
  document.getElementById("done-line").setAttribute("points", line((b) => b.done_per_s));
  document.getElementById("failed-line").setAttribute("points", line((b) => b.failed_per_s));
  // The last whole bucket, and the signups of the last whole minute.
  const whole = buckets.slice(0, -1);
  const last = whole[whole.length - 1];
  document.getElementById("done-rate").textContent = last ? last.done_per_s.toFixed(1) : "-";
  document.getElementById("failed-rate").textContent = last ? last.failed_per_s.toFixed(1) : "-";
  const minute = whole.slice(-Math.round(60 / history.bucket_s));
  const known = minute.filter((b) => b.signups !== null);
  document.getElementById("signups-minute").textContent =
    known.length ? String(known.reduce((sum, b) => sum + b.signups, 0)) : "-";
  document.getElementById("chart-peak").textContent = peak.toFixed(1);
}

function showOverview(overview) {
  chart(overview.history);
  fill("queues", overview.queues, [
    (q) => q.name, (q) => q.waiting, (q) => q.held, (q) => q.retrying, (q) => q.dead,
    (q) => age(q.oldest_wait_s), (q) => pair(q.wait_ms), (q) => pair(q.run_ms),
  ]);
  document.getElementById("dead-letters").textContent = String(overview.dead_letter);
  const counters = document.getElementById("counters");
  const list = document.createElement("dl");
  list.id = "counters";
  for (const [name, value] of Object.entries(overview.counters)) {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    detail.dataset.counter = name;
    list.append(term, detail);
  }
  counters.replaceWith(list);
  fill("consumers", overview.consumers, [
    (c) => c.id, (c) => c.host, (c) => c.pid,
    (c) => Object.entries(c.queues || {}).map(([q, n]) => `${q}×${n}`).join(", "),
    (c) => c.mode, (c) => when(c.started_at), (c) => when(c.heartbeat_at), (c) => c.in_flight,
  ]);
}


function said(text, failed) {
  status.textContent = text;
  status.classList.toggle("stale", Boolean(failed));
}

// What the last action did (or why it was not done): it stays until the next action.
function told(text, failed) {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.classList.toggle("failed", Boolean(failed));
}

async function getJson(path) {
  const answer = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!answer.ok) throw new Error(`the server answered ${answer.status}`);
  return answer.json();
}

// An action: the same origin, the page's token, a JSON body. Resolves to the answer's JSON;
// rejects with the server's message.
async function post(path, body) {
  const answer = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": token },
    body: JSON.stringify(body),
  });
  const reply = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(reply.message || `the server answered ${answer.status}`);
  return reply;
}

// Ask first, in the page's own dialog: resolves true only when the operator confirms.
function confirmed(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "";
    dialog.showModal();
  });
}

async function act(question, path, body, done) {
  if (!(await confirmed(question))) return;
  try {
    told(done(await post(path, body)));
  } catch (error) {
    told(`not done: ${error.message}`, true);
  }
  await view.load(true);
}

function button(label, onClick, options = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.disabled = Boolean(options.disabled);
  if (options.title) b.title = options.title;
  if (options.danger) b.classList.add("danger");
  b.addEventListener("click", onClick);
  return b;
}

// The job's JSON, folded: shown as text.
function jobCell(row, text) {
  const td = document.createElement("td");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "JSON";
  const pre = document.createElement("pre");
  pre.textContent = text === null || text === undefined ? "–" : text;
  details.append(summary, pre);
  td.appendChild(details);
  row.appendChild(td);
}

function short(id) {
  return id ? id.slice(0, 12) : null;
}

// A paged listing (dead letters, retries): re-drawn only when what it shows changes, so an
// open JSON stays open between refreshes.
function paged(name, path, extra, drawRow, rangeId, totalId) {
  const state = { offset: 0, drawn: "" };
  const older = document.getElementById("older");
  const newer = document.getElementById("newer");
  older.addEventListener("click", () => { state.offset += pageSize; load(true); });
  newer.addEventListener("click", () => { state.offset = Math.max(0, state.offset - pageSize); load(true); });
  async function load(force) {
    const query = new URLSearchParams({ offset: state.offset, limit: pageSize, ...extra() });
    const listing = await getJson(`${path}?${query}`);
    if (listing.entries.length === 0 && state.offset > 0 && listing.total > 0) {
      state.offset = Math.max(0, Math.floor((listing.total - 1) / pageSize) * pageSize);
      return load(true);
    }
    const drawn = JSON.stringify([listing.total, listing.offset, listing.entries.map((e) => e.ref)]);
    document.getElementById(totalId).textContent = String(listing.total);
    const first = listing.entries.length ? listing.offset + 1 : 0;
    document.getElementById(rangeId).textContent =
      `${first}–${listing.offset + listing.entries.length} of ${listing.total}`;
    older.disabled = listing.offset + listing.entries.length >= listing.total;
    newer.disabled = listing.offset === 0;
    if (!force && drawn === state.drawn) return;
    state.drawn = drawn;
    const body = document.querySelector(`#${name} tbody`);
    const fresh = document.createElement("tbody");
    for (const entry of listing.entries) {
      const row = document.createElement("tr");
      row.dataset.ref = entry.ref;
      drawRow(row, entry, listing);
      fresh.appendChild(row);
    }
    body.replaceWith(fresh);
    return listing;
  }
  return { load, state };
}

function deadView() {
  const list = paged("dead", "/api/dead", () => ({}), (row, e) => {
    cell(row, whenFull(e.failed_at));
    cell(row, e.queue);
    cell(row, e.type);
    cell(row, short(e.id)).title = e.id || "";
    cell(row, e.attempts ?? e.deliveries);
    cell(row, e.reason);
    cell(row, e.error).classList.add("error");
    jobCell(row, e.job);
    const actions = document.createElement("td");
    actions.append(
      button("Requeue", () => act(
        `Requeue job ${e.id || "?"} (${e.type || "?"}) on its queue as a first attempt?`,
        "/api/dead/requeue", { ref: e.ref }, () => `requeued job ${e.id}`,
      ), { disabled: !e.requeueable, title: e.requeueable ? "" : "its job cannot be decoded or routed" }),
      button("Delete", () => act(
        `Delete the dead letter of job ${e.id || "?"} for good?`,
        "/api/dead/delete", { ref: e.ref }, () => `deleted the dead letter of job ${e.id}`,
      ), { danger: true }),
    );
    row.appendChild(actions);
  }, "dead-range", "dead-total");
  document.getElementById("requeue-all").addEventListener("click", () => act(
    `Requeue all ${document.getElementById("dead-total").textContent} dead letters (and any that arrive meanwhile)?`,
    "/api/dead/requeue", { all: true },
    (r) => `requeued ${r.requeued} jobs` + (r.skipped ? `; left ${r.skipped} that cannot be requeued` : ""),
  ));
  document.getElementById("purge").addEventListener("click", () => act(
    `Delete all ${document.getElementById("dead-total").textContent} dead letters (and any that arrive meanwhile) for good?`,
    "/api/dead/purge", {}, (r) => `purged ${r.purged} dead letters`,
  ));
  return list;
}

function retriesView() {
  const select = document.getElementById("retry-queue");
  const list = paged("retries", "/api/retries", () => ({ queue: select.value }), (row, e) => {
    cell(row, `${whenFull(e.due_at)} (${dueIn(e.due_at)})`);
    cell(row, e.type);
    cell(row, short(e.id)).title = e.id || "";
    cell(row, e.attempt);
    jobCell(row, e.job);
    const actions = document.createElement("td");
    actions.append(
      button("Run now", () => act(
        `Run job ${e.id || "?"} (${e.type || "?"}) now, without waiting for its retry?`,
        "/api/retries/run", { queue: select.value, ref: e.ref }, () => `job ${e.id} is next in line`,
      )),
      button("Delete", () => act(
        `Delete the retry of job ${e.id || "?"}? It will not run again.`,
        "/api/retries/delete", { queue: select.value, ref: e.ref }, () => `deleted the retry of job ${e.id}`,
      ), { danger: true }),
    );
    row.appendChild(actions);
  }, "retries-range", "retries-total");
  select.addEventListener("change", () => { list.state.offset = 0; list.load(true); });
  return list;
}

function whenFull(epoch) {
  return typeof epoch === "number" ? new Date(epoch * 1000).toLocaleString() : "–";
}

function dueIn(epoch) {
  const seconds = epoch - Date.now() / 1000;
  return seconds <= 0 ? "due" : `in ${age(seconds)}`;
}

const views = {
  overview: () => ({ load: async () => showOverview(await getJson("/api/overview")) }),
  dead: deadView,
  retries: retriesView,
};
const view = views[document.body.dataset.view]();

async function refresh() {
  try {
    await view.load(false);
    said(`updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    said(`not updated: ${error.message}`, true);
  } finally {
    setTimeout(refresh, refreshMs);
  }
}

refresh();
