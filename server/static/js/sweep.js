// The sweep page (templates/sweep.html): while the sweep runs, polls
// GET /api/v1/sweeps/<id> and redraws the counts, the best trial and the trials table
// (laid out as the template lays them out: change both together), and draws two charts
// from the same JSON: the best value so far over time (uPlot) and a parallel-coordinates
// view of the parameters against the metric (SVG). The axes come from the page
// (shared/sweep_space.py axes()). When the sweep's state changes the page reloads, so
// its buttons and facts come from the server.
"use strict";

(function () {
  const page = document.getElementById("sweep-page");
  const dataBlock = document.getElementById("sweep-data");
  if (!page || !dataBlock) return;
  const POLL_MS = 3000;
  const MAX_BACKOFF_MS = 60000;
  const SVG = "http://www.w3.org/2000/svg";
  const { sweep: first, axes } = JSON.parse(dataBlock.textContent);
  const announcer = document.getElementById("sweep-announcer");
  let shownState = first.state;
  let curve = null;
  let lastBest = first.best ? first.best.number : null;

  // ------------------------------------------------------------ formatting

  // Python's "{:.4g}" (server/web/filters.py metric), so a redrawn cell reads as the
  // server-rendered one did.
  function g4(v) {
    if (v === 0) return "0";
    const exp = Math.floor(Math.log10(Math.abs(v)));
    if (exp < -4 || exp >= 4) {
      const [mant, e] = v.toExponential(3).split("e");
      const m = mant.includes(".") ? mant.replace(/0+$/, "").replace(/\.$/, "") : mant;
      const n = Number(e);
      return `${m}e${n < 0 ? "-" : "+"}${String(Math.abs(n)).padStart(2, "0")}`;
    }
    const s = v.toFixed(Math.max(0, 3 - exp));
    return s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s;
  }

  function metric(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v)) return v.toLocaleString("en-US");
    return g4(v);
  }

  // sweep_pages.rate: 12,346 samples/s; small rates to 3 digits.
  function rate(v) {
    if (v === null || v === undefined) return "—";
    return Math.abs(v) >= 100 ? Math.round(v).toLocaleString("en-US") : String(Number(v.toPrecision(3)));
  }

  function param(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : g4(v);
    if (typeof v === "boolean") return v ? "true" : "false";
    return /^[A-Za-z_][A-Za-z0-9_.-]*$/.test(v) ? v : JSON.stringify(v);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const child of children) if (child !== null) node.append(child);
    return node;
  }

  function badge(state) {
    return el("span", { class: `badge state-${state}` }, state);
  }

  // ------------------------------------------------------------ ranking

  function ranked(sweep) {
    const sign = sweep.direction === "max" ? -1 : 1;
    const scored = sweep.trials.filter((t) => t.value !== null);
    scored.sort((a, b) => sign * a.value - sign * b.value || a.number - b.number);
    const rest = sweep.trials.filter((t) => t.value === null).sort((a, b) => a.number - b.number);
    return scored.concat(rest);
  }

  // ------------------------------------------------------------ the page's parts

  function drawCounts(sweep) {
    for (const li of document.querySelectorAll("#sweep-counts [data-count]")) {
      li.querySelector(".count-n").textContent = String(sweep.counts[li.dataset.count] || 0);
    }
  }

  function drawBest(sweep) {
    const box = document.getElementById("sweep-best");
    const b = sweep.best;
    const parts = [el("h2", {}, "Best trial")];
    if (!b) {
      parts.push(el("p", { class: "empty" }, "No trial has finished with a value yet."));
    } else {
      parts.push(el("p", { class: "best-value" },
        el("a", { id: "best-trial-link", href: `/jobs/${b.job_id}` }, `Trial ${b.number} · job #${b.job_id}`),
        " ", el("strong", {}, `${sweep.metric} ${metric(b.value)}`)));
      const params = el("p", { class: "best-params" });
      for (const [path, value] of Object.entries(b.params)) params.append(el("code", {}, `${path}=${param(value)}`), " ");
      parts.push(params);
      if (b.num_parameters !== null || b.samples_per_s !== null) {
        parts.push(el("p", { class: "best-cost" }, `${metric(b.num_parameters)} parameters · ${rate(b.samples_per_s)} samples/s`));
      }
    }
    box.replaceChildren(...parts);
    if (b && b.number !== lastBest && announcer) {
      announcer.textContent = `New best: trial ${b.number}, ${sweep.metric} ${metric(b.value)}`;
    }
    lastBest = b ? b.number : null;
  }

  function drawTable(sweep) {
    const body = document.querySelector("#sweep-trials tbody");
    const rows = ranked(sweep).map((t) => {
      const row = el("tr", { class: `trial-row${sweep.best && t.number === sweep.best.number ? " is-best" : ""}`, "data-trial": t.number, "data-state": t.state },
        el("td", { class: "num" }, String(t.number)),
        el("td", {}, el("a", { href: `/jobs/${t.job_id}` }, `#${t.job_id}`)),
        el("td", {}, badge(t.state)),
        el("td", { class: "num trial-value" }, metric(t.value)));
      for (const axis of axes) row.append(el("td", { class: "param-cell" }, axis.path in t.params ? param(t.params[axis.path]) : ""));
      row.append(el("td", { class: "num" }, metric(t.num_parameters)),
        el("td", { class: "num" }, rate(t.samples_per_s)),
        el("td", { class: "trial-note" }, t.pruned_at_epoch !== null ? `pruned at epoch ${t.pruned_at_epoch}` : ""));
      return row;
    });
    if (!rows.length) {
      rows.push(el("tr", { class: "no-trials" }, el("td", { colspan: String(7 + axes.length), class: "empty" },
        "No trials yet: the controller starts them within a few seconds of the sweep's creation.")));
    }
    body.replaceChildren(...rows);
  }

  // ------------------------------------------------------------ best so far (uPlot)

  function finished(sweep) {
    return sweep.trials
      .filter((t) => t.value !== null && t.finished_at && t.state === "succeeded")
      .map((t) => ({ t, x: Date.parse(t.finished_at) / 1000 }))
      .sort((a, b) => a.x - b.x || a.t.number - b.t.number);
  }

  function empty(box, on) {
    box.classList.toggle("is-empty", on);
    if (on) box.replaceChildren(el("p", { class: "empty" }, box.dataset.empty));
  }

  function drawCurve(sweep) {
    const box = document.getElementById("sweep-best-curve");
    if (!box || typeof uPlot === "undefined") return;
    const points = finished(sweep);
    if (!points.length) {
      if (curve) curve.destroy();
      curve = null;
      empty(box, true);
      return;
    }
    const better = sweep.direction === "max" ? Math.max : Math.min;
    const xs = [];
    const best = [];
    const each = [];
    let so = null;
    for (const { t, x } of points) {
      so = so === null ? t.value : better(so, t.value);
      // Two trials finishing in the same second: one x, the better value.
      if (xs.length && xs[xs.length - 1] === x) {
        best[best.length - 1] = so;
        each[each.length - 1] = better(each[each.length - 1], t.value);
      } else {
        xs.push(x);
        best.push(so);
        each.push(t.value);
      }
    }
    const data = [xs, best, each];
    const width = Math.max(box.clientWidth, 260);
    if (curve) {
      curve.setData(data);
      return;
    }
    box.classList.remove("is-empty");
    box.replaceChildren();
    curve = new uPlot({
      width,
      height: 240,
      scales: { x: { time: true } },
      series: [
        {},
        { label: `best ${sweep.metric}`, stroke: "#1f4e79", width: 2, paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } },
        { label: "trial", stroke: "#8a5a00", paths: () => null, points: { show: true, size: 6, fill: "#f2b01e" } },
      ],
      axes: [{}, { label: sweep.metric, size: 60 }],
    }, data, box);
  }

  // ------------------------------------------------------------ parallel coordinates

  function scaler(axis, values) {
    if (axis.type === "choice") {
      const n = axis.values.length;
      return (v) => {
        const i = axis.values.findIndex((x) => x === v);
        return i < 0 ? null : n === 1 ? 0.5 : i / (n - 1);
      };
    }
    let low = axis.low;
    let high = axis.high;
    for (const v of values) if (typeof v === "number") { low = Math.min(low, v); high = Math.max(high, v); }
    const f = axis.log && low > 0 ? Math.log : (v) => v;
    const a = f(low);
    const span = f(high) - a || 1;
    return (v) => (typeof v === "number" ? (f(v) - a) / span : null);
  }

  function ticks(axis, values) {
    if (axis.type === "choice") return axis.values.map((v) => [v, param(v)]);
    let low = axis.low;
    let high = axis.high;
    for (const v of values) if (typeof v === "number") { low = Math.min(low, v); high = Math.max(high, v); }
    return [[low, param(low)], [high, param(high)]];
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawParallel(sweep) {
    const box = document.getElementById("sweep-parallel");
    if (!box) return;
    const trials = ranked(sweep).filter((t) => t.value !== null && t.state === "succeeded");
    if (!trials.length) {
      empty(box, true);
      return;
    }
    box.classList.remove("is-empty");
    const values = trials.map((t) => t.value);
    const lo = Math.min(...values);
    const hi = Math.max(...values);
    const metricAxis = { path: sweep.metric, type: "number", log: false, low: lo === hi ? lo - 1 : lo, high: lo === hi ? hi + 1 : hi };
    const all = axes.concat([metricAxis]);
    const width = Math.max(box.clientWidth, 120 * all.length);
    const height = 280;
    const top = 36;
    const bottom = 24;
    const side = 60;
    const x = (i) => side + (all.length === 1 ? 0 : (i * (width - 2 * side)) / (all.length - 1));
    const y = (f) => top + (1 - f) * (height - top - bottom);
    const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Parameters against ${sweep.metric}` });
    const get = (t, axis) => (axis === metricAxis ? t.value : t.params[axis.path]);
    const scales = all.map((axis) => scaler(axis, trials.map((t) => get(t, axis))));
    // Worst first, so the best trials' lines are drawn on top; darker is better.
    trials.slice().reverse().forEach((t, k) => {
      const rank = trials.length === 1 ? 1 : k / (trials.length - 1);
      const pts = [];
      all.forEach((axis, i) => {
        if (axis !== metricAxis && !(axis.path in t.params)) return; // not in its sub-space
        const f = scales[i](get(t, axis));
        if (f !== null) pts.push(`${x(i).toFixed(1)},${y(f).toFixed(1)}`);
      });
      const link = svg("a", { href: `/jobs/${t.job_id}` });
      const line = svg("polyline", {
        points: pts.join(" "),
        class: `pc-line${sweep.best && t.number === sweep.best.number ? " is-best" : ""}`,
        stroke: `hsl(209, 60%, ${Math.round(80 - 55 * rank)}%)`,
        "data-trial": t.number,
      });
      line.append(svg("title", {}, `trial ${t.number}: ${sweep.metric} ${metric(t.value)}`));
      link.append(line);
      root.append(link);
    });
    all.forEach((axis, i) => {
      const g = svg("g", { class: `pc-axis${axis === metricAxis ? " pc-metric" : ""}` });
      g.append(svg("line", { x1: x(i), x2: x(i), y1: y(1), y2: y(0) }));
      g.append(svg("text", { x: x(i), y: 14, "text-anchor": "middle", class: "pc-label" }, axis.path));
      for (const [v, label] of ticks(axis, trials.map((t) => get(t, axis)))) {
        const f = scales[i](v);
        if (f === null) continue;
        g.append(svg("text", { x: x(i) + 5, y: y(f) + 4, class: "pc-tick" }, label));
      }
      root.append(g);
    });
    box.replaceChildren(root);
  }

  // ------------------------------------------------------------ live

  function draw(sweep) {
    latest = sweep;
    drawCounts(sweep);
    drawBest(sweep);
    drawTable(sweep);
    drawCurve(sweep);
    drawParallel(sweep);
  }

  async function poll(delay) {
    if (document.hidden) {
      setTimeout(() => poll(delay), POLL_MS);
      return;
    }
    let next = POLL_MS;
    try {
      const response = await fetch(page.dataset.apiUrl, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const sweep = await response.json();
      if (sweep.state !== shownState) {
        window.location.reload(); // its buttons and facts change with the state
        return;
      }
      draw(sweep);
    } catch (err) {
      next = Math.min(delay * 2, MAX_BACKOFF_MS); // a restart of the server, a lost network
    }
    if (shownState === "running") setTimeout(() => poll(next), next);
  }

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  let latest = first;
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => {
      const box = document.getElementById("sweep-best-curve");
      if (curve && box) curve.setSize({ width: Math.max(box.clientWidth, 260), height: 240 });
      drawParallel(latest);
    }, 150);
  });

  draw(first);
  if (shownState === "running") setTimeout(() => poll(POLL_MS), POLL_MS);
})();
