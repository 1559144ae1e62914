"""Every Prometheus series Trainyard exports: name, type, help text, labels, buckets.

The one owner of these names (docs/architecture.md, "Monitoring"). Three kinds of
producer read their definitions from here:

- read at scrape time by the web's GET /metrics (server/prometheus.py): jobs and queues
  from the database, worker slots, nodes and GPUs from the worker registry in Redis;
- counted by worker slots and the reconciler and published through Redis
  (shared/event_metrics.py), then exported by the web: a prefork child lives for one
  job at a time and a host may run dozens, so none of them is a scrape target;
- counted in the web processes themselves with prometheus-client's multiprocess mode
  (server/web_metrics.py): HTTP requests and submissions;

and the prediction server's own GET /metrics (worker/serving/app.py).

deploy/monitoring/ (alert rules, the Grafana dashboard) must only name series listed
here: tests/test_monitoring_files.py checks its queries against a real /metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "counter", "histogram"]

# Seconds: from a sub-second dispatch to a job that waited a day.
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600, 24 * 3600)
# Seconds: smoke tests to multi-day training.
RUN_BUCKETS = (
    10,
    30,
    60,
    300,
    600,
    1800,
    3600,
    3 * 3600,
    6 * 3600,
    12 * 3600,
    24 * 3600,
    72 * 3600,
)
# Seconds: a page or an API call; uploads and estimates of large models are the slow end.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Rows per forward pass of the prediction server.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Series:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


def _s(name: str, kind: Kind, help: str, *labels: str, buckets: tuple[float, ...] = ()) -> Series:
    return Series(name, kind, help, labels, buckets)


# -- read from the database at scrape time
JOBS = _s("trainyard_jobs", "gauge", "Jobs by state, kind and queue.", "state", "kind", "queue")
QUEUE_WAITING = _s("trainyard_queue_waiting_jobs", "gauge", "Queued jobs per queue.", "queue")
QUEUE_OLDEST = _s(
    "trainyard_queue_oldest_waiting_seconds", "gauge",
    "How long the oldest queued job of each queue has waited.", "queue",
)  # fmt: skip
ARTIFACT_FREE = _s(
    "trainyard_artifact_store_free_bytes", "gauge",
    "Free bytes on the file system of a local artifact directory (no sample with a bucket).",
)  # fmt: skip
ARTIFACT_CAPACITY = _s(
    "trainyard_artifact_store_capacity_bytes", "gauge",
    "Size of the file system of a local artifact directory (no sample with a bucket).",
)  # fmt: skip

WEBHOOK_DELIVERIES = _s(
    "trainyard_webhook_deliveries", "gauge",
    "Webhook deliveries kept (TRAINYARD_WEBHOOK_RETENTION_DAYS) by status: pending "
    "(being retried), delivered, failed (given up).", "status",
)  # fmt: skip
WEBHOOK_OLDEST_PENDING = _s(
    "trainyard_webhook_oldest_pending_seconds", "gauge",
    "Age of the oldest webhook delivery not yet acknowledged (0: none).",
)  # fmt: skip

# -- read from the worker registry (Redis) at scrape time
QUEUE_CONSUMERS = _s(
    "trainyard_queue_consumers", "gauge",
    "Online worker slots taking jobs from each queue (cordoned, draining and stopped slots "
    "do not count).", "queue",
)  # fmt: skip
WORKER_SLOTS = _s(
    "trainyard_worker_slots", "gauge", "Online worker slots per host and queue.", "host", "queue"
)
WORKER_SLOTS_BUSY = _s(
    "trainyard_worker_slots_busy", "gauge",
    "Worker slots running a job, per host and queue.", "host", "queue",
)  # fmt: skip
WORKER_NODES = _s(
    "trainyard_worker_nodes", "gauge",
    "Worker nodes by state: online, cordoned, draining, lost (gone without a clean "
    "shutdown) or stopped.", "state",
)  # fmt: skip
HEARTBEAT_AGE = _s(
    "trainyard_worker_heartbeat_age_seconds", "gauge",
    "Seconds since each online slot's last heartbeat, by Redis's clock.", "host", "slot",
)  # fmt: skip
GPU_UTIL = _s(
    "trainyard_gpu_utilization_ratio", "gauge", "GPU utilization (0-1), per host and GPU index.",
    "host", "gpu",
)  # fmt: skip
GPU_MEM_USED = _s(
    "trainyard_gpu_memory_used_bytes", "gauge", "GPU memory in use, per host and GPU index.",
    "host", "gpu",
)  # fmt: skip
GPU_MEM_TOTAL = _s(
    "trainyard_gpu_memory_total_bytes", "gauge", "GPU memory, per host and GPU index.",
    "host", "gpu",
)  # fmt: skip

# -- counted by worker slots and the reconciler, published through Redis
JOB_WAIT = _s(
    "trainyard_job_wait_seconds", "histogram",
    "From submission to a worker's first claim of the job.", "queue", buckets=WAIT_BUCKETS,
)  # fmt: skip
JOB_RUN = _s(
    "trainyard_job_run_seconds", "histogram",
    "How long each attempt ran on its worker, by how it ended.", "queue", "kind", "outcome",
    buckets=RUN_BUCKETS,
)  # fmt: skip
ATTEMPTS_FINISHED = _s(
    "trainyard_job_attempts_finished_total", "counter",
    "Attempts that ended on a worker: succeeded, failed, cancelled, requeued (handed back "
    "or retried) or lost (its lease was taken over).", "queue", "kind", "outcome",
)  # fmt: skip
RECONCILER_ACTIONS = _s(
    "trainyard_reconciler_actions_total", "counter",
    "What reconcilers did: requeued, failed, republished, cancelled, preempted, publish_errors.",
    "action",
)  # fmt: skip
RECONCILER_LAST_PASS = _s(
    "trainyard_reconciler_last_pass_timestamp_seconds", "gauge",
    "Unix time a reconciler last finished a pass (absent: none has run).",
)  # fmt: skip
METRIC_POINTS = _s(
    "trainyard_metric_points_written_total", "counter",
    "Metric points (loss, accuracy, telemetry, ...) jobs wrote to the database.",
)  # fmt: skip

# -- counted in the web processes (prometheus-client multiprocess mode)
SUBMISSIONS = _s(
    "trainyard_submissions_total", "counter",
    "Job submissions by kind and outcome: accepted, invalid, forbidden or limited.",
    "kind", "outcome",
)  # fmt: skip
HTTP_REQUESTS = _s(
    "trainyard_http_requests_total", "counter",
    "HTTP requests by method, route (the URL rule, not the URL) and status.",
    "method", "route", "status",
)  # fmt: skip
HTTP_DURATION = _s(
    "trainyard_http_request_duration_seconds", "histogram",
    "Time to produce a response, by method and route (a stream's: until it starts).",
    "method", "route", buckets=HTTP_BUCKETS,
)  # fmt: skip

# -- the prediction server's own GET /metrics
SERVE_REQUESTS = _s(
    "trainyard_serve_requests_total", "counter",
    "Prediction requests by model, version and HTTP status.", "model", "version", "status",
)  # fmt: skip
SERVE_DURATION = _s(
    "trainyard_serve_request_duration_seconds", "histogram",
    "Prediction latency, by model and version.", "model", "version",
)  # fmt: skip
SERVE_BATCH = _s(
    "trainyard_serve_batch_size", "histogram",
    "Rows per forward pass: how well concurrent requests batch.", "model", "version",
    buckets=BATCH_BUCKETS,
)  # fmt: skip

WEB_SERIES = (
    JOBS, QUEUE_WAITING, QUEUE_OLDEST, ARTIFACT_FREE, ARTIFACT_CAPACITY, WEBHOOK_DELIVERIES,
    WEBHOOK_OLDEST_PENDING, QUEUE_CONSUMERS,
    WORKER_SLOTS, WORKER_SLOTS_BUSY, WORKER_NODES, HEARTBEAT_AGE, GPU_UTIL, GPU_MEM_USED,
    GPU_MEM_TOTAL, JOB_WAIT, JOB_RUN, ATTEMPTS_FINISHED, RECONCILER_ACTIONS,
    RECONCILER_LAST_PASS, METRIC_POINTS, SUBMISSIONS, HTTP_REQUESTS, HTTP_DURATION,
)  # fmt: skip
SERVE_SERIES = (SERVE_REQUESTS, SERVE_DURATION, SERVE_BATCH)
