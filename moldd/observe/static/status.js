// moldd live status page: GET /v1/status (every VM, a page at a time), then the log over Server-Sent Events
// (/v1/events/sse). Every log entry is added to the timeline as it is committed, carries the VM view it produced,
// and triggers a (debounced) re-read of /v1/status without VMs (clusters, hosts, jobs), so a VM's state changes
// on the page without a reload. No framework, no build step.
"use strict";

const TIMELINE_MAX = 300;
const HISTORY = 100; // log entries shown from before the page was opened
const byCommand = new Map(); // command id -> log position of its *.requested entry
let lastPosition = 0;
let source = null;
let refreshTimer = null;
let refreshing = false;
let refreshAgain = false;
let refreshFull = false; // the next refresh reads every VM again (the periodic safety net)

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function tone(value) {
  const v = String(value || "");
  if (["Running", "Up", "connected", "on", "succeeded", "Created"].includes(v)) return "ok";
  if (["Error", "FenceFailed", "Down", "disconnected", "failed", "Unknown", "gave_up"].includes(v)) return "bad";
  if (["Starting", "Stopping", "Migrating", "Creating", "Destroying", "Expunging", "Fencing", "pending",
       "running", "restarting"].includes(v)) return "busy";
  if (["Suspect", "Fenced", "Stopped", "off", "paused"].includes(v)) return "warn";
  return "muted";
}

function badge(value) {
  return el("span", { class: "badge " + tone(value), "data-value": value ?? "" }, value ?? "–");
}

function td(label, ...children) {
  return el("td", { "data-label": label }, ...children);
}

function fillBody(table, rows) {
  const body = document.querySelector(`#${table} tbody`);
  body.replaceChildren(...rows);
}

function percentOf(progress) {
  if (!progress || typeof progress.percent !== "number") return null;
  return Math.max(0, Math.min(100, progress.percent));
}

function renderJobs(all) {
  const list = document.getElementById("jobs");
  const active = all.filter((j) => j.status === "pending" || j.status === "running");
  const done = all.filter((j) => !(j.status === "pending" || j.status === "running"))
    .sort((a, b) => b.position - a.position).slice(0, 10);
  const items = [...active, ...done].map((j) => {
    const pct = percentOf(j.progress);
    const label = `${j.command} ${j.vm || ""}`.trim();
    const active = j.status === "pending" || j.status === "running";
    return el("li", { id: `job-${j.id}`, "data-job": j.id, "data-status": j.status },
      el("div", {}, el("strong", {}, label), " ", badge(j.status), j.state ? " " : null,
         j.state ? el("span", { class: "muted" }, `VM ${j.state}`) : null,
         " ", el("a", { href: `#ev-${j.position}`, title: "the request that started this job" }, `#${j.position}`)),
      active && pct !== null
        ? el("progress", { max: "100", value: String(pct), "aria-label": `${label}: ${pct}%` }, `${pct}%`)
        : null,
      active && pct !== null ? el("span", { class: "muted" }, ` ${pct.toFixed(1)} %`) : null,
      j.error ? el("div", { class: "bad" }, j.error.message || j.error.code) : null);
  });
  if (!items.length) items.push(el("li", { class: "muted" }, "No jobs yet."));
  list.replaceChildren(...items);
}

// What the page shows: the newest known view of each VM / host / job, with the log position it is from.
// A view from a live entry (the state right after that entry) and one from /v1/status (the state at
// doc.position) are merged by position, so an older reply never overwrites a newer state.
const vms = new Map();
const hosts = new Map();
const jobs = new Map();
let clusters = [];
let alerts = [];
let statusPosition = 0;

function merge(map, key, data, position) {
  const have = map.get(key);
  if (!have || have.position <= position) map.set(key, { data, position });
}

