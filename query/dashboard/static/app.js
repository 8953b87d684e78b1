// rmiot dashboard: one page, read from /api as the logged-in user; live by server-sent events.
"use strict";

const $ = (sel) => document.querySelector(sel);
let stream = null;
let me = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const init = Object.assign({ credentials: "same-origin", headers: {} }, options || {});
  if (init.method === "POST") {
    init.headers["X-Rmiot"] = "1";
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) { const e = new Error(body.error || response.statusText); e.status = response.status; throw e; }
  return body;
}

function showLogin(message) {
  if (stream) { stream.close(); stream = null; }
  $("#login").hidden = false; $("#view").replaceChildren(); $("#logout").hidden = true;
  $("#who").textContent = ""; $("#login-error").textContent = message || "";
}

function notice(text) { const n = $("#notice"); n.hidden = !text; n.textContent = text || ""; }

function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits === undefined ? 0 : digits); }
function pct(x) { return x === null || x === undefined ? "–" : (x > 0 ? "+" : "") + x.toFixed(1) + " %"; }
function when(us) { return us ? new Date(us / 1000).toLocaleTimeString() : "–"; }

// -- sections --------------------------------------------------------------------------

function tiles(data) {
  let online = 0, offline = 0, fault = 0, total = 0;
  for (const h of data.tree) { online += h.online; offline += h.offline; fault += h.fault; total += h.total; }
  const ingest = data.ingest || {};
  const tile = (label, value, cls, id) => el("div", { class: "tile" }, el("b", { class: cls, id }, value), label);
  return el("section", { class: "card wide", id: "summary" }, el("h2", {}, "Now"),
    el("div", { class: "tiles" },
      tile("devices", fmt(total), "", "devices-total"), tile("online", fmt(online), "online", "devices-online"),
      tile("offline", fmt(offline), "offline", "devices-offline"), tile("in fault", fmt(fault), "fault", "devices-fault"),
      tile("rows/s stored", fmt(ingest.rate, 1), "", "ingest-rate"),
      tile("batches waiting", fmt(ingest.backlog), "", "ingest-backlog"),
      tile("rows not yet committed", fmt(ingest.pending_rows), "", "ingest-pending")));
}

function tree(data) {
  const rows = [];
  for (const h of data.tree) {
    const name = me.deid ? h.name : el("a", { href: `/hospital/${h.id}` }, h.name);
    rows.push(el("tr", { "data-tenant": h.id }, el("td", {}, name), counts(h)));
    for (const d of h.departments) rows.push(el("tr", { class: "dept", "data-tenant": d.id }, el("td", {}, d.name), counts(d)));
  }
  return el("section", { class: "card", id: "tree" }, el("h2", {}, "Hospitals and departments"),
    el("table", {}, el("tr", {}, el("th", {}, "tenant"), el("th", {}, "total"), el("th", {}, "online"),
      el("th", {}, "offline"), el("th", {}, "fault")), rows));
}

function counts(x) {
  return [el("td", { class: "n" }, x.total), el("td", { class: "n online" }, x.online),
          el("td", { class: "n offline" }, x.offline), el("td", { class: "n fault" }, x.fault)];
}

