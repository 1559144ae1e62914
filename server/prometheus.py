"""GET /metrics: Trainyard in the Prometheus text format (prometheus-client).

What each scrape exports, and from where (series defined in shared/prometheus_catalog.py):

- jobs by state/kind/queue, queue depth and oldest wait: the database, at scrape time;
- worker slots, nodes, heartbeats and GPUs: the worker registry in Redis, at scrape time,
  through the same reader as the workers page (server/cluster_status.py);
- wait and run times, attempts finished, reconciler actions and last pass, metric points
  written: counted by worker slots and reconcilers into Redis (shared/event_metrics.py),
  summed here;
- HTTP requests and submissions: counted by the web processes themselves
  (server/web_metrics.py, multiprocess mode under gunicorn);
- the free space of a local artifact directory.

Read-at-scrape series are the same whichever gunicorn process answers, and nothing is
lost when one restarts. Every family is exported even without samples, so an alert rule
such as `trainyard_queue_consumers == 0` has a series to look at from the first scrape.

Access: `Authorization: Bearer <TRAINYARD_METRICS_TOKEN>` (a scrape token for
Prometheus, no account behind it), or an admin's API token. Anyone else gets 401/403:
the series name hosts, queues and counts of everyone's jobs.
"""

from __future__ import annotations

import hmac
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.auth import Principal, api_user, authenticate_api_request
from server.cluster_status import read_cluster, workers_json
from server.database import get_session
from server.errors import ApiError
from server.web_metrics import WebCollector
from shared import event_metrics
from shared import prometheus_catalog as pc
from shared.broker import redis_client
from shared.db import utcnow
from shared.job_states import ALL_STATES, JobState
from shared.orm import Job, WebhookDelivery
from shared.settings import Settings
from shared.spec import JOB_KINDS
from shared.webhook_delivery import DELIVERED, FAILED, PENDING

log = logging.getLogger(__name__)

bp = Blueprint("prometheus", __name__)

# workers_json shows admins everything; the scrape is not a user.
_SCRAPER = Principal(id=0, username="prometheus", role="admin", session_version=0, issued_at=0)
_NODE_STATES = ("online", "cordoned", "draining", "lost", "stopped")
DELIVERY_STATES = (PENDING, DELIVERED, FAILED)


def _gauge(series: pc.Series) -> GaugeMetricFamily:
    return GaugeMetricFamily(series.name, series.help, labels=list(series.labels))


class JobsCollector(Collector):
    """Jobs by state, kind and queue; per queue, how many wait and for how long the
    oldest has waited. Every state and kind is exported, zeros included, so a rule such
    as `trainyard_jobs{state="failed"}` has a series before the first failure."""

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now

    def collect(self) -> Iterator[Metric]:
        rows = self.session.execute(
            select(Job.state, Job.kind, Job.queue, func.count()).group_by(
                Job.state, Job.kind, Job.queue
            )
        ).all()
        queues = sorted({q for _, _, q, _ in rows} | {"cpu", "gpu"})
        counts = {(s, k, q): n for s, k, q, n in rows}
        jobs = _gauge(pc.JOBS)
        for state in ALL_STATES:
            for kind in JOB_KINDS:
                for queue in queues:
                    jobs.add_metric([state, kind, queue], counts.get((state, kind, queue), 0))
        yield jobs

        waiting = dict(
            self.session.execute(
                select(Job.queue, func.min(Job.created_at))
                .where(Job.state == JobState.QUEUED.value)
                .group_by(Job.queue)
            ).all()
        )
        depth, oldest = _gauge(pc.QUEUE_WAITING), _gauge(pc.QUEUE_OLDEST)
        for queue in queues:
            depth.add_metric([queue], sum(counts.get(("queued", k, queue), 0) for k in JOB_KINDS))
            first = waiting.get(queue)
            age = (self.now - first).total_seconds() if first is not None else 0.0
            oldest.add_metric([queue], max(age, 0.0))
        yield depth
        yield oldest


class WebhooksCollector(Collector):
    """Webhook deliveries by status, and how long the oldest unacknowledged one has
    waited: a receiver that is down shows here before its owner notices."""

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now

    def collect(self) -> Iterator[Metric]:
        counts = dict(
            self.session.execute(
                select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
            ).all()
        )
        by_status = _gauge(pc.WEBHOOK_DELIVERIES)
        for status in DELIVERY_STATES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        oldest = self.session.scalar(
            select(func.min(WebhookDelivery.created_at)).where(WebhookDelivery.status == PENDING)
        )
        age = _gauge(pc.WEBHOOK_OLDEST_PENDING)
        age.add_metric([], max((self.now - oldest).total_seconds(), 0.0) if oldest else 0.0)
        yield age


