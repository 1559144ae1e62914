"""What the prediction server did, per model version, kept in memory: requests, errors
by HTTP status, a latency histogram and the batch sizes its forward passes ran with.

Served at GET /api/v1/serve/stats (this process's) and published to Redis every
TRAINYARD_SERVE_STATS_SECONDS (shared/broker.py, "serving"), where the web's Models page
reads the snapshot of every serve process. Bounded: fixed latency buckets, and batch
sizes counted by size up to TRAINYARD_SERVE_MAX_BATCH (a larger single request counts
as the size of its own rows).
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

# Upper bounds (ms) of the latency buckets; the last one takes everything slower.
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000)


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class VersionStats:
    requests: int = 0
    rows: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    latency_sum_ms: float = 0.0
    batches: dict[int, int] = field(default_factory=dict)  # rows per forward pass -> count

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile (None: no requests)."""
        total = sum(self.latency)
        if not total:
            return None
        seen = 0
        for i, count in enumerate(self.latency):
            seen += count
            if seen >= q * total:
                return float(LATENCY_BUCKETS_MS[i]) if i < len(LATENCY_BUCKETS_MS) else None
        return None

    def to_json(self) -> dict[str, Any]:
        answered = sum(self.latency)
        passes = sum(self.batches.values())
        batched_rows = sum(size * n for size, n in self.batches.items())
        return {
            "requests": self.requests,
            "rows": self.rows,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "latency_ms": {
                "buckets": [*LATENCY_BUCKETS_MS, "inf"],
                "counts": list(self.latency),
                "mean": round(self.latency_sum_ms / answered, 3) if answered else None,
                "p50_le": self.quantile(0.5),
                "p95_le": self.quantile(0.95),
            },
            "batches": {
                "forward_passes": passes,
                "mean_rows": round(batched_rows / passes, 2) if passes else None,
                "max_rows": max(self.batches) if self.batches else None,
                "sizes": {str(k): v for k, v in sorted(self.batches.items())},
            },
        }


class ServeStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionStats] = {}
        self.instance = instance_name()
        self.started = time.time()

    def _get(self, name: str, version: int) -> VersionStats:
        key = (name, version)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = VersionStats()
        return found

    def request(self, name: str, version: int, status: int, ms: float, rows: int = 0) -> None:
        with self._lock:
            s = self._get(name, version)
            s.requests += 1
            s.rows += rows
            if status >= 400:
                s.errors[status] = s.errors.get(status, 0) + 1
            s.latency[bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
            s.latency_sum_ms += ms

    def batch(self, name: str, version: int, rows: int) -> None:
        with self._lock:
            s = self._get(name, version)
            s.batches[rows] = s.batches.get(rows, 0) + 1

    def copy(self) -> dict[tuple[str, int], VersionStats]:
        """(model, version) -> a copy of its figures, for GET /metrics."""
        with self._lock:
            return {
                key: replace(
                    s, errors=dict(s.errors), latency=list(s.latency), batches=dict(s.batches)
                )
                for key, s in sorted(self._versions.items())
            }

    def by_model(self) -> dict[str, dict[str, Any]]:
        """model name -> {"at", "instance", "versions": {version: stats}}."""
        now = time.time()
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for (name, version), s in sorted(self._versions.items()):
                entry = out.setdefault(name, {"at": now, "instance": self.instance, "versions": {}})
                entry["versions"][str(version)] = s.to_json()
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "uptime_s": round(time.time() - self.started, 1),
            "models": self.by_model(),
        }


class Publisher:
    """A daemon thread writing the stats to Redis every `every_s` seconds; a failing
    Redis is logged and retried at the next tick, never an error for a request."""

    def __init__(self, stats: ServeStats, redis_url: str, every_s: float) -> None:
        self.stats, self.redis_url, self.every_s = stats, redis_url, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-stats", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def publish_once(self) -> None:
        from shared.broker import publish_serve_stats, redis_client

        client = redis_client(self.redis_url, timeout_s=2.0)
        try:
            publish_serve_stats(client, self.stats.instance, self.stats.by_model())
        finally:
            client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.publish_once()
            except Exception as exc:  # noqa: BLE001 - Redis down must not stop serving
                log.warning("serve stats not published: %s: %s", type(exc).__name__, exc)