function alarms(data) {
  const a = data.alarms;
  const card = el("section", { class: "card wide", id: "alarms" }, el("h2", {}, "Active alarms"));
  if (!a.visible) return card.appendChild(el("p", { class: "muted" }, "Not in your role.")), card;
  if (me.deid) {
    card.append(el("table", {}, el("tr", {}, el("th", {}, "tenant"), el("th", {}, "severity"), el("th", {}, "open")),
      a.counts.map((c) => el("tr", {}, el("td", {}, c.tenant), el("td", { class: `sev-${c.severity}` }, c.severity),
        el("td", { class: "n" }, c.count)))));
    return card;
  }
  if (!a.open.length) return card.appendChild(el("p", { class: "muted", id: "no-alarms" }, "No open alarms.")), card;
  card.append(el("table", {}, el("tr", {}, ["raised", "severity", "device", "rule", "message", "state", ""].map((t) => el("th", {}, t))),
    a.open.map((x) => el("tr", { "data-alarm": x.id, "data-state": x.state },
      el("td", {}, when(x.raised_us)), el("td", { class: `sev-${x.severity}` }, x.severity),
      el("td", {}, el("a", { href: `/device/${x.device}` }, x.device)), el("td", {}, x.rule), el("td", {}, x.message),
      el("td", { class: "state" }, x.state + (x.acked_by ? ` (${x.acked_by})` : "")),
      el("td", {}, x.state === "active" ? el("button", { class: "small ack", onclick: () => act(x, "ack") }, "Acknowledge") : null,
        " ", el("button", { class: "small clear", onclick: () => act(x, "clear") }, "Clear"))))));
  return card;
}

async function act(alarm, action) {
  try {
    await api(`/api/alarms/${alarm.id}/${action}`, { method: "POST", body: JSON.stringify({ tenant: alarm.tenant, comment: "from the dashboard" }) });
    notice(""); route();
  } catch (e) { notice(`Could not ${action === "ack" ? "acknowledge" : "clear"} alarm ${alarm.id}: ${e.message}`); }
}

function availability(data) {
  const names = Object.fromEntries(data.tree.map((h) => [h.id, h.name]));
  return el("section", { class: "card", id: "availability" }, el("h2", {}, "Equipment available, by kind"),
    el("table", {}, el("tr", {}, el("th", {}, "hospital"), el("th", {}, "kind"), el("th", {}, "available / total"), el("th", {}, "fault")),
      data.availability.flatMap((h) => h.kinds.map((k, i) => el("tr", {},
        el("td", {}, i === 0 ? names[h.hospital] || h.hospital : ""), el("td", {}, k.kind),
        el("td", { class: "n" + (k.available < k.total / 2 ? " fault" : "") }, `${k.available} / ${k.total}`),
        el("td", { class: "n fault" }, k.fault))))));
}

function energy(data) {
  return el("section", { class: "card", id: "energy" }, el("h2", {}, "Energy this month (kWh)"),
    el("table", {}, el("tr", {}, ["zone", "kWh", "MoM", "YoY"].map((t) => el("th", {}, t))),
      data.energy.map((r) => el("tr", {}, el("td", {}, r.zone), el("td", { class: "n" }, fmt(r.energy, 1)),
        el("td", { class: "n" }, pct(r.mom_pct)), el("td", { class: "n" }, pct(r.yoy_pct))))));
}

function devices(data) {
  const names = {};
  for (const h of data.tree) for (const d of h.departments) names[d.id] = d.name;
  return el("section", { class: "card wide", id: "devices" }, el("h2", {}, "Devices"),
    el("table", {}, el("tr", {}, ["device", "serial", "department", "state", "location"].map((t) => el("th", {}, t))),
      data.devices.map((d) => el("tr", {}, el("td", {}, el("a", { href: `/device/${d.id}` }, d.id)), el("td", {}, d.serial_no),
        el("td", {}, names[d.department_id] || d.department_id || ""), el("td", {}, d.state), el("td", {}, d.location)))));
}

