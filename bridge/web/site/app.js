// The dispatch-bridge field view: a read-only page over the site's retained MQTT topics.
//
// It subscribes to microgrid/<id>/dispatch/# (and microgrid/<id>/actors/#) over
// MQTT-over-WebSockets and shows what the bridge publishes; it computes no schedule
// itself: the timeline comes from the bridge's <type>/upcoming topics. State lives in
// plain objects updated per message; the screen is redrawn at most every RENDER_MS
// (and every second for the time left), and long lists are capped, so 10,000
// dispatches cost one JSON.parse each and never 10,000 DOM rows.
//
// Credentials: from the URL fragment (#broker=ws://...&microgrid=1&username=...&password=...,
// as `dispatch-bridge demo` prints it) or typed into the form; kept in memory only.
"use strict";

(function () {
  const RENDER_MS = 250;
  const MAX_ROWS_PER_TYPE = 25;
  const MAX_NEXT_STARTS = 20;
  const MAX_EVENTS = 100;
  const DEFAULT_STATUS_INTERVAL_S = 5;

  const state = {
    microgrid: null,
    root: "",
    actorsRoot: "",
    connected: false,
    connectedAt: 0,
    status: null,        // the decoded status payload
    statusLiveAt: 0,     // ms: when an online status last arrived live (retain flag 0)
    types: new Map(),    // type -> {dispatches: Map(id -> dispatch), running: snapshot, upcoming: message}
    actors: new Map(),   // actor id -> payload
    events: [],          // newest first: {at, kind, type, id}
    warnings: 0,
  };
  let client = null;
  let renderTimer = null;
  let lastRender = 0;

  const $ = (id) => document.getElementById(id);

  // ---- topics ------------------------------------------------------------------

  function decodeType(level) {
    // The bridge writes every byte outside [A-Za-z0-9_-] of the UTF-8 type as %XX.
    const bytes = [];
    for (let i = 0; i < level.length; i++) {
      if (level[i] === "%") {
        bytes.push(parseInt(level.substr(i + 1, 2), 16));
        i += 2;
      } else {
        bytes.push(level.charCodeAt(i));
      }
    }
    return new TextDecoder("utf-8", { fatal: true }).decode(new Uint8Array(bytes));
  }

  function typeEntry(type) {
    let entry = state.types.get(type);
    if (!entry) {
      entry = { dispatches: new Map(), running: null, upcoming: null };
      state.types.set(type, entry);
    }
    return entry;
  }

  function onMessage(topic, payload, packet) {
    const text = payload.length ? new TextDecoder().decode(payload) : "";
    try {
      if (topic.startsWith(state.actorsRoot)) {
        const actor = topic.slice(state.actorsRoot.length);
        if (text) state.actors.set(actor, JSON.parse(text));
        else state.actors.delete(actor);
        return scheduleRender();
      }
      const levels = topic.slice(state.root.length).split("/");
      if (levels.length === 1 && levels[0] === "status") {
        state.status = text ? JSON.parse(text) : null;
        if (state.status && state.status.state === "online" && !packet.retain) {
          state.statusLiveAt = Date.now();
        }
        return scheduleRender();
      }
      const type = decodeType(levels[0]);
      const kind = levels[1];
      if (kind === "running" && levels.length === 2) {
        typeEntry(type).running = text ? JSON.parse(text) : null;
      } else if (kind === "upcoming" && levels.length === 2) {
        typeEntry(type).upcoming = text ? JSON.parse(text) : null;
      } else if (kind === "dispatches" && levels.length === 3) {
        const id = levels[2];
        if (text) typeEntry(type).dispatches.set(id, JSON.parse(text));
        else if (state.types.has(type)) state.types.get(type).dispatches.delete(id);
      } else if (kind === "events" && levels.length === 2 && text) {
        const event = JSON.parse(text);
        state.events.unshift({
          at: event.as_of, kind: event.event, type: type, id: event.dispatch && event.dispatch.id,
        });
        state.events.length = Math.min(state.events.length, MAX_EVENTS);
      }
    } catch (error) {
      state.warnings += 1;
      console.warn("ignored a message on", topic, error);
    }
    scheduleRender();
  }

  // ---- connection ------------------------------------------------------------------

  function connect(settings) {
    state.microgrid = settings.microgrid;
    state.root = "microgrid/" + settings.microgrid + "/dispatch/";
    state.actorsRoot = "microgrid/" + settings.microgrid + "/actors/";
    $("microgrid-label").textContent = "microgrid " + settings.microgrid;
    $("login").hidden = true;
    $("view").hidden = false;
    setConnection("connecting", "connecting to " + settings.url);
    client = mqtt.connect(settings.url, {
      username: settings.username || undefined,
      password: settings.password || undefined,
      protocolVersion: 4,
      clean: true,
      reconnectPeriod: 2000,
      connectTimeout: 10000,
      clientId: "field-view-" + Math.random().toString(16).slice(2, 10),
    });
    client.on("connect", () => {
      state.connected = true;
      state.connectedAt = Date.now();
      state.statusLiveAt = 0; // a retained status replayed now proves nothing
      setConnection("connected", "connected to " + settings.url);
      client.subscribe([state.root + "#", state.actorsRoot + "#"], { qos: 0 });
      scheduleRender();
    });
    client.on("message", onMessage);
    client.on("close", () => {
      if (state.connected) setConnection("disconnected", "broker connection lost; reconnecting");
      state.connected = false;
      scheduleRender();
    });
    client.on("error", (error) => {
      setConnection("disconnected", "broker: " + error.message);
      if (/not authori[sz]ed|bad user/i.test(error.message)) {
        client.end(true);
        showLogin(settings, "The broker refused these credentials.");
      }
    });
  }

  function setConnection(kind, text) {
    const element = $("connection");
    element.dataset.state = kind;
    element.textContent = text;
  }

  function showLogin(settings, error) {
    $("view").hidden = true;
    $("login").hidden = false;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    $("login-url").value = (settings && settings.url) || scheme + "://" + (location.host || "localhost:9001") + "/";
    $("login-microgrid").value = (settings && settings.microgrid) || 1;
    $("login-username").value = (settings && settings.username) || "";
    $("login-password").value = "";
    $("login-error").textContent = error || "";
  }

  function settingsFromFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    if (!params.get("broker") || !params.get("microgrid")) return null;
    return {
      url: params.get("broker"),
      microgrid: Number(params.get("microgrid")),
      username: params.get("username") || "",
      password: params.get("password") || "",
    };
  }

  // ---- rendering -------------------------------------------------------------------

  function scheduleRender() {
    if (renderTimer !== null) return;
    const wait = Math.max(0, RENDER_MS - (Date.now() - lastRender));
    renderTimer = setTimeout(() => {
      renderTimer = null;
      lastRender = Date.now();
      render();
    }, wait);
  }

  function el(tag, text, className) {
    const element = document.createElement(tag);
    if (text !== undefined && text !== null) element.textContent = String(text);
    if (className) element.className = className;
    return element;
  }

  function formatSpan(ms) {
    if (ms < 0) ms = 0;
    const s = Math.floor(ms / 1000);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const sec = s % 60;
    if (h >= 48) return Math.floor(h / 24) + " d " + (h % 24) + " h";
    if (h > 0) return h + " h " + String(m).padStart(2, "0") + " min";
    if (m > 0) return m + " min " + String(sec).padStart(2, "0") + " s";
    return sec + " s";
  }

  function formatTime(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return date.toLocaleString(undefined, { hour12: false });
  }

  function bridgeVerdict(now) {
    const status = state.status;
    if (!status) return ["unknown", "no status retained yet"];
    if (status.state === "offline") return ["offline", "offline (the bridge stopped, or its connection dropped: its will)"];
    if (status.state === "syncing") return ["syncing", "syncing: " + (status.error || "not vouching for the schedule yet")];
    if (status.state !== "online") return ["unknown", "unknown state " + status.state];
    const interval = (status.status_interval || DEFAULT_STATUS_INTERVAL_S) * 1000;
    // A retained "online" replayed on connect proves nothing until a live one follows.
    if (!state.statusLiveAt) return ["unconfirmed", "online? (retained; waiting for a live status)"];
    if (now - state.statusLiveAt > 2 * interval) return ["stale", "online, but no live status for " + formatSpan(now - state.statusLiveAt)];
    return ["online", "online"];
  }

  function renderStatus(now) {
    const [kind, text] = bridgeVerdict(now);
    const badge = $("bridge-state");
    badge.dataset.state = kind;
    badge.textContent = "bridge: " + text;
    const details = $("status-details");
    details.replaceChildren();
    const status = state.status || {};
    const rows = [
      ["state", status.state || "—"],
      ["bridge", status.bridge ? status.bridge + " " + (status.version || "") : "—"],
      ["Dispatch API", status.upstream || "—"],
      ["last sync", formatTime(status.synced_at)],
      ["knowledge from", formatTime(status.knowledge_at)],
      ["dispatches", status.dispatches !== undefined ? status.dispatches : "—"],
      ["skipped / refused", (status.skipped || 0) + " / " + (status.refused || 0)],
      ["error", status.error || "none"],
      ["session", status.session !== undefined ? status.session : "—"],
    ];
    if (state.warnings) rows.push(["ignored messages", state.warnings]);
    for (const [name, value] of rows) {
      details.append(el("dt", name), el("dd", value));
    }
  }

  function renderRunning(now) {
    const container = $("running");
    container.replaceChildren();
    const types = [...state.types.keys()].sort();
    let any = false;
    for (const type of types) {
      const snapshot = state.types.get(type).running;
      if (!snapshot || !snapshot.running || snapshot.running.length === 0) continue;
      any = true;
      const card = el("div", null, "type-card");
      card.dataset.type = type;
      card.append(el("h3", type + " (" + snapshot.running.length + ")"));
      const list = el("ul", null, "runs");
      for (const dispatch of snapshot.running.slice(0, MAX_ROWS_PER_TYPE)) {
        const item = el("li");
        item.dataset.runningId = String(dispatch.id);
        item.append(el("span", "#" + dispatch.id + " "));
        if (dispatch.until) {
          item.append(el("span", formatSpan(Date.parse(dispatch.until) - now) + " left", "left"));
          item.append(el("span", " until " + formatTime(dispatch.until), "muted"));
        } else {
          item.append(el("span", "no end", "left"));
        }
        const payload = JSON.stringify(dispatch.payload || {});
        if (payload !== "{}") item.append(el("span", " " + payload.slice(0, 80), "muted"));
        list.append(item);
      }
      if (snapshot.running.length > MAX_ROWS_PER_TYPE) {
        list.append(el("li", "+ " + (snapshot.running.length - MAX_ROWS_PER_TYPE) + " more", "muted"));
      }
      card.append(list);
      container.append(card);
    }
    if (!any) container.append(el("p", "Nothing runs now.", "muted"));
  }

  function upcomingRuns(now, horizon) {
    // Every listed run that overlaps [now, now + horizon), per type.
    const rows = [];
    const end = now + horizon;
    for (const [type, entry] of state.types) {
      const message = entry.upcoming;
      if (!message || !message.runs) continue;
      const runs = [];
      for (const run of message.runs) {
        const start = Date.parse(run.start);
        if (start >= end) break; // sorted by start
        const stop = run.end ? Date.parse(run.end) : Infinity;
        if (stop > now) runs.push({ id: run.id, start: start, end: stop });
      }
      if (runs.length) rows.push({ type: type, runs: runs, truncated: !!message.truncated });
    }
    rows.sort((a, b) => (a.type < b.type ? -1 : a.type > b.type ? 1 : 0));
    return rows;
  }

  function renderTimeline(now) {
    const hours = Number($("timeline-hours").value);
    const horizon = hours * 3600 * 1000;
    const rows = upcomingRuns(now, horizon);
    const canvas = $("timeline");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 800;
    const lane = 18;
    const labelWidth = Math.min(180, width / 4);
    const axis = 18;
    const height = axis + Math.max(rows.length, 1) * lane + 4;
    canvas.style.height = height + "px";
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    g.font = "12px system-ui, sans-serif";
    g.textBaseline = "middle";
    const x = (t) => labelWidth + ((t - now) / horizon) * (width - labelWidth - 4);
    // Hour ticks.
    g.fillStyle = "#666";
    g.strokeStyle = "#e3e3e3";
    const step = hours <= 1 ? 10 * 60000 : hours <= 6 ? 3600000 : 3 * 3600000;
    for (let t = Math.ceil(now / step) * step; t < now + horizon; t += step) {
      const px = x(t);
      if (px > width - 40) break; // no room for its label
      g.beginPath();
      g.moveTo(px, axis);
      g.lineTo(px, height);
      g.stroke();
      const label = new Date(t).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });
      g.fillText(label, px + 2, axis / 2);
    }
    if (!rows.length) {
      g.fillText("nothing runs in the next " + hours + " h (from the bridge's upcoming topics)", labelWidth, axis + lane / 2);
    }
    rows.forEach((row, index) => {
      const y = axis + index * lane;
      g.fillStyle = "#111";
      g.fillText((row.truncated ? "… " : "") + row.type, 2, y + lane / 2, labelWidth - 6);
      g.fillStyle = "rgba(45, 108, 223, 0.55)";
      let lastPx = -1;
      for (const run of row.runs) {
        const from = Math.max(x(run.start), labelWidth);
        const to = Math.min(x(Math.min(run.end, now + horizon)), width - 4);
        if (to < lastPx) continue; // fully under an earlier bar at this zoom
        g.fillRect(from, y + 3, Math.max(to - from, 1.5), lane - 6);
        lastPx = to;
      }
    });
    g.strokeStyle = "#b3261e";
    g.beginPath();
    g.moveTo(labelWidth, axis - 2);
    g.lineTo(labelWidth, height);
    g.stroke();
    canvas.dataset.types = String(rows.length);
    canvas.dataset.runs = String(rows.reduce((n, row) => n + row.runs.length, 0));
    renderNextStarts(rows, now);
  }

  function renderNextStarts(rows, now) {
    // The next start of each dispatch (a minutely one would fill the list otherwise).
    const starts = [];
    for (const row of rows) {
      const seen = new Set();
      for (const run of row.runs) {
        if (run.start > now && !seen.has(run.id)) {
          seen.add(run.id);
          starts.push({ type: row.type, run: run });
        }
      }
    }
    starts.sort((a, b) => a.run.start - b.run.start || a.run.id - b.run.id);
    const list = $("next-starts");
    list.replaceChildren();
    for (const { type, run } of starts.slice(0, MAX_NEXT_STARTS)) {
      const item = el("li");
      item.dataset.upcomingId = String(run.id);
      const length = run.end === Infinity ? "no end" : "for " + formatSpan(run.end - run.start);
      item.append(
        el("span", "in " + formatSpan(run.start - now), "left"),
        el("span", " " + type + " #" + run.id + " " + length + " (" + formatTime(new Date(run.start).toISOString()) + ")"),
      );
      list.append(item);
    }
    if (!starts.length) list.append(el("li", "no start in view", "muted"));
  }

  function renderTypes(now) {
    const body = $("types").tBodies[0];
    body.replaceChildren();
    for (const type of [...state.types.keys()].sort()) {
      const entry = state.types.get(type);
      const running = entry.running && entry.running.running ? entry.running.running.length : 0;
      const upcoming = entry.upcoming && entry.upcoming.runs ? entry.upcoming.runs.filter((r) => !r.end || Date.parse(r.end) > now).length : 0;
      const row = el("tr");
      row.append(el("td", type), el("td", entry.dispatches.size, "num"), el("td", running, "num"), el("td", upcoming, "num"));
      body.append(row);
    }
    renderLookup();
  }

  function renderLookup() {
    const wanted = $("lookup").value;
    const result = $("lookup-result");
    if (!wanted) {
      result.textContent = "";
      return;
    }
    for (const entry of state.types.values()) {
      const dispatch = entry.dispatches.get(wanted);
      if (dispatch) {
        result.textContent = JSON.stringify(dispatch, null, 2);
        return;
      }
    }
    result.textContent = "no dispatch #" + wanted + " on the broker";
  }

  function renderActors() {
    const body = $("actors").tBodies[0];
    body.replaceChildren();
    if (!state.actors.size) {
      const row = el("tr");
      const cell = el("td", "no actor reports its status", "muted");
      cell.colSpan = 5;
      row.append(cell);
      body.append(row);
      return;
    }
    for (const [actor, status] of [...state.actors].sort()) {
      const runs = [];
      for (const [type, info] of Object.entries(status.types || {})) {
        runs.push(type + ": " + ((info.dispatches || []).map((id) => "#" + id).join(" ") || info.state || "idle"));
      }
      const row = el("tr", null, status.state === "failed" ? "actor-failed" : "");
      row.dataset.actor = actor;
      row.append(el("td", actor), el("td", status.state), el("td", runs.join("; ")), el("td", formatTime(status.since)), el("td", status.error || ""));
      body.append(row);
    }
  }

  function renderEvents() {
    const list = $("events");
    list.replaceChildren();
    for (const event of state.events) {
      list.append(el("li", formatTime(event.at) + "  " + event.kind + "  " + event.type + " #" + event.id));
    }
    if (!state.events.length) list.append(el("li", "none since the page connected", "muted"));
  }

  function render() {
    const began = performance.now();
    const now = Date.now();
    renderStatus(now);
    renderRunning(now);
    renderTimeline(now);
    renderTypes(now);
    renderActors();
    renderEvents();
    // For the tests (and the curious): when and how long the last redraw took.
    document.body.dataset.rendered = String(now);
    document.body.dataset.renderMs = (performance.now() - began).toFixed(1);
    document.body.dataset.dispatches = String(
      [...state.types.values()].reduce((n, entry) => n + entry.dispatches.size, 0),
    );
  }

  // ---- start -----------------------------------------------------------------------

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    connect({
      url: $("login-url").value.trim(),
      microgrid: Number($("login-microgrid").value),
      username: $("login-username").value,
      password: $("login-password").value,
    });
    $("login-password").value = "";
  });
  $("timeline-hours").addEventListener("change", scheduleRender);
  $("lookup").addEventListener("input", renderLookup);
  setInterval(() => { if (client) scheduleRender(); }, 1000);

  if (typeof mqtt === "undefined") {
    showLogin(null, "The MQTT library (vendor/mqtt.min.js) did not load.");
    return;
  }
  const fromFragment = settingsFromFragment();
  if (fromFragment) connect(fromFragment);
  else showLogin(null, "");
})();