class FleetCollector(Collector):
    """Worker slots, nodes, heartbeats and GPUs, as the workers page sees them."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session = session
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        families = {s.name: _gauge(s) for s in (
            pc.QUEUE_CONSUMERS, pc.WORKER_SLOTS, pc.WORKER_SLOTS_BUSY, pc.WORKER_NODES,
            pc.HEARTBEAT_AGE, pc.GPU_UTIL, pc.GPU_MEM_USED, pc.GPU_MEM_TOTAL,
        )}  # fmt: skip
        cluster = read_cluster(
            self.settings.redis_url, keep_lost_s=self.settings.lost_worker_hours * 3600
        )
        if cluster.slots is not None:
            self._add(families, workers_json(self.session, cluster, _SCRAPER))
        else:
            log.warning("metrics: worker series left empty: %s", cluster.error)
        yield from families.values()

    @staticmethod
    def _add(families: dict[str, GaugeMetricFamily], status: dict[str, Any]) -> None:
        online, busy, consumers = Counter(), Counter(), Counter()
        states = Counter({s: 0 for s in _NODE_STATES})
        for queue in ("cpu", "gpu"):
            consumers[queue] = 0
        for node in status["nodes"]:
            control = node["control"]
            taking = not (control["cordoned"] or control["draining"])
            states[
                "draining"
                if control["draining"]
                else "cordoned"
                if control["cordoned"]
                else "online"
            ] += 1
            for slot in node["workers"]:
                families[pc.HEARTBEAT_AGE.name].add_metric(
                    [node["host"], slot["name"]], slot["heartbeat_age_s"]
                )
                for queue in node["queues"]:
                    online[(node["host"], queue)] += 1
                    busy[(node["host"], queue)] += bool(slot["busy"])
                    consumers[queue] += taking and not slot["stopped"]
            for gpu in node["gpu_stats"]:
                labels = [node["host"], str(gpu["index"])]
                if gpu.get("util_percent") is not None:
                    families[pc.GPU_UTIL.name].add_metric(labels, gpu["util_percent"] / 100.0)
                if gpu.get("mem_used_bytes") is not None:
                    families[pc.GPU_MEM_USED.name].add_metric(labels, gpu["mem_used_bytes"])
                if gpu.get("mem_total_bytes") is not None:
                    families[pc.GPU_MEM_TOTAL.name].add_metric(labels, gpu["mem_total_bytes"])
        for node in status["lost_nodes"]:
            states[node["state"]] += 1
        for (host, queue), n in sorted(online.items()):
            families[pc.WORKER_SLOTS.name].add_metric([host, queue], n)
            families[pc.WORKER_SLOTS_BUSY.name].add_metric([host, queue], busy[(host, queue)])
        for queue, n in sorted(consumers.items()):
            families[pc.QUEUE_CONSUMERS.name].add_metric([queue], n)
        for state, n in states.items():
            families[pc.WORKER_NODES.name].add_metric([state], n)


_PUBLISHED = (
    pc.JOB_WAIT, pc.JOB_RUN, pc.ATTEMPTS_FINISHED, pc.RECONCILER_ACTIONS,
    pc.RECONCILER_LAST_PASS, pc.METRIC_POINTS,
)  # fmt: skip


class PublishedCollector(Collector):
    """What worker slots and reconcilers counted into Redis (shared/event_metrics.py)."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url

    def collect(self) -> Iterator[Metric]:
        published = event_metrics.Published()
        if self.redis_url:
            client = redis_client(self.redis_url, timeout_s=2.0)
            try:
                published = event_metrics.read(client, _PUBLISHED)
            except (redis.RedisError, OSError, ValueError) as exc:
                log.warning("metrics: published counters not read: %s", exc)
            finally:
                client.close()
        for series in _PUBLISHED:
            labels = list(series.labels)
            if series.kind == "histogram":
                family = HistogramMetricFamily(series.name, series.help, labels=labels)
                for values, h in sorted(published.histograms.get(series.name, {}).items()):
                    family.add_metric(list(values), h.buckets, h.sum)
            elif series.kind == "counter":
                family = CounterMetricFamily(series.name, series.help, labels=labels)
                for values, n in sorted(published.values.get(series.name, {}).items()):
                    family.add_metric(list(values), n)
            else:
                family = GaugeMetricFamily(series.name, series.help, labels=labels)
                for values, n in sorted(published.values.get(series.name, {}).items()):
                    family.add_metric(list(values), n)
            yield family


class ArtifactStoreCollector(Collector):
    """Room left where a local artifact directory lives. A bucket has no such figure
    (its provider's own monitoring has): the families are then empty."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        free, capacity = _gauge(pc.ARTIFACT_FREE), _gauge(pc.ARTIFACT_CAPACITY)
        if not self.settings.artifacts_in_bucket:
            try:
                usage = shutil.disk_usage(_existing(self.settings.resolved_artifacts_dir))
            except OSError as exc:
                log.warning("metrics: cannot read the artifact directory's disk: %s", exc)
            else:
                free.add_metric([], usage.free)
                capacity.add_metric([], usage.total)
        yield free
        yield capacity


def _existing(path: Path) -> Path:
    """The directory itself, or the closest parent that exists: the file system the
    artifacts will land on before the first job made the directory."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _allowed() -> None:
    """The scrape token, or an admin's API token; ApiError otherwise."""
    token = current_app.config["TRAINYARD_SETTINGS"].metrics_token
    header = request.headers.get("Authorization", "")
    sent = header.removeprefix("Bearer ").encode()
    if token and header.startswith("Bearer ") and hmac.compare_digest(sent, token.encode()):
        return
    authenticate_api_request()  # 401 without a valid token or session
    if not api_user().is_admin:
        raise ApiError(403, "forbidden", "metrics are for admins and the scrape token",
                       {"Authorization": "an admin's token or TRAINYARD_METRICS_TOKEN"})  # fmt: skip


@bp.get("/metrics")
def metrics() -> ResponseReturnValue:
    _allowed()
    settings: Settings = current_app.config["TRAINYARD_SETTINGS"]
    session = get_session()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(session, utcnow()))
    registry.register(WebhooksCollector(session, utcnow()))
    registry.register(FleetCollector(session, settings))
    registry.register(PublishedCollector(settings.redis_url))
    registry.register(ArtifactStoreCollector(settings))
    registry.register(WebCollector())
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