function chart(series) {
  const pts = series.points;
  const w = 600, h = 180, pad = 24;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`); svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img"); svg.setAttribute("aria-label", `${series.name} over the last 15 minutes`);
  if (!pts.length) return svg;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || x0 + 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => pad + (w - 2 * pad) * (x1 === x0 ? 1 : (x - x0) / (x1 - x0));
  const sy = (y) => h - pad - (h - 2 * pad) * (y1 === y0 ? 0.5 : (y - y0) / (y1 - y0));
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
  svg.append(line);
  if (pts.length <= 60) for (const p of pts) {  // few points: show each one
    const dot = document.createElementNS(svg.namespaceURI, "circle");
    dot.setAttribute("cx", sx(p[0]).toFixed(1)); dot.setAttribute("cy", sy(p[1]).toFixed(1));
    dot.setAttribute("r", 2.5); dot.setAttribute("fill", "#58a6ff"); svg.append(dot);
  }
  for (const [y, v] of [[pad - 6, y1], [h - pad + 14, y0]]) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", 2); t.setAttribute("y", y); t.textContent = `${fmt(v, 1)} ${series.unit}`; svg.append(t);
  }
  return svg;
}

// -- pages -----------------------------------------------------------------------------

function renderOverview(data, hospital) {
  const view = $("#view");
  const parts = [tiles(data), alarms(data), tree(data), availability(data), energy(data)];
  if (hospital) parts.splice(1, 0, el("section", { class: "card wide" }, el("h1", { id: "page-title" },
    data.tree.length ? data.tree[0].name : `Hospital ${hospital}`)));
  if (hospital && data.devices && data.devices.length) parts.push(devices(data));
  view.replaceChildren(...parts);
}

function live(path, render) {
  if (stream) stream.close();
  stream = new EventSource(path);
  stream.addEventListener("figures", (e) => { $("#live").classList.add("on"); render(JSON.parse(e.data)); });
  stream.addEventListener("refused", (e) => {
    const body = JSON.parse(e.data); stream.close(); stream = null;
    if (body.status === 401) showLogin("Your session has ended: log in again."); else notFound();
  });
  stream.onerror = () => $("#live").classList.remove("on");
}

function notFound() {
  $("#view").replaceChildren(el("section", { class: "card wide", id: "notfound" }, el("h1", {}, "Not found"),
    el("p", {}, "There is nothing here for you. "), el("a", { href: "/" }, "Back to the overview")));
}

async function renderDevice(id) {
  try {
    const data = await api(`/api/device/${id}`);
    $("#view").replaceChildren(
      el("section", { class: "card wide" }, el("h1", { id: "page-title" }, `Device ${id}`),
        el("table", { id: "latest" }, el("tr", {}, ["metric", "value", "unit", "at"].map((t) => el("th", {}, t))),
          data.latest.map((x) => el("tr", {}, el("td", {}, x.name),
            el("td", { class: "n", "data-metric": x.metric }, fmt(x.value, 2)), el("td", {}, x.unit), el("td", {}, when(x.ts_us)))))),
      ...data.series.slice(0, 6).map((s) => el("section", { class: "card" }, el("h2", {}, `${s.name} (${s.unit})`), chart(s))));
  } catch (e) {
    if (e.status === 401) showLogin(); else notFound();
  }
}

async function route() {
  notice("");
  const path = location.pathname;
  let m;
  if ((m = path.match(/^\/hospital\/(\d+)$/))) live(`/api/events?hospital=${m[1]}`, (d) => renderOverview(d, m[1]));
  else if ((m = path.match(/^\/device\/(\d+)$/))) { if (stream) stream.close(); stream = null; await renderDevice(m[1]); }
  else live("/api/events", (d) => renderOverview(d, 0));
}

async function start() {
  try {
    me = await api("/api/me");
  } catch (e) {
    showLogin(e.status === 403 ? e.message : "");
    return;
  }
  $("#login").hidden = true; $("#logout").hidden = false;
  $("#who").textContent = `${me.subject} · ${me.roles.join(", ") || "no roles"}${me.deid ? " · de-identified regional view" : ""}`;
  await route();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      const reply = await api("/api/login", { method: "POST", body: JSON.stringify(Object.fromEntries(form)) });
      if (reply.password_change_required) { showLogin("Change your password first (AuthService.ChangePassword)."); return; }
      event.target.reset();
      await start();
    } catch (e) { $("#login-error").textContent = e.message; }
  });
  $("#logout").addEventListener("click", async () => { await api("/api/logout", { method: "POST" }).catch(() => {}); showLogin(); });
  start();
});