function vmRow(v) {
  return el("tr", { id: `vm-${v.name}`, "data-vm": v.name },
    td("VM", el("strong", {}, v.name),
       v.display_name && v.display_name !== v.name ? el("div", { class: "muted" }, v.display_name) : null),
    td("State", el("span", { "data-field": "state" }, badge(v.state))),
    td("Power", el("span", { "data-field": "power_state" }, badge(v.power_state))),
    td("Host", v.host || "–"),
    td("HA", v.ha_enabled ? el("span", { "data-field": "ha" }, badge(v.ha_status || "on"), ` ${v.ha_policy}`)
                          : el("span", { class: "muted", "data-field": "ha" }, "off")),
    td("Last cause", el("span", { class: "muted" }, v.error || v.stop_cause || "–")));
}

function hostRow(h) {
  return el("tr", { id: `host-${h.name}`, "data-host": h.name },
    td("Host", el("strong", {}, h.name)),
    td("Cluster", h.cluster),
    td("Health", el("span", { "data-field": "health" }, badge(h.health)),
       h.health_cause ? el("div", { class: "muted" }, h.health_cause) : null),
    td("Link", el("span", { "data-field": "link" }, badge(h.link))),
    td("VMs (running)", `${h.vms} (${h.running}) of ${h.max_vms}`));
}

function replaceRow(table, id, row) {
  const old = document.getElementById(id);
  if (old) { old.replaceWith(row); return; }
  const body = document.querySelector(`#${table} tbody`);
  const empty = body.querySelector("tr.empty");
  if (empty) empty.remove();
  body.append(row);
}

function renderSummary() {
  const hs = [...hosts.values()].map((x) => x.data);
  const vs = [...vms.values()].map((x) => x.data);
  const js = [...jobs.values()].map((x) => x.data);
  const upHosts = hs.filter((h) => h.health === "Up" && h.link === "connected").length;
  const running = vs.filter((v) => v.state === "Running").length;
  const active = js.filter((j) => j.status === "pending" || j.status === "running").length;
  document.getElementById("summary").textContent =
    `${upHosts}/${hs.length} hosts up · ${running}/${vs.length} VMs running · ` +
    `${active} jobs in progress · log position ${Math.max(lastPosition, statusPosition)}`;
}

// Host VM counts and cluster headroom follow the VM rows at once (the same rule as the daemon's: a VM holds
// a slot on its host unless Destroyed or Expunged); the cluster's limit comes from the daemon (configuration).
function renderHostsAndClusters() {
  const placed = new Map();
  const running = new Map();
  for (const { data: v } of vms.values()) {
    if (!v.host || v.state === "Destroyed" || v.state === "Expunged") continue;
    placed.set(v.host, (placed.get(v.host) || 0) + 1);
    if (v.state === "Running") running.set(v.host, (running.get(v.host) || 0) + 1);
  }
  const hs = [...hosts.values()].map((x) => ({ ...x.data, vms: placed.get(x.data.name) || 0,
                                                running: running.get(x.data.name) || 0 }));
  fillBody("hosts", hs.map(hostRow));
  fillBody("clusters", clusters.map((c) => {
    const members = hs.filter((h) => h.cluster === c.cluster);
    const used = members.length ? members.reduce((n, h) => n + h.vms, 0) : c.used;
    const up = members.filter((h) => h.health === "Up" && h.link === "connected").length;
    return el("tr", { "data-cluster": c.cluster },
      td("Cluster", c.cluster),
      td("Hosts up", `${members.length ? up : c.hosts_up ?? "?"}/${c.hosts ?? "?"}`),
      td("Used / limit", `${used}/${c.limit}`),
      td("Headroom", el("span", { "data-field": "headroom" }, badge(String(c.limit - used)))));
  }));
}

function renderAll() {
  document.getElementById("alerts-section").hidden = alerts.length === 0;
  document.getElementById("alerts").replaceChildren(...alerts.map((a) => el("li", {}, a)));
  renderHostsAndClusters();
  const vmRows = [...vms.values()].map((x) => vmRow(x.data));
  if (!vmRows.length) vmRows.push(el("tr", { class: "empty" }, el("td", { colspan: "6", class: "muted" }, "No VMs.")));
  fillBody("vms", vmRows);
  renderJobs([...jobs.values()].map((x) => x.data));
  renderSummary();
}

