"""Counters and histograms of worker slots and reconcilers, published through Redis.

A Celery prefork child lives for one job at a time and a host may run dozens, and
reconcilers come and go: none of them is a good scrape target, and an in-process
counter dies with its process. So they add to hashes in the Redis every one of them
already talks to (`shared/broker.py`, "monitoring"), and the web's GET /metrics exports
the sums (server/prometheus.py). One pipelined round trip per event, a few per job.

Series definitions come from shared/prometheus_catalog.py. Publishing never breaks a
job or a reconciler pass: a failure is logged once per streak and the count is lost,
which costs an undercount, never a crash.

Hash layout, per series: counter field = label values joined by "\\x1f"; histogram
fields = labels + "\\x1f" + a bucket's upper bound (a plain count, not cumulative; the
reader accumulates), "+Inf", "sum" or "count"; gauge field "" = its value.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shared import prometheus_catalog as pc
from shared.broker import event_metrics_key, redis_client

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline

log = logging.getLogger(__name__)

SEP = "\x1f"
_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()
_failing = False


def _client(url: str) -> redis.Redis:
    # One client per process and URL; redis-py's pool notices a fork and reconnects.
    with _lock:
        found = _clients.get(url)
        if found is None:
            found = _clients[url] = redis_client(url, timeout_s=2.0)
        return found


def _labels(series: pc.Series, values: Sequence[str]) -> str:
    if len(values) != len(series.labels):
        raise ValueError(f"{series.name} takes labels {series.labels}, got {tuple(values)}")
    return SEP.join(str(v) for v in values)


def _bucket(series: pc.Series, value: float) -> str:
    i = bisect.bisect_left(series.buckets, value)
    return repr(float(series.buckets[i])) if i < len(series.buckets) else "+Inf"


def _send(url: str | None, fill: Callable[[Pipeline], object]) -> None:
    """Run `fill(pipe)` and send it; log the first failure of a streak, never raise."""
    global _failing
    if not url:
        return
    try:
        pipe = _client(url).pipeline(transaction=False)
        fill(pipe)
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - monitoring must never break a job
        if not _failing:
            log.warning("monitoring counters not published (%s: %s)", type(exc).__name__, exc)
        _failing = True
        return
    _failing = False


def count(url: str | None, series: pc.Series, labels: Sequence[str] = (), by: float = 1) -> None:
    """Add `by` to a counter."""
    key, name = event_metrics_key(series.name), _labels(series, labels)
    _send(url, lambda pipe: pipe.hincrbyfloat(key, name, by))


def count_many(url: str | None, series: pc.Series, counts: dict[tuple[str, ...], float]) -> None:
    """Add to several label sets of one counter in one round trip. Zeros are sent too:
    they create the series, so rate() over it is 0 rather than nothing."""
    key = event_metrics_key(series.name)
    todo = {_labels(series, labels): n for labels, n in counts.items()}
    if todo:
        _send(url, lambda pipe: [pipe.hincrbyfloat(key, k, n) for k, n in todo.items()])


def observe(url: str | None, series: pc.Series, labels: Sequence[str], value: float) -> None:
    """One observation of a histogram."""
    key, name = event_metrics_key(series.name), _labels(series, labels)
    value = max(0.0, float(value))

    def fill(pipe: Pipeline) -> None:
        pipe.hincrbyfloat(key, name + SEP + _bucket(series, value), 1)
        pipe.hincrbyfloat(key, name + SEP + "sum", value)
        pipe.hincrbyfloat(key, name + SEP + "count", 1)

    _send(url, fill)


def set_gauge(url: str | None, series: pc.Series, value: float) -> None:
    key = event_metrics_key(series.name)
    _send(url, lambda pipe: pipe.hset(key, "", repr(float(value))))


# ----------------------------------------------------------------------------- reading


@dataclass
class Histogram:
    buckets: list[tuple[str, float]]  # (le, cumulative count), "+Inf" last
    sum: float
    count: float


@dataclass
class Published:
    """What the hashes hold, per series name: counters/gauges by label values, and
    histograms by label values."""

    values: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    histograms: dict[str, dict[tuple[str, ...], Histogram]] = field(default_factory=dict)


def _split(raw: str, n: int) -> tuple[str, ...]:
    return tuple(raw.split(SEP)) if n else ()


def read(client: redis.Redis, series: Sequence[pc.Series]) -> Published:
    """Every published series in `series`. Raises RedisError."""
    pipe = client.pipeline(transaction=False)
    for s in series:
        pipe.hgetall(event_metrics_key(s.name))
    out = Published()
    for s, raw in zip(series, pipe.execute(), strict=True):
        fields = {_text(k): float(v) for k, v in raw.items()}
        if s.kind != "histogram":
            out.values[s.name] = {
                _split(k, len(s.labels)): v
                for k, v in fields.items()
                if k.count(SEP) == max(len(s.labels) - 1, 0)
            }
            continue
        per: dict[tuple[str, ...], dict[str, float]] = {}
        for k, v in fields.items():
            labels, _, part = k.rpartition(SEP)
            per.setdefault(_split(labels, len(s.labels)), {})[part] = v
        hists = {}
        for labels, parts in per.items():
            running, buckets = 0.0, []
            for bound in [*(repr(float(b)) for b in s.buckets), "+Inf"]:
                running += parts.get(bound, 0.0)
                buckets.append((bound, running))
            hists[labels] = Histogram(buckets, parts.get("sum", 0.0), parts.get("count", running))
        out.histograms[s.name] = hists
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
