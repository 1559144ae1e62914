// The job page (templates/job.html): charts from the server's downsampled series, then
// live updates over Server-Sent Events (server/job_stream.py): state and progress,
// metric points, log lines and timeline entries. The page is complete without this
// script; it only keeps it current. Timeline items built here must match the
// template's `timeline_item` macro.
"use strict";

(() => {
  const root = document.getElementById("job-page");
  if (!root) return;

  const MAX_POINTS = 2000; // per series, in the browser; thinned beyond
  const LOG_MAX_LINES = 5000;
  const REFRESHED = ["job-head", "job-progress", "job-outcome", "job-artifacts"];
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const byId = (id) => document.getElementById(id);

  // ------------------------------------------------------------ formatting
  // The same rules as server/web/filters.py (`metric`, `duration`).

  function formatNumber(value) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "number") return String(value);
    if (!Number.isFinite(value)) return String(value);
    if (Number.isInteger(value) && Math.abs(value) < 1e15) return value.toLocaleString("en-US");
    if (value === 0) return "0";
    const exp = Math.floor(Math.log10(Math.abs(value)));
    if (exp < -4 || exp >= 4) {
      const [mantissa, power] = value.toExponential(3).split("e");
      const sign = power.startsWith("-") ? "-" : "+";
      const digits = power.replace(/^[+-]/, "").padStart(2, "0");
      return `${mantissa.replace(/\.?0+$/, "")}e${sign}${digits}`;
    }
    return value.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) {
      return "—";
    }
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    let minutes = Math.floor(seconds / 60);
    const secs = Math.floor(seconds) % 60;
    if (minutes < 60) return `${minutes} m ${String(secs).padStart(2, "0")} s`;
    const hours = Math.floor(minutes / 60);
    minutes %= 60;
    return `${hours} h ${String(minutes).padStart(2, "0")} m`;
  }

  function setText(id, text) {
    const el = byId(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function announce(text) {
    const el = byId("job-announcer");
    if (el) el.textContent = text;
  }

  // ------------------------------------------------------------ charts

  // Which series share a chart, their labels and whether they run per epoch or per step
  // come from the metric catalogue (shared/metric_catalog.py) in the page's JSON block.
  function readCatalog() {
    const block = byId("metric-catalog");
    try {
      const catalog = block ? JSON.parse(block.textContent) : null;
      if (catalog && Array.isArray(catalog.metrics) && Array.isArray(catalog.charts)) return catalog;
    } catch (err) {
      // a broken block: charts still come, one per key, titled by key
    }
    return { metrics: [], charts: [] };
  }

  const CATALOG = readCatalog();
  const METRICS = new Map(CATALOG.metrics.map((m) => [m.key, m]));
  const labelOf = (key) => (METRICS.has(key) ? METRICS.get(key).label : key);
  // System telemetry mixes units (%, GB, °C, W): its legend says which.
  const legendOf = (key) => {
    const m = METRICS.get(key);
    return m && m.group === "system" && m.unit ? `${m.label} (${m.unit})` : labelOf(key);
  };
  const SERIES_NOTES = { epoch: "per epoch", step: "per step", time: "over running time" };
  // "time" series (worker/telemetry.py) have the job's running time in seconds as step.
  const X_OF = { step: "step", time: "time" };
  const CHARTS = CATALOG.charts.map((c) => ({
    id: `chart-${c.id}`,
    title: c.title,
    note: SERIES_NOTES[c.series] || "",
    keys: c.keys,
    x: X_OF[c.series],
    small: Boolean(c.small),
  }));
  const KNOWN_KEYS = new Set(CHARTS.flatMap((c) => c.keys));
  // Train solid, validation dashed: the line style tells them apart, not only the colour.
  const COLORS = ["#1f5f99", "#c2530a", "#2e7d32", "#7b3fa0", "#8a6d00"];
  const WHOLE_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((p) => m * p))
    .sort((a, b) => a - b);
  const series = new Map(); // key -> {x: [...], y: [...]}
  const charts = new Map(); // chart id -> {plot, keys, box}
  let renderQueued = false;

  function thin(s) {
    if (s.x.length <= MAX_POINTS) return;
    const x = [];
    const y = [];
    for (let i = 0; i < s.x.length; i += 2) {
      x.push(s.x[i]);
      y.push(s.y[i]);
    }
    const last = s.x.length - 1;
    if (last % 2 === 1) {
      x.push(s.x[last]);
      y.push(s.y[last]);
    }
    s.x = x;
    s.y = y;
  }

  function resetSeries(key, data) {
    const s = { x: data.step.slice(), y: data.value.slice() };
    thin(s);
    series.set(key, s);
  }

  function appendSeries(key, data) {
    const s = series.get(key);
    if (!s) {
      resetSeries(key, data);
      return;
    }
    for (let i = 0; i < data.step.length; i++) {
      // Steps only grow; a point at or before the last one is a repeat.
      if (s.x.length && data.step[i] <= s.x[s.x.length - 1]) continue;
      s.x.push(data.step[i]);
      s.y.push(data.value[i]);
    }
    thin(s);
  }

  function chartSpecs() {
    const extra = [...series.keys()].filter((k) => !KNOWN_KEYS.has(k)).sort();
    return CHARTS.concat(extra.map((k) => {
      const kind = METRICS.has(k) ? METRICS.get(k).series : null;
      return { id: `chart-${k.replace(/[^\w-]/g, "_")}`, title: labelOf(k),
        note: SERIES_NOTES[kind] || "", keys: [k], x: X_OF[kind], small: true };
    }));
  }

  function aligned(keys) {
    const xs = new Set();
    for (const k of keys) for (const x of series.get(k).x) xs.add(x);
    const x = [...xs].sort((a, b) => a - b);
    const index = new Map(x.map((v, i) => [v, i]));
    const ys = keys.map((k) => {
      const s = series.get(k);
      const out = new Array(x.length).fill(null);
      s.x.forEach((v, i) => { out[index.get(v)] = s.y[i]; });
      return out;
    });
    return [x, ...ys];
  }

  function describe(spec, keys, data) {
    const last = data[0].length - 1;
    const parts = keys.map((k, i) => {
      let j = last;
      while (j >= 0 && data[i + 1][j] === null) j--;
      const name = labelOf(k);
      const at = spec.x === "time" ? `${formatDuration(data[0][j])} into the run` : `${spec.x || "epoch"} ${data[0][j]}`;
      return j < 0 ? `${name}: no value yet` : `${name} ${formatNumber(data[i + 1][j])} at ${at}`;
    });
    return `${spec.title} chart (${spec.note || "per step"}). Latest: ${parts.join("; ")}.`;
  }

  function chartBox(spec) {
    let box = byId(spec.id);
    if (box) return box;
    box = document.createElement("figure");
    box.className = "chart-box";
    box.id = spec.id;
    const caption = document.createElement("figcaption");
    caption.textContent = `${spec.title} `;
    if (spec.note) {
      const note = document.createElement("span");
      note.className = "chart-note";
      note.textContent = spec.note;
      caption.append(note);
    }
    const target = document.createElement("div");
    target.className = "chart";
    target.setAttribute("role", "img");
    box.append(caption, target);
    byId("charts-grid").append(box);
    return box;
  }

  function plotOptions(spec, keys, width) {
    const xLabel = spec.x || "epoch";
    const xText = spec.x === "time" ? formatDuration : formatNumber;
    return {
      width,
      height: spec.small ? 170 : 230,
      scales: { x: { time: false } },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: xLabel, value: (u, v) => (v === null || v === undefined ? "—" : xText(v)) },
        ...keys.map((k, i) => ({
          label: legendOf(k),
          stroke: COLORS[i % COLORS.length],
          width: 2,
          dash: k.startsWith("val_") ? [6, 4] : undefined,
          spanGaps: true,
          value: (u, v) => (v === null || v === undefined ? "—" : formatNumber(v)),
        })),
      ],
      axes: [
        { stroke: "#5b6670", grid: { stroke: "#eef1f4" }, ticks: { stroke: "#d9dee3" },
          // Epochs and steps are whole numbers: no ticks at 1.5.
          incrs: WHOLE_INCRS, values: (u, splits) => splits.map((v) => xText(v)) },
        { stroke: "#5b6670", grid: { stroke: "#eef1f4" }, ticks: { stroke: "#d9dee3" }, size: 56,
          values: (u, splits) => splits.map((v) => formatNumber(v)) },
      ],
      hooks: {
        // With the pointer away from the chart, the legend shows the latest values.
        setCursor: [(u) => { if (u.cursor.idx === null || u.cursor.idx === undefined) showLatest(u); }],
      },
    };
  }

  function showLatest(u) {
    const n = u.data[0].length;
    if (n) u.setLegend({ idx: n - 1 });
  }

  function renderCharts() {
    renderQueued = false;
    if (typeof window.uPlot !== "function") return;
    let any = false;
    for (const spec of chartSpecs()) {
      const keys = spec.keys.filter((k) => series.has(k) && series.get(k).x.length);
      const existing = charts.get(spec.id);
      if (!keys.length) {
        if (existing) existing.box.hidden = true;
        continue;
      }
      any = true;
      const data = aligned(keys);
      const box = chartBox(spec);
      box.hidden = false;
      const target = box.querySelector(".chart");
      target.setAttribute("aria-label", describe(spec, keys, data));
      if (existing && existing.keys.join() === keys.join()) {
        existing.plot.setData(data);
        showLatest(existing.plot);
        continue;
      }
      if (existing) existing.plot.destroy();
      const width = Math.max(target.clientWidth, 240);
      const plot = new window.uPlot(plotOptions(spec, keys, width), data, target);
      showLatest(plot);
      charts.set(spec.id, { plot, keys, box, small: spec.small });
    }
    const empty = byId("charts-empty");
    if (empty) empty.hidden = any;
  }

  function queueRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(renderCharts);
  }

  if (window.ResizeObserver && byId("charts-grid")) {
    new ResizeObserver(() => {
      for (const chart of charts.values()) {
        const width = chart.box.querySelector(".chart").clientWidth;
        if (width && Math.abs(width - chart.plot.width) > 1) {
          chart.plot.setSize({ width, height: chart.plot.height });
        }
      }
    }).observe(byId("charts-grid"));
  }

  // ------------------------------------------------------------ log

  const logEl = byId("job-log");
  let logLines = logEl ? (logEl.textContent.match(/\n/g) || []).length : 0;

  function atBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 8;
  }

  // Follow new lines until the user scrolls up; scrolling back down follows again.
  let following = true;

  function appendLog(lines) {
    if (!logEl || !lines.length) return;
    logEl.hidden = false;
    const empty = byId("log-empty");
    if (empty) empty.hidden = true;
    logEl.append(document.createTextNode(`${lines.join("\n")}\n`));
    logLines += lines.length;
    // Drop the oldest lines (whole text nodes) past the cap; the full log is a download.
    while (logLines > LOG_MAX_LINES && logEl.firstChild && logEl.firstChild !== logEl.lastChild) {
      logLines -= (logEl.firstChild.textContent.match(/\n/g) || []).length;
      logEl.firstChild.remove();
    }
    if (following) logEl.scrollTop = logEl.scrollHeight;
    else byId("log-jump").hidden = false;
  }

  if (logEl) {
    logEl.scrollTop = logEl.scrollHeight;
    logEl.addEventListener("scroll", () => {
      following = atBottom(logEl);
      if (following) byId("log-jump").hidden = true;
    });
    byId("log-jump").addEventListener("click", () => {
      following = true;
      logEl.scrollTop = logEl.scrollHeight;
      byId("log-jump").hidden = true;
      logEl.focus();
    });
    // A narrower window rewraps the lines; stay at the bottom if following.
    if (window.ResizeObserver) {
      new ResizeObserver(() => { if (following) logEl.scrollTop = logEl.scrollHeight; }).observe(logEl);
    }
  }

  // ------------------------------------------------------------ timeline

  const TONES = { succeeded: "ok", failed: "bad", requeued: "warn", handed_back: "warn",
    republished: "warn", cancel_requested: "warn", cancelled: "warn" };
  const createdAt = Date.parse(root.dataset.createdAt);

  function paragraph(className, ...children) {
    const p = document.createElement("p");
    p.className = className;
    p.append(...children);
    return p;
  }

  function timelineItem(event) {
    const li = document.createElement("li");
    li.className = `tl-item tone-${TONES[event.kind] || "info"}`;
    li.dataset.kind = event.kind;
    li.dataset.eventId = String(event.id);
    const marker = document.createElement("span");
    marker.className = "tl-marker";
    marker.setAttribute("aria-hidden", "true");
    const body = document.createElement("div");
    body.className = "tl-body";
    const label = document.createElement("span");
    label.className = "tl-label";
    label.textContent = event.label;
    const head = paragraph("tl-head", label);
    if (event.attempt) {
      const attempt = document.createElement("span");
      attempt.className = "tl-attempt";
      attempt.textContent = `attempt ${event.attempt}`;
      head.append(" ", attempt);
    }
    const time = document.createElement("time");
    time.dateTime = event.at;
    time.title = `${event.at.slice(0, 19).replace("T", " ")} UTC`;
    time.textContent = event.at.slice(0, 19).replace("T", " ");
    const offset = document.createElement("span");
    offset.className = "tl-offset";
    offset.textContent = `+${formatDuration((Date.parse(event.at) - createdAt) / 1000)}`;
    body.append(head, paragraph("tl-meta", time, " ", offset));
    if (event.worker) {
      const code = document.createElement("code");
      code.textContent = event.worker;
      body.append(paragraph("tl-detail", "on ", code));
    }
    if (event.message) body.append(paragraph("tl-detail", event.message));
    li.append(marker, body);
    return li;
  }

  function appendTimeline(events) {
    const list = byId("timeline-list");
    if (!list) return;
    const follow = atBottom(list);
    for (const event of events) {
      if (list.querySelector(`[data-event-id="${event.id}"]`)) continue;
      list.append(timelineItem(event));
    }
    if (follow) list.scrollTop = list.scrollHeight;
    const last = events[events.length - 1];
    if (last) announce(`Timeline: ${last.label}${last.attempt ? `, attempt ${last.attempt}` : ""}.`);
  }

  // ------------------------------------------------------------ state and progress

  let shown = { state: root.dataset.state, attempt: null, cancel: null };
  let lastEpoch = null;


  // The same text as server/web/filters.py's placement filter.
  function placementText(placement) {
    if (!placement) return "—";
    const parts = placement.slot === null || placement.slot === undefined ? [] : [`slot ${placement.slot}`];
    const gpus = placement.gpus || [];
    if (!gpus.length) parts.push("CPU");
    for (const gpu of gpus) {
      const about = gpu.name ? [gpu.name] : [];
      if (gpu.memory_total_bytes) about.push(`${(gpu.memory_total_bytes / 2 ** 30).toFixed(0)} GiB`);
      parts.push(`GPU ${gpu.index}` + (about.length ? ` (${about.join(", ")})` : ""));
    }
    return parts.join(" · ");
  }

  function onJob(job) {
    root.dataset.state = job.state;
    const badge = byId("job-state");
    if (badge) {
      badge.textContent = job.state;
      badge.className = `badge state-${job.state}`;
    }
    setText("job-attempt", job.attempt ? `${job.attempt} of ${job.max_attempts}` : "not started");
    setText("job-worker", job.worker || "—");
    setText("job-placement", placementText(job.placement));
    const p = job.progress || {};
    const bar = byId("job-progress-bar");
    let fraction = typeof p.fraction === "number" ? p.fraction : null;
    if (job.state === "succeeded") fraction = 1;
    if (bar && fraction !== null) bar.value = Math.min(Math.max(fraction, 0), 1);
    if (root.dataset.kind !== "evaluate" && p.epoch !== undefined) {
      setText("progress-epoch", `${p.epoch} / ${p.epochs}`);
      setText("progress-step", `${formatNumber(p.step)} / ${formatNumber(p.steps_total)}`);
      const live = job.state === "running";
      setText("progress-speed", live && typeof p.samples_per_s === "number"
        ? formatNumber(Math.round(p.samples_per_s)) : "—");
      setText("progress-eta", live ? formatDuration(p.eta_s) : "—");
      if (lastEpoch !== null && p.epoch > lastEpoch) announce(`Epoch ${p.epoch} of ${p.epochs}.`);
      lastEpoch = p.epoch;
    }
    if (fraction !== null) setText("progress-percent", `${Math.floor(fraction * 100)}%`);
    if (job.state === "running") {
      setText("progress-note", job.cancel_requested ? "Cancel requested: stopping at the next step."
        : `Running${job.worker ? ` on ${job.worker}` : ""}.`);
    }

    const changed = job.state !== shown.state
      || (shown.attempt !== null && job.attempt !== shown.attempt)
      || (shown.cancel !== null && job.cancel_requested !== shown.cancel);
    shown = { state: job.state, attempt: job.attempt, cancel: job.cancel_requested };
    if (changed) {
      announce(`Job is now ${job.state}.`);
      refreshSections();
    }
  }

  // The server renders the header, actions, results and artifacts; on a change of
  // state this takes them from a fresh copy of the page rather than rebuilding them.
  let refreshing = null;
  let refreshAgain = false;
  function refreshSections() {
    if (refreshing) {
      refreshAgain = true; // a second change while fetching: fetch once more after
      return;
    }
    refreshing = fetch(root.dataset.pageUrl, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then((resp) => (resp.ok ? resp.text() : Promise.reject(new Error(`HTTP ${resp.status}`))))
      .then((html) => {
        const fresh = new DOMParser().parseFromString(html, "text/html");
        for (const id of REFRESHED) {
          const old = byId(id);
          const next = fresh.getElementById(id);
          if (old && next) old.replaceWith(document.importNode(next, true));
          else if (old) old.remove();
        }
        setStatus(status.kind, status.text);
      })
      .catch(() => { /* the live parts stay current; a reload shows the rest */ })
      .finally(() => {
        refreshing = null;
        if (refreshAgain) {
          refreshAgain = false;
          refreshSections();
        }
      });
  }

  // ------------------------------------------------------------ the stream

  let cursor = {};
  try {
    cursor = JSON.parse(root.dataset.streamCursor || "{}");
  } catch (e) {
    cursor = {};
  }
  cursor.metrics = cursor.metrics || {};
  let source = null;
  let ended = root.dataset.final === "true";
  // A refused stream (too many live job pages open: 429; logged out; a server error) is
  // not retried by EventSource itself. The page waits, longer each time and with jitter
  // so that many refused tabs do not come back in step, and works without live updates.
  const RETRY_FIRST_MS = 5000;
  const RETRY_MAX_MS = 120000;
  let retryDelay = RETRY_FIRST_MS;
  let retryTimer = null;
  let slowTimer = null;
  const status = { kind: ended ? "off" : "connecting", text: ended ? "" : "Connecting…" };

  function setStatus(kind, text) {
    status.kind = kind;
    status.text = text;
    const el = byId("live-status");
    if (!el) return;
    el.dataset.status = kind;
    el.textContent = text;
  }

  function handle(name, fn) {
    source.addEventListener(name, (ev) => {
      if (ev.lastEventId) {
        try {
          cursor = JSON.parse(ev.lastEventId);
        } catch (e) { /* keep the last good one */ }
      }
      retryDelay = RETRY_FIRST_MS;
      fn(JSON.parse(ev.data));
    });
  }

  function connect() {
    if (source || ended) return;
    clearTimeout(retryTimer);
    const url = `${root.dataset.streamUrl}?cursor=${encodeURIComponent(JSON.stringify(cursor))}`;
    source = new EventSource(url);
    source.addEventListener("open", () => {
      clearTimeout(slowTimer);
      setStatus("live", "Live");
    });
    source.addEventListener("error", () => {
      if (!source) return;
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        source = null;
        clearTimeout(slowTimer);
        const wait = Math.round(retryDelay * (0.5 + Math.random()));
        setStatus("error", `Live updates paused; retrying in ${Math.ceil(wait / 1000)} s`);
        clearTimeout(retryTimer);
        retryTimer = setTimeout(connect, wait);
        retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
        return;
      }
      // Each response ends after ~30 s and the browser reconnects at once; only a
      // reconnect that takes a while is worth showing.
      clearTimeout(slowTimer);
      slowTimer = setTimeout(() => setStatus("error", "Reconnecting…"), 4000);
    });
    handle("job", onJob);
    handle("timeline", (data) => appendTimeline(data.events));
    handle("log", (data) => appendLog(data.lines));
    handle("metrics", (data) => {
      for (const [key, s] of Object.entries(data.reset || {})) resetSeries(key, s);
      for (const [key, s] of Object.entries(data.append || {})) appendSeries(key, s);
      queueRender();
    });
    handle("end", (data) => {
      ended = true;
      source.close();
      source = null;
      clearTimeout(slowTimer);
      setStatus("off", "");
      if (data.state && data.state !== shown.state) {
        shown.state = data.state;
        refreshSections();
      }
    });
  }

  function disconnect() {
    if (source) {
      source.close();
      source = null;
    }
  }

  // A background tab does not hold a server thread; it catches up when shown again.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) disconnect();
    else connect();
  });

  async function loadSeries() {
    if (root.dataset.kind !== "train") return;
    try {
      const resp = await fetch(root.dataset.metricsUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const body = await resp.json();
      for (const [key, s] of Object.entries(body.series)) {
        resetSeries(key, s);
        if (s.step.length) cursor.metrics[key] = s.step[s.step.length - 1];
      }
      queueRender();
    } catch (err) {
      // The stream sends whole series for keys the cursor lacks, so charts still fill in.
      const empty = byId("charts-empty");
      if (empty && ended) empty.textContent = `Could not load the metrics (${err.message}); reload to try again.`;
    }
  }

  // ------------------------------------------------------------ actions

  document.addEventListener("submit", (ev) => {
    const form = ev.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) ev.preventDefault();
  });
  document.addEventListener("keydown", (ev) => {
    const menu = byId("action-evaluate");
    if (ev.key === "Escape" && menu && menu.open) {
      menu.open = false;
      menu.querySelector("summary").focus();
    }
  });
  document.addEventListener("click", (ev) => {
    const menu = byId("action-evaluate");
    if (menu && menu.open && !menu.contains(ev.target)) menu.open = false;
  });

  loadSeries().then(() => {
    if (!ended && !document.hidden) connect();
  });
})();