// doc.vms holds every VM when allVms is true (all pages were read; VMs missing from it are gone),
// else none (a refresh of clusters, hosts and jobs: the VM rows are kept live by the event stream).
function render(doc, allVms) {
  statusPosition = Math.max(statusPosition, doc.position);
  alerts = (doc.health && doc.health.alerts) || [];
  clusters = doc.clusters;
  const seen = { vms: new Set(), hosts: new Set(), jobs: new Set() };
  for (const v of doc.vms) { merge(vms, v.name, v, v.position_read || doc.position); seen.vms.add(v.name); }
  for (const h of doc.hosts) { merge(hosts, h.name, h, doc.position); seen.hosts.add(h.name); }
  for (const j of doc.jobs) { merge(jobs, j.id, j, doc.position); seen.jobs.add(j.id); }
  const pruned = allVms ? [[vms, seen.vms], [hosts, seen.hosts], [jobs, seen.jobs]]
                        : [[hosts, seen.hosts], [jobs, seen.jobs]];
  for (const [map, names] of pruned) {
    for (const [k, x] of map) if (!names.has(k) && x.position <= doc.firstPosition) map.delete(k);
  }
  renderAll();
  if (!source) follow(Math.max(1, doc.position - HISTORY + 1));
}

async function getStatus(page, pagesize) {
  const resp = await fetch(`/v1/status?page=${page}&pagesize=${pagesize}`,
                           { cache: "no-store", headers: { Accept: "application/json" } });
  const body = await resp.json();
  if (!body.ok) throw new Error(body.error ? body.error.message : `HTTP ${resp.status}`);
  return body.result;
}

// /v1/status a page of VMs at a time (each page a short request for the daemon), merged into one document;
// each VM keeps the position of the page it came from.
// If the number of VMs changed meanwhile (pages shifted: a VM could be missed or read twice), read again.
const PAGE = 1000;
async function getFullStatus() {
  for (let attempt = 0; ; attempt++) {
    const doc = await getStatus(1, PAGE);
    doc.firstPosition = doc.position;
    for (const v of doc.vms) v.position_read = doc.position;
    let shifted = false;
    for (let page = 2; (page - 1) * PAGE < doc.vm_count; page++) {
      const more = await getStatus(page, PAGE);
      if (more.vm_count !== doc.vm_count) { shifted = true; break; }
      for (const v of more.vms) { v.position_read = more.position; doc.vms.push(v); }
      if (!more.vms.length) break;
    }
    doc.partial = shifted; // still shifting after 3 reads: merge what was read, prune nothing
    if (!shifted || attempt >= 3) return doc;
  }
}

function applyViews(data) {
  const pos = data.entry.position;
  if (data.vm) {
    const v = data.vm;
    const have = vms.get(v.name);
    if (!have || have.position <= pos) {
      if (v.state === "Expunged") { vms.delete(v.name); document.getElementById(`vm-${v.name}`)?.remove(); }
      else { vms.set(v.name, { data: v, position: pos }); replaceRow("vms", `vm-${v.name}`, vmRow(v)); }
    }
  }
  if (data.host) {
    const h = data.host;
    const have = hosts.get(h.name);
    if (!have || have.position <= pos) hosts.set(h.name, { data: h, position: pos });
  }
  if (data.vm || data.host) renderHostsAndClusters();
  if (data.job) {
    const have = jobs.get(data.job.id);
    if (!have || have.position <= pos) { jobs.set(data.job.id, { data: data.job, position: pos }); renderJobs([...jobs.values()].map((x) => x.data)); }
  }
  renderSummary();
}

async function refresh() {
  if (refreshing) { refreshAgain = true; return; }
  refreshing = true;
  try {
    do {
      refreshAgain = false;
      const full = refreshFull || !statusPosition;
      refreshFull = false;
      if (full) { const doc = await getFullStatus(); render(doc, !doc.partial); }
      else {
        const doc = await getStatus(1, 0);
        doc.firstPosition = doc.position;
        render(doc, false);
      }
    } while (refreshAgain);
  } catch (err) {
    document.getElementById("summary").textContent = `Could not read /v1/status: ${err.message}`;
  } finally {
    refreshing = false;
  }
}

function scheduleRefresh() {
  // clusters' headroom and host counts are recomputed by the daemon; VM/host/job rows are already live
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 1000);
}

