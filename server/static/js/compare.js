// The compare page (templates/compare.html): one metric of every job, overlaid in a
// uPlot chart. The series come from GET /api/v1/jobs/<id>/metrics (downsampled on the
// server), each metric's label and series kind from the metric catalogue in the page
// (shared/metric_catalog.py); the page's tables are server-rendered and need none of this.
"use strict";

(function () {
  const MAX_POINTS = 2000;
  const DASHED_FROM = 5; // lines 6-10 are dashed, so they differ by more than colour

  const chartEl = document.getElementById("compare-chart");
  const status = document.getElementById("compare-chart-status");
  if (!chartEl || typeof uPlot === "undefined") return;

  const jobs = Array.from(document.querySelectorAll("#compare-jobs .compare-job")).map((li) => {
    const swatch = li.querySelector(".swatch");
    return {
      id: li.dataset.jobId,
      label: li.dataset.label,
      series: Number(li.dataset.series),
      color: swatch ? getComputedStyle(swatch).backgroundColor : "#1f4e79",
    };
  });
  const METRICS = (() => {
    const block = document.getElementById("metric-catalog");
    try {
      return new Map(JSON.parse(block.textContent).metrics.map((m) => [m.key, m]));
    } catch (err) {
      return new Map(); // labels fall back to the keys, the x axis to the data
    }
  })();
  const select = document.getElementById("compare-metric");
  const showButton = document.getElementById("compare-metric-show");
  let chart = null;
  let request = 0;

  function say(text, isError) {
    status.textContent = text;
    status.classList.toggle("is-error", Boolean(isError));
  }

  async function fetchSeries(job, metric) {
    const url = `/api/v1/jobs/${job.id}/metrics?keys=${encodeURIComponent(metric)}&max_points=${MAX_POINTS}`;
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (!response.ok) throw new Error(`job ${job.id}: HTTP ${response.status}`);
    const body = await response.json();
    return body.series[metric] || { step: [], epoch: [], value: [] };
  }

  // [xs, ys] ascending in x, one value per x (a resumed attempt may repeat a step: the
  // later point wins, as it does in the job's own chart).
  function table(series) {
    const byX = new Map();
    series.step.forEach((x, i) => byX.set(x, series.value[i]));
    const sorted = Array.from(byX.keys()).sort((a, b) => a - b);
    return [sorted, sorted.map((x) => byX.get(x))];
  }

  function chartSize() {
    const width = Math.max(chartEl.clientWidth, 240);
    return { width, height: width < 500 ? 240 : 320 };
  }

  function draw(metric, all) {
    const known = METRICS.get(metric);
    // Per-epoch metrics are logged at step = epoch: call the axis what it is. A key the
    // catalogue does not know says it by its points.
    const perEpoch = known && known.series !== "final" ? known.series === "epoch"
      : all.every((s) => s.step.every((step, i) => step === s.epoch[i]));
    // System telemetry's step is the job's running time in seconds (worker/telemetry.py).
    const xLabel = known && known.series === "time" ? "seconds running" : perEpoch ? "epoch" : "step";
    const data = uPlot.join(all.map(table));
    const opts = {
      ...chartSize(),
      scales: { x: { time: false } },
      axes: [{ label: xLabel }, { label: known ? known.label : metric, size: 60 }],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: xLabel },
        ...jobs.map((job, i) => ({
          label: job.label,
          stroke: job.color,
          width: 2,
          dash: job.series >= DASHED_FROM ? [8, 5] : undefined,
          spanGaps: true,
          points: { show: all[i].step.length <= 60 },
          value: (u, v) => (v === null || v === undefined ? "—" : Number(v.toPrecision(4)).toString()),
        })),
      ],
    };
    if (chart) chart.destroy();
    chartEl.replaceChildren();
    chart = new uPlot(opts, data, chartEl);
  }

  async function load(metric) {
    const mine = ++request;
    say(`Loading ${metric}…`);
    let all;
    try {
      all = await Promise.all(jobs.map((job) => fetchSeries(job, metric)));
    } catch (err) {
      if (mine === request) say(`Could not load the curves (${err.message}). Reload the page to try again.`, true);
      return;
    }
    if (mine !== request) return; // a newer choice is loading
    const empty = jobs.filter((job, i) => all[i].value.length === 0);
    if (empty.length === jobs.length) {
      if (chart) chart.destroy();
      chart = null;
      chartEl.replaceChildren();
      say(`None of these jobs has logged ${metric}.`);
      return;
    }
    draw(metric, all);
    const longest = Math.max(...all.map((s) => s.value.length));
    const notes = [];
    if (empty.length) notes.push(`No ${metric} for ${empty.map((j) => j.label).join(", ")}.`);
    if (longest >= MAX_POINTS) notes.push(`Long series are downsampled to ${MAX_POINTS.toLocaleString("en-US")} points.`);
    notes.push("Drag across the chart to zoom; double-click to reset.");
    say(notes.join(" "));
  }

  if (select) {
    if (showButton) showButton.hidden = true; // the select acts at once
    select.addEventListener("change", () => {
      const metric = select.value;
      chartEl.dataset.metric = metric;
      chartEl.setAttribute("aria-label", `Line chart of ${metric} for ${jobs.length} jobs; the final values are in the Final metrics table below`);
      const url = new URL(window.location.href);
      url.searchParams.set("metric", metric);
      // Commas left readable: ?ids=3,5,8 as the server writes it.
      window.history.replaceState(null, "", url.toString().replace(/%2C/gi, ","));
      load(metric);
    });
  }

  let resizeTimer = null;
  new ResizeObserver(() => {
    if (!chart) return;
    window.clearTimeout(resizeTimer);
    resizeTimer = window.setTimeout(() => chart && chart.setSize(chartSize()), 100);
  }).observe(chartEl);

  load(chartEl.dataset.metric);
})();
