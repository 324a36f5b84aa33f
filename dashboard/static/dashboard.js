// The dashboard's page: every few seconds, GET /api/overview and show it. Everything shown
// goes in as text (textContent), never as markup, so a job's content cannot become a script.
"use strict";

const refreshMs = Number(document.body.dataset.refreshMs) || 2000;

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

function show(overview) {
  chart(overview.history);
  fill("queues", overview.queues, [
    (q) => q.name, (q) => q.waiting, (q) => q.held, (q) => q.retrying,
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

async function refresh() {
  const status = document.getElementById("status");
  try {
    const answer = await fetch("/api/overview", { credentials: "same-origin", cache: "no-store" });
    if (!answer.ok) throw new Error(`the server answered ${answer.status}`);
    show(await answer.json());
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.classList.remove("stale");
  } catch (error) {
    status.textContent = `not updated: ${error.message}`;
    status.classList.add("stale");
  } finally {
    setTimeout(refresh, refreshMs);
  }
}

refresh();
