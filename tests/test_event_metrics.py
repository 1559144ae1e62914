"""Counters and histograms published through Redis (shared/event_metrics.py): what
workers and reconcilers add up is what the web reads back, cumulative as Prometheus
wants it; a Redis that is down costs a count, never an exception."""

from __future__ import annotations

import logging

import pytest
import redis

from shared import event_metrics
from shared import prometheus_catalog as pc


def test_counts_and_observations_read_back(redis_url: str) -> None:
    event_metrics.count(redis_url, pc.ATTEMPTS_FINISHED, ("cpu", "train", "succeeded"))
    event_metrics.count(redis_url, pc.ATTEMPTS_FINISHED, ("cpu", "train", "succeeded"), by=2)
    event_metrics.count_many(redis_url, pc.RECONCILER_ACTIONS, {("requeued",): 3, ("failed",): 0})
    event_metrics.count(redis_url, pc.METRIC_POINTS, by=500)
    for seconds in (0.5, 4, 4, 7200, 10**6):  # 10**6 s: past the last bucket
        event_metrics.observe(redis_url, pc.JOB_WAIT, ("gpu",), seconds)
    event_metrics.set_gauge(redis_url, pc.RECONCILER_LAST_PASS, 1234.5)

    client = redis.Redis.from_url(redis_url)
    got = event_metrics.read(
        client, (pc.ATTEMPTS_FINISHED, pc.RECONCILER_ACTIONS, pc.METRIC_POINTS, pc.JOB_WAIT,
                 pc.RECONCILER_LAST_PASS),
    )  # fmt: skip
    assert got.values[pc.ATTEMPTS_FINISHED.name] == {("cpu", "train", "succeeded"): 3}
    # A zero creates the series: rate() over it is 0, not "no data".
    assert got.values[pc.RECONCILER_ACTIONS.name] == {("requeued",): 3, ("failed",): 0}
    assert got.values[pc.METRIC_POINTS.name] == {(): 500}
    assert got.values[pc.RECONCILER_LAST_PASS.name] == {(): 1234.5}
    wait = got.histograms[pc.JOB_WAIT.name][("gpu",)]
    cumulative = dict(wait.buckets)
    assert cumulative["1.0"] == 1 and cumulative["5.0"] == 3 and cumulative["3600.0"] == 3
    assert cumulative["10800.0"] == 4 and cumulative["+Inf"] == 5 == wait.count
    assert wait.sum == pytest.approx(0.5 + 4 + 4 + 7200 + 10**6)
    counts = [n for _, n in wait.buckets]
    assert counts == sorted(counts)  # cumulative, as the text format requires


def test_wrong_labels_are_a_programming_error(redis_url: str) -> None:
    with pytest.raises(ValueError, match="takes labels"):
        event_metrics.count(redis_url, pc.ATTEMPTS_FINISHED, ("cpu",))


def test_a_dead_redis_costs_a_count_not_a_job(caplog: pytest.LogCaptureFixture) -> None:
    dead = "redis://127.0.0.1:1/0"
    with caplog.at_level(logging.WARNING, logger="shared.event_metrics"):
        for _ in range(3):
            event_metrics.count(dead, pc.METRIC_POINTS, by=10)
            event_metrics.observe(dead, pc.JOB_RUN, ("cpu", "train", "failed"), 3.0)
    warned = [r for r in caplog.records if "not published" in r.getMessage()]
    assert len(warned) == 1  # once per streak, not once per count
    event_metrics.count(None, pc.METRIC_POINTS)  # no Redis configured: nothing to do
