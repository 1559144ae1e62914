// The jobs page (templates/jobs.html): the compare selection, and a light refresh of
// the rows of queued and running jobs. The page works without this file: the compare
// button submits the checked ids, and reloading shows the latest state.
"use strict";

(function () {
  const PAGE_PARAMS = ["state", "kind", "model", "dataset", "tag", "owner", "q", "sort", "cursor"];
  const ACTIVE = new Set(["queued", "running"]);
  const POLL_MS = 5000;
  const MAX_COMPARE = 10;

  // ------------------------------------------------------------ compare selection

  function setUpCompare() {
    const form = document.getElementById("compare-form");
    const button = document.getElementById("compare-selected");
    const count = document.getElementById("compare-count");
    if (!form || !button) return;
    const boxes = () => Array.from(form.querySelectorAll("input.compare-check"));

    function update() {
      const checked = boxes().filter((b) => b.checked);
      for (const box of boxes()) box.closest("tr").classList.toggle("is-selected", box.checked);
      const n = checked.length;
      count.textContent = n ? `(${n})` : "";
      button.disabled = n < 2 || n > MAX_COMPARE;
      button.title = n > MAX_COMPARE ? `Compare at most ${MAX_COMPARE} jobs at once`
        : n < 2 ? "Select two or more jobs to compare" : "";
    }

    form.addEventListener("change", update);
    form.addEventListener("submit", (event) => {
      // One short, shareable URL: /compare?ids=3,5,8 rather than ids=3&ids=5&ids=8.
      event.preventDefault();
      const ids = boxes().filter((b) => b.checked).map((b) => b.value);
      if (ids.length >= 2 && ids.length <= MAX_COMPARE) {
        window.location.assign(`${form.action}?ids=${ids.join(",")}`);
      }
    });
    update();
  }

  // ------------------------------------------------------------ formatting
  // These repeat server/web/filters.py (duration, metric) and server/web/pages.py
  // (progress_text), so a refreshed row reads exactly as a freshly rendered one. The key
  // metric is the API's `key_metric`, picked by the same rule as the page's
  // (shared/metric_catalog.py), so it is not worked out here.

  function duration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds < 0) return "—";
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    let minutes = Math.floor(seconds / 60);
    const secs = Math.floor(seconds) % 60;
    if (minutes < 60) return `${minutes} m ${String(secs).padStart(2, "0")} s`;
    const hours = Math.floor(minutes / 60);
    minutes %= 60;
    return `${hours} h ${String(minutes).padStart(2, "0")} m`;
  }

  function formatMetric(value) {
    if (Number.isInteger(value)) return value.toLocaleString("en-US");
    return Number(value.toPrecision(4)).toString();
  }

  function progressText(job) {
    if (job.cancel_requested && ACTIVE.has(job.state)) return "cancelling";
    if (job.state === "queued") {
      return job.attempt ? `retry ${job.attempt + 1} of ${job.max_attempts}` : "";
    }
    if (job.state !== "running") return "";
    const p = job.progress || {};
    const parts = [];
    if (p.epochs) parts.push(`epoch ${p.epoch || 0}/${p.epochs}`);
    if (typeof p.fraction === "number") parts.push(`${Math.round(p.fraction * 100)}%`);
    if (typeof p.eta_s === "number") parts.push(`ETA ${duration(p.eta_s)}`);
    return parts.map((part) => part.replaceAll(" ", "\u00a0")).join(" · ") || "starting";
  }

  // ------------------------------------------------------------ refresh

  function updateRow(row, job, serverNow) {
    row.dataset.state = job.state;
    const badge = row.querySelector(".job-state");
    badge.className = `badge state-${job.state} job-state`;
    badge.textContent = job.state;

    const progress = row.querySelector(".job-progress");
    const text = progressText(job);
    progress.textContent = text;
    progress.hidden = !text;

    const metric = job.key_metric;
    const metricCell = row.querySelector(".col-metric");
    metricCell.replaceChildren();
    if (metric) {
      const value = document.createElement("span");
      value.className = "metric-value";
      value.textContent = formatMetric(metric.value);
      const name = document.createElement("span");
      name.className = "metric-name";
      name.textContent = metric.key;
      metricCell.append(value, " ", name);
    } else {
      const none = document.createElement("span");
      none.className = "none";
      none.textContent = "—";
      metricCell.append(none);
    }

    const started = job.started_at ? Date.parse(job.started_at) : null;
    const finished = job.finished_at ? Date.parse(job.finished_at) : serverNow;
    row.querySelector(".col-duration").textContent =
      started === null ? "—" : duration((finished - started) / 1000);
  }

  function setUpRefresh() {
    const table = document.getElementById("jobs-table");
    if (!table || !table.dataset.poll) return;
    const status = document.getElementById("jobs-refresh-note");
    const here = new URLSearchParams(window.location.search);
    const params = new URLSearchParams();
    for (const name of PAGE_PARAMS) {
      const value = (here.get(name) || "").trim();
      if (value) params.set(name, value);
    }
    params.set("limit", String(table.tBodies[0].rows.length || 50));
    const url = `/api/v1/jobs?${params}`;
    let timer = null;

    const activeRows = () =>
      Array.from(table.querySelectorAll("tr.job-row")).filter((r) => ACTIVE.has(r.dataset.state));

    async function refresh() {
      timer = null;
      if (document.hidden) return; // resumed by visibilitychange
      let response;
      try {
        response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      } catch (err) {
        schedule();
        return;
      }
      if (response.status === 401) {
        if (status) status.textContent = "refresh stopped: log in again to see changes";
        return;
      }
      if (!response.ok) {
        schedule();
        return;
      }
      const body = await response.json();
      // The server's clock, for running durations: the browser's may be off.
      const date = Date.parse(response.headers.get("Date") || "");
      const serverNow = isNaN(date) ? Date.now() : date;
      const seen = new Set();
      for (const job of body.jobs) {
        seen.add(String(job.id));
        const row = document.getElementById(`job-row-${job.id}`);
        if (row && (ACTIVE.has(row.dataset.state) || row.dataset.state !== job.state)) {
          updateRow(row, job, serverNow);
        }
      }
      // Newer jobs can push a row off the page's window of the list: ask for it alone.
      const missing = activeRows().filter((row) => !seen.has(row.dataset.jobId)).slice(0, 10);
      await Promise.all(missing.map(async (row) => {
        try {
          const one = await fetch(`/api/v1/jobs/${row.dataset.jobId}`, { headers: { Accept: "application/json" }, credentials: "same-origin" });
          if (one.ok) updateRow(row, await one.json(), serverNow);
        } catch (err) {
          // the next round tries again
        }
      }));
      if (activeRows().length) {
        schedule();
      } else if (status) {
        status.textContent = "all jobs on this page have finished";
      }
    }

    function schedule() {
      if (timer === null) timer = window.setTimeout(refresh, POLL_MS);
    }

    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer === null && activeRows().length) refresh();
    });
    schedule();
  }

  setUpCompare();
  setUpRefresh();
})();