const SHOWN = ["host", "to", "from", "cause", "trigger", "state", "power_state", "event", "detail", "reason",
               "kind", "attempt", "delay_s", "stop_cause", "target", "dest", "error", "message"];

function describe(entry) {
  const p = entry.payload || {};
  const parts = [];
  if (p.progress && typeof p.progress.percent === "number") parts.push(`${p.progress.percent.toFixed(1)} %`);
  for (const k of SHOWN) {
    const v = p[k];
    if (v === undefined || v === null || v === "") continue;
    parts.push(`${k}=${typeof v === "object" ? (v.message || JSON.stringify(v)) : v}`);
  }
  return parts.join(" · ");
}

function causeLinks(entry) {
  const p = entry.payload || {};
  const links = [];
  if (Number.isInteger(p.trigger_position)) {
    links.push(el("a", { href: `#ev-${p.trigger_position}`, class: "cause", "data-cause": p.trigger_position },
      `cause #${p.trigger_position}`));
  }
  const cmd = entry.causation_id && entry.causation_id !== entry.command_id ? entry.causation_id : null;
  if (cmd) {
    const pos = byCommand.get(cmd);
    links.push(pos ? el("a", { href: `#ev-${pos}`, class: "cause", "data-cause": pos }, `command #${pos}`)
                   : el("span", { class: "muted" }, `command ${cmd.slice(0, 12)}`));
  }
  if (entry.correlation_id && entry.correlation_id !== cmd) {
    links.push(el("a", { href: `#job-${entry.correlation_id}` }, `job ${entry.correlation_id.slice(0, 8)}`));
  }
  return links;
}

function addEntry(entry) {
  if (entry.position <= lastPosition) return;
  lastPosition = entry.position;
  if (entry.command_id) byCommand.set(entry.command_id, entry.position);
  const t = entry.event_type;
  const subject = entry.stream_id.replace(/^(vm|host|group|cluster)-/, "");
  const time = new Date(entry.recorded_at);
  const cls = ["entry", t.startsWith("ha.") ? "ha" : "", /failed|gave_up|FenceFailed/.test(t) ? "fail" : ""];
  const links = causeLinks(entry);
  const li = el("li", { id: `ev-${entry.position}`, class: cls.join(" ").trim(), "data-type": t,
                        "data-stream": entry.stream_id },
    el("span", { class: "pos" }, `#${entry.position}`),
    el("time", { class: "time muted", datetime: entry.recorded_at }, time.toLocaleTimeString()),
    el("span", { class: "type" }, `${t} `, el("span", { class: "muted" }, subject)),
    el("span", { class: "detail" }, describe(entry), ...links.flatMap((a) => [" ", a])));
  const list = document.getElementById("timeline");
  list.prepend(li);
  while (list.children.length > TIMELINE_MAX) list.lastElementChild.remove();
  if (t.endsWith(".progress") && entry.correlation_id) {
    const job = document.querySelector(`#job-${CSS.escape(entry.correlation_id)} progress`);
    const pct = percentOf(entry.payload.progress);
    if (job && pct !== null) job.value = pct;
  }
}

function setConn(state, text) {
  const c = document.getElementById("conn");
  c.dataset.state = state;
  c.textContent = text;
}

function follow(from) {
  source = new EventSource(`/v1/events/sse?from=${from}`);
  source.addEventListener("open", () => setConn("live", "live"));
  source.addEventListener("entry", (msg) => {
    const data = JSON.parse(msg.data);
    addEntry(data.entry);
    applyViews(data);
    scheduleRefresh();
  });
  source.addEventListener("error", () => {
    // EventSource reconnects by itself and resumes after Last-Event-ID: no entry is lost or doubled
    setConn(source.readyState === EventSource.CLOSED ? "lost" : "connecting",
            source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting…");
    if (source.readyState === EventSource.CLOSED) {
      source = null;
      setTimeout(() => follow(lastPosition + 1), 2000);
    }
  });
}

refresh();
// a safety net, every VM read again; the live stream already refreshes clusters, hosts and jobs on every entry
setInterval(() => { refreshFull = true; refresh(); }, 15000);
