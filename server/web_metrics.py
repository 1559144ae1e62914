"""What the web processes count themselves: HTTP requests and job submissions.

gunicorn runs several worker processes, and a scrape reaches one of them; so these
counters use prometheus-client's multiprocess mode (server/gunicorn_hooks.py sets
PROMETHEUS_MULTIPROC_DIR before any worker starts and wipes it first; each process
writes its values to files there and GET /metrics adds them all up, those of exited
processes included). Without that variable (the Flask test client, `flask run`) they are
ordinary in-process counters. The names come from shared/prometheus_catalog.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shared import prometheus_catalog as pc

# In-process values; in multiprocess mode the files hold them and this stays empty.
LOCAL = CollectorRegistry(auto_describe=True)

SUBMISSIONS = Counter(
    pc.SUBMISSIONS.name, pc.SUBMISSIONS.help, pc.SUBMISSIONS.labels, registry=LOCAL
)
HTTP_REQUESTS = Counter(
    pc.HTTP_REQUESTS.name, pc.HTTP_REQUESTS.help, pc.HTTP_REQUESTS.labels, registry=LOCAL
)
HTTP_DURATION = Histogram(
    pc.HTTP_DURATION.name, pc.HTTP_DURATION.help, pc.HTTP_DURATION.labels,
    buckets=pc.HTTP_DURATION.buckets, registry=LOCAL,
)  # fmt: skip

# A client picks the method: anything unusual is one label value, not a new series each.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES = ("accepted", "invalid", "forbidden", "limited")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def count_submission(kind: str, outcome: str) -> None:
    SUBMISSIONS.labels(kind, outcome).inc()


def install(app: Flask) -> None:
    """Count every request by its URL rule (bounded, unlike URLs) and status."""

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        started = g.pop("request_started", None)
        method = request.method if request.method in _METHODS else "other"
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        HTTP_REQUESTS.labels(method, route, str(response.status_code)).inc()
        if started is not None:
            HTTP_DURATION.labels(method, route).observe(time.perf_counter() - started)
        return response


class WebCollector(Collector):
    """This process's counters, or every process's in multiprocess mode; each family
    present even before its first sample, so dashboards and alert rules always find it."""

    def collect(self) -> Iterator[Metric]:
        source = CollectorRegistry()
        if (path := multiprocess_dir()) is not None:
            MultiProcessCollector(source, path=path)
            families = list(source.collect())
        else:
            families = list(LOCAL.collect())
        seen = {f.name for f in families}
        yield from families
        for series in (pc.SUBMISSIONS, pc.HTTP_REQUESTS, pc.HTTP_DURATION):
            name = series.name.removesuffix("_total")
            if name not in seen:
                yield Metric(name, series.help, series.kind)
