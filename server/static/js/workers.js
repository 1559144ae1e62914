// The workers and queues page: refreshes the server-rendered sections every few seconds
// from GET /api/v1/workers and /api/v1/queues, and pauses while the tab is hidden.
// The markup built here mirrors templates/workers.html: change both together.
// Everything from the API goes in through textContent, never as HTML.
(() => {
  "use strict";

  const page = document.getElementById("workers-page");
  if (!page) return;

  const isAdmin = page.dataset.admin === "true";
  const refreshMs = Math.max(1, Number(page.dataset.refreshS) || 5) * 1000;
  const urls = { workers: page.dataset.workersUrl, queues: page.dataset.queuesUrl };
  let timer = null;
  let inFlight = false;
  let stopped = false;

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

  // The same wording as the `duration` filter (server/web/filters.py).
  function duration(seconds) {
    if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) {
      return "—";
    }
    if (seconds < 10) return `${seconds.toFixed(1)} s`;
    if (seconds < 60) return `${Math.round(seconds)} s`;
    const total = Math.floor(seconds);
    const minutes = Math.floor(total / 60);
    if (minutes < 60) return `${minutes} m ${String(total % 60).padStart(2, "0")} s`;
    return `${Math.floor(minutes / 60)} h ${String(minutes % 60).padStart(2, "0")} m`;
  }

  function secondsSince(stamp, now) {
    if (!stamp) return null;
    return Math.max((now - Date.parse(stamp)) / 1000, 0);
  }

  function jobLink(job) {
    return [
      h("a", { className: "job-link", href: `/jobs/${job.id}`, text: job.name || "(unnamed)" }),
      " ",
      h("span", { className: "job-id", text: `#${job.id}` }),
    ];
  }

  const queueChip = (name) => h("span", { className: "queue-chip", text: name });

  // ------------------------------------------------------------------ sections

  function summaryText(workers, queues) {
    const waiting = `${plural(queues.waiting_total, "job")} ${isAdmin ? "waiting" : "of yours waiting"}`;
    if (workers.broker_error) return `Worker status unknown · ${waiting}`;
    return `${plural(workers.online_slots, "slot")} online, ${workers.busy_slots} busy · ${waiting}`;
  }

  function queueNote(q) {
    if (q.slots === null) return "Worker status unknown";
    if (q.slots === 0) return "No worker consumes this queue";
    if (q.slots === 1) return `Its only slot is ${q.busy_slots ? "busy" : "free"}`;
    if (q.busy_slots >= q.slots) return `All ${q.slots} slots busy`;
    return `${q.slots - q.busy_slots} of ${q.slots} slots free`;
  }

  function stat(label, className, value) {
    return h("div", {}, h("dt", { text: label }), h("dd", { className, text: String(value) }));
  }

  function queueCard(q) {
    return h(
      "article",
      { className: `queue-card${q.slots === 0 ? " queue-unserved" : ""}`, "data-queue": q.name },
      h("h3", { className: "queue-name" }, `${q.name} `, h("span", { className: "queue-label", text: "queue" })),
      h(
        "dl",
        { className: "queue-stats" },
        stat("Queued", "queue-queued", q.queued_jobs),
        stat("Running", "queue-running", q.running_jobs),
        stat("Slots busy", "queue-slots", q.slots === null ? "?" : `${q.busy_slots} / ${q.slots}`),
        stat("In Redis", "queue-messages", q.messages === null ? "?" : q.messages),
      ),
      h("p", { className: "queue-note", text: queueNote(q) }),
    );
  }

  function waitingRow(job) {
    let meta = job.kind;
    if (job.model) meta += ` · ${job.model}`;
    if (job.dataset) meta += ` on ${job.dataset}`;
    if (job.attempt) meta += ` · attempt ${job.attempt + 1}`;
    return h(
      "tr",
      { "data-job-id": job.id },
      h("td", { "data-label": "Job" }, jobLink(job), " ", h("span", { className: "job-meta", text: meta })),
      h("td", { "data-label": "Queue" }, queueChip(job.queue)),
      isAdmin ? h("td", { "data-label": "Owner", text: job.owner || "—" }) : null,
      h("td", { "data-label": "Waiting", text: duration(job.waiting_s) }),
      h("td", { "data-label": "Position", className: "num", text: String(job.position) }),
      h("td", {
        "data-label": "Priority",
        className: "num",
        title: `priority ${job.priority} plus aging`,
        text: job.effective_priority.toFixed(2),
      }),
      h(
        "td",
        { "data-label": "Why it waits" },
        h("span", { className: `reason reason-${job.reason_code}`, text: job.reason }),
      ),
    );
  }

  function gpuText(node) {
    if (node.gpus === 0) return "CPU only";
    if (new Set(node.gpu_names).size === 1) return `${node.gpus} × ${node.gpu_names[0]}`;
    return node.gpu_names.join(", ");
  }

  function slotJobCell(slot) {
    const cell = h("td", { "data-label": "Current job" });
    const job = slot.job;
    if (job) {
      cell.append(...jobLink(job));
      if (job.progress !== null) {
        const bar = h("progress", { max: "1", value: String(job.progress), "aria-label": `Progress of job ${job.id}` });
        cell.append(" ", h("span", { className: "slot-progress" }, bar, ` ${Math.round(job.progress * 100)}%`));
      }
      if (isAdmin && job.owner) cell.append(" ", h("span", { className: "job-meta", text: `by ${job.owner}` }));
    } else if (slot.busy) {
      cell.append(
        h("span", { className: "slot-state slot-busy", text: "busy" }),
        " ",
        h("span", { className: "job-meta", text: "another user's job" }),
      );
    } else {
      cell.append(h("span", { className: "slot-state slot-idle", text: "idle" }));
    }
    if (slot.stopped) cell.append(" ", h("span", { className: "slot-stopped", text: slot.stopped }));
    return cell;
  }

  // Which of the host's GPUs a slot's cuda:0.. are (worker/slots.py pins each slot).
  function deviceText(slot) {
    const gpus = (slot.gpus || []).map((g) => g.index);
    return gpus.length ? `${slot.device} (GPU ${gpus.join(",")})` : slot.device;
  }

  function slotRow(slot, now) {
    const late = slot.heartbeat_age_s > (2 * refreshMs) / 1000;
    return h(
      "tr",
      { "data-slot": slot.name },
      h("td", { "data-label": "Slot" }, h("code", { text: slot.name })),
      h("td", { "data-label": "Device", text: deviceText(slot) }),
      slotJobCell(slot),
      h("td", { "data-label": "CPU", className: "num slot-cpu", text: pct(slot.cpu_percent) }),
      h("td", { "data-label": "Memory", className: "num slot-rss",
        text: slot.rss_bytes === null || slot.rss_bytes === undefined ? "—" : `${gb(slot.rss_bytes)} GB` }),
      h("td", {
        "data-label": "Heartbeat",
        className: late ? "late" : null,
        text: `${duration(slot.heartbeat_age_s)} ago${late ? " (late)" : ""}`,
      }),
      h("td", { "data-label": "Up for", text: duration(secondsSince(slot.started_at, now)) }),
    );
  }

  // Telemetry (worker/telemetry.py), as the template's `node_telemetry` macro draws it.
  const gb = (n) => (n / 1e9).toFixed(1);
  const pct = (n) => (n === null || n === undefined ? "—" : `${Math.round(n)}%`);

  function hostStats(hs) {
    if (!hs) return h("p", { className: "host-stats", text: "No sample yet" });
    const p = h("p", { className: "host-stats" }, "CPU ", h("strong", { className: "host-cpu", text: pct(hs.cpu_percent) }));
    if (hs.cpus) p.append(` of ${Math.trunc(hs.cpus)} cores`);
    if (hs.mem_total_bytes) {
      p.append(" · memory ", h("strong", { className: "host-mem", text: `${gb(hs.mem_used_bytes || 0)} / ${gb(hs.mem_total_bytes)} GB` }));
    }
    return p;
  }

  function gpuBar(gpu) {
    const label = h("span", { className: "gpu-label" }, `GPU ${gpu.index}`);
    if (gpu.name) label.append(" ", h("span", { className: "gpu-name", text: gpu.name }));
    const detail = [];
    if (gpu.mem_total_bytes) detail.push(`memory ${gb(gpu.mem_used_bytes || 0)} / ${gb(gpu.mem_total_bytes)} GB`);
    if (gpu.temp_c !== null && gpu.temp_c !== undefined) detail.push(`${Math.round(gpu.temp_c)} °C`);
    if (gpu.power_w !== null && gpu.power_w !== undefined) detail.push(`${Math.round(gpu.power_w)} W`);
    return h(
      "li",
      { className: "gpu-bar", "data-gpu": gpu.index },
      label,
      h("meter", { min: 0, max: 100, value: gpu.util_percent || 0, "aria-label": `GPU ${gpu.index} utilization`, text: pct(gpu.util_percent) }),
      h("span", { className: "gpu-util", text: pct(gpu.util_percent) }),
      h("span", { className: "gpu-detail", text: detail.join(" · ") }),
    );
  }

  function nodeTelemetry(node) {
    const box = h("div", { className: "node-telemetry" }, hostStats(node.host_stats));
    if (node.gpu_stats && node.gpu_stats.length) box.append(h("ul", { className: "gpu-bars" }, node.gpu_stats.map(gpuBar)));
    return box;
  }

  // An admin's say over a node (shared/worker_nodes.py), as the template's macros draw it.
  const controlText = {
    cordoned: "cordoned: takes no new jobs",
    draining: "draining: takes no new jobs, running ones finish",
    drained: "drained: takes no new jobs, none runs",
  };
  const csrfToken = document.querySelector('meta[name="csrf-token"]')?.content || "";

  function nodeControl(node) {
    const items = [];
    const control = node.control;
    if (control && control.state !== "active") {
      const li = h("li", { className: `node-control node-${control.state}` }, h("strong", { text: controlText[control.state] }));
      if (control.drain_now) li.append(" (running jobs handed back)");
      items.push(li);
    }
    if (node.stopped_slots) {
      items.push(h("li", { className: "node-control node-stopped" },
        h("strong", { text: `${plural(node.stopped_slots, "slot")} stopped by the crash guard` })));
    }
    if (node.not_consuming) {
      items.push(h("li", { className: "node-control node-not-consuming" },
        h("strong", { text: node.not_consuming }), " (restart the worker)"));
    }
    const restarts = node.consumer_restarts;
    if (restarts) {
      const times = `${restarts.count} time${restarts.count === 1 ? "" : "s"}`;
      const ago = duration(secondsSince(restarts.last_at, Date.now()));
      items.push(h("li", { className: "node-control node-consumer-restarts", title: restarts.reason,
        text: `consumer restarted automatically ${times}, last ${ago} ago` }));
    }
    return items;
  }

  function actionButton(node, action, label) {
    return h(
      "form",
      { method: "post", action: `/workers/${encodeURIComponent(node.node)}/${action}`, className: "action-form" },
      h("input", { type: "hidden", name: "csrf_token", value: csrfToken }),
      h("button", { type: "submit", className: "btn", "data-action": action, text: label }),
    );
  }

  function nodeActions(node) {
    const control = node.control || {};
    const buttons = control.cordoned
      ? [actionButton(node, "uncordon", "Uncordon")]
      : [actionButton(node, "cordon", "Cordon"), actionButton(node, "drain", "Drain")];
    if (!control.drain_now) buttons.push(actionButton(node, "drain_now", "Drain now"));
    if (node.stopped_slots) buttons.push(actionButton(node, "clear", "Clear crash guard"));
    return h("div", { className: "node-actions", role: "group", "aria-label": `Actions on ${node.node}` }, buttons);
  }

  function offlineNode(node) {
    return h(
      "li",
      { className: "offline-node", "data-node": node.node },
      h("strong", { className: "node-name", text: node.node }),
      " ",
      h("span", { className: "job-meta", text: "not online" }),
      h("ul", { className: "node-meta" }, nodeControl(node)),
      isAdmin ? nodeActions(node) : [],
    );
  }

  // A node whose slots all vanished, as the template's `lost_node` macro draws it.
  function lostNode(node, now) {
    const li = h(
      "li",
      { className: `lost-node node-${node.state}`, "data-node": node.node },
      h("strong", { className: "node-name", text: node.node }),
      " ",
      h("span", { className: "lost-state", text: node.state }),
      " ",
      h("span", { className: "job-meta", text: `last seen ${duration(secondsSince(node.last_seen, now))} ago on ${node.host}` }),
    );
    if (node.jobs && node.jobs.length) {
      li.append(h("ul", { className: "lost-jobs" }, node.jobs.map((job) => h(
        "li",
        { className: "lost-job", "data-job-id": job.id },
        job.id ? [...jobLink(job), " "] : [],
        h("span", { className: "job-meta", text: `attempt ${job.attempt}:` }),
        " ",
        h("span", { className: "lost-fate", text: job.fate }),
      ))));
    }
    return li;
  }

  function nodeCard(node, now) {
    const queues = [];
    node.queues.forEach((q, i) => queues.push(...(i ? [" "] : []), queueChip(q)));
    let slots = `${node.busy_slots} of ${plural(node.online_slots, "slot")} busy`;
    if (node.online_slots < node.slots) slots += ` (${node.slots} configured)`;
    const head = h("tr", {}, ["Slot", "Device", "Current job", "CPU", "Memory", "Heartbeat", "Up for"].map((t) => h("th", { scope: "col", text: t, className: t === "CPU" || t === "Memory" ? "num" : null })));
    return h(
      "article",
      { className: "node-card", "data-node": node.node },
      h(
        "header",
        { className: "node-head" },
        h("h3", { className: "node-name", text: node.node }),
        h(
          "ul",
          { className: "node-meta" },
          h("li", {}, "host ", h("strong", { text: node.host })),
          h("li", {}, "queues ", queues),
          h("li", { text: gpuText(node) }),
          h("li", { text: slots }),
          nodeControl(node),
        ),
        isAdmin ? nodeActions(node) : [],
      ),
      nodeTelemetry(node),
      h(
        "div",
        { className: "table-wrap" },
        h(
          "table",
          { className: "slots-table stack" },
          h("thead", {}, head),
          h("tbody", {}, node.workers.map((slot) => slotRow(slot, now))),
        ),
      ),
    );
  }

  // ------------------------------------------------------------------ render

  const byId = (id) => document.getElementById(id);

  function setText(id, text) {
    const node = byId(id);
    // Only on change: the summary is an aria-live region, and an unchanged sentence
    // must not be announced again every few seconds.
    if (node && node.textContent !== text) node.textContent = text;
  }

  function render(workers, queues) {
    const now = Date.now();
    setText("cluster-summary", summaryText(workers, queues));

    const updated = byId("cluster-updated");
    updated.dateTime = queues.checked_at;
    updated.textContent = new Date(queues.checked_at).toLocaleTimeString();

    const brokerError = queues.broker_error || workers.broker_error;
    const alert = byId("broker-error");
    alert.hidden = !brokerError;
    alert.querySelector(".broker-error-detail").textContent = brokerError || "";

    byId("queue-list").replaceChildren(...queues.queues.map(queueCard));

    setText("waiting-count", String(queues.waiting_total));
    byId("waiting-empty").hidden = queues.waiting.length > 0;
    byId("waiting-wrap").hidden = queues.waiting.length === 0;
    byId("waiting-rows").replaceChildren(...queues.waiting.map(waitingRow));
    const more = byId("waiting-more");
    more.hidden = queues.waiting_total <= queues.waiting.length;
    more.textContent = `Showing the first ${queues.waiting.length} of ${queues.waiting_total}, in the order workers take them.`;

    setText("nodes-count", String(workers.nodes.length));
    byId("workers-empty").hidden = workers.nodes.length > 0 || Boolean(brokerError);
    byId("workers-unknown").hidden = !brokerError;
    byId("node-list").replaceChildren(...workers.nodes.map((node) => nodeCard(node, now)));
    const offline = workers.offline_nodes || [];
    byId("offline-nodes").hidden = offline.length === 0;
    byId("offline-nodes").replaceChildren(...offline.map(offlineNode));
    const lost = workers.lost_nodes || [];
    byId("lost-nodes").hidden = lost.length === 0;
    byId("lost-nodes").replaceChildren(...lost.map((node) => lostNode(node, now)));
  }

  // ------------------------------------------------------------------ polling

  class HttpError extends Error {
    constructor(status) {
      super(`HTTP ${status}`);
      this.status = status;
    }
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new HttpError(response.status);
    return response.json();
  }

  function showError(text) {
    byId("refresh-error").textContent = text ? ` · ${text}` : "";
  }

  async function refresh() {
    if (inFlight || stopped) return;
    inFlight = true;
    try {
      const [workers, queues] = await Promise.all([getJSON(urls.workers), getJSON(urls.queues)]);
      render(workers, queues);
      showError("");
    } catch (err) {
      if (err instanceof HttpError && err.status === 401) {
        stopped = true;
        showError("your session ended; reload the page to log in again");
      } else {
        showError(`could not refresh (${err.message}); retrying`);
      }
    } finally {
      inFlight = false;
      schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (!stopped && !document.hidden) timer = setTimeout(refresh, refreshMs);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(timer);
    else refresh();
  });

  // The server-rendered time is UTC; show it in the reader's own zone like later ones.
  const updated = byId("cluster-updated");
  if (updated && updated.dateTime) updated.textContent = new Date(updated.dateTime).toLocaleTimeString();
  schedule();
})();
