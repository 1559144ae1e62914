"""The prediction server's GET /metrics: its statistics (worker/serving/stats.py) in the
Prometheus text format. One serve process per container (gunicorn, one worker process,
many threads: `trainyard serve`), so it is its own scrape target; several replicas are
several targets. Series names from shared/prometheus_catalog.py."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shared import prometheus_catalog as pc
from worker.serving.stats import LATENCY_BUCKETS_MS, ServeStats


class ServeCollector(Collector):
    def __init__(self, stats: ServeStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            pc.SERVE_REQUESTS.name, pc.SERVE_REQUESTS.help, labels=list(pc.SERVE_REQUESTS.labels)
        )
        latency = HistogramMetricFamily(
            pc.SERVE_DURATION.name, pc.SERVE_DURATION.help, labels=list(pc.SERVE_DURATION.labels)
        )
        batches = HistogramMetricFamily(
            pc.SERVE_BATCH.name, pc.SERVE_BATCH.help, labels=list(pc.SERVE_BATCH.labels)
        )
        for (model, version), s in self.stats.copy().items():
            labels = [model, str(version)]
            errors = sum(s.errors.values())
            requests.add_metric([*labels, "200"], s.requests - errors)
            for status, n in sorted(s.errors.items()):
                requests.add_metric([*labels, str(status)], n)
            running, buckets = 0, []
            for bound_ms, n in zip([*LATENCY_BUCKETS_MS, None], s.latency, strict=True):
                running += n
                buckets.append(("+Inf" if bound_ms is None else str(bound_ms / 1000), running))
            latency.add_metric(labels, buckets, s.latency_sum_ms / 1000)
            running, buckets = 0, []
            for bound in pc.SERVE_BATCH.buckets:
                running = sum(n for size, n in s.batches.items() if size <= bound)
                buckets.append((str(float(bound)), running))
            buckets.append(("+Inf", sum(s.batches.values())))
            rows = sum(size * n for size, n in s.batches.items())
            batches.add_metric(labels, buckets, rows)
        yield requests
        yield latency
        yield batches


def render(stats: ServeStats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServeCollector(stats))
    return generate_latest(registry)
