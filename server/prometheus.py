"""GET /metrics: the queue's state in the Prometheus text format (prometheus-client).

Every series here is read from the database at scrape time by a custom collector, so
the answer is the same whichever gunicorn process serves the scrape and no process
keeps counters that a restart would lose (counters of events, such as submissions
and HTTP requests, need prometheus-client's multiprocess mode and come next).
The Prometheus names live here, and only here.

Access: `Authorization: Bearer <TRAINYARD_METRICS_TOKEN>` (a scrape token for
Prometheus, no account behind it), or an admin's API token. Anyone else gets 401/403:
the series name owners' queues and counts of their jobs.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from datetime import datetime

from flask import Blueprint, Response, current_app, request
from flask.typing import ResponseReturnValue
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from shared.db import utcnow
from shared.job_states import ALL_STATES, JobState
from shared.orm import Job
from shared.spec import JOB_KINDS

JOBS = "trainyard_jobs"
QUEUE_WAITING = "trainyard_queue_waiting_jobs"
QUEUE_OLDEST = "trainyard_queue_oldest_waiting_seconds"

bp = Blueprint("prometheus", __name__)


class JobsCollector(Collector):
    """Jobs by state, kind and queue; per queue, how many wait and for how long the
    oldest has waited. Every state and kind is exported, zeros included, so a rule such
    as `trainyard_jobs{state="failed"}` has a series before the first failure."""

    def __init__(self, session: Session, now: datetime) -> None:
        self.session = session
        self.now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self.session.execute(
            select(Job.state, Job.kind, Job.queue, func.count()).group_by(
                Job.state, Job.kind, Job.queue
            )
        ).all()
        queues = sorted({q for _, _, q, _ in rows} | {"cpu", "gpu"})
        counts = {(s, k, q): n for s, k, q, n in rows}
        jobs = GaugeMetricFamily(JOBS, "Jobs by state, kind and queue.",
                                 labels=["state", "kind", "queue"])  # fmt: skip
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
        depth = GaugeMetricFamily(QUEUE_WAITING, "Queued jobs per queue.", labels=["queue"])
        oldest = GaugeMetricFamily(
            QUEUE_OLDEST, "How long the oldest queued job of each queue has waited.",
            labels=["queue"],
        )  # fmt: skip
        for queue in queues:
            depth.add_metric([queue], sum(counts.get(("queued", k, queue), 0) for k in JOB_KINDS))
            first = waiting.get(queue)
            age = (self.now - first).total_seconds() if first is not None else 0.0
            oldest.add_metric([queue], max(age, 0.0))
        yield depth
        yield oldest


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
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(get_session(), utcnow()))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
