"""GET /metrics (server/prometheus.py): the Prometheus text format, parsed with
prometheus-client's own parser; the series follow the jobs' rows; only the scrape
token and admins may read it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from shared.db import transaction, utcnow
from shared.orm import Job
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.job_rows import add_jobs

SCRAPE_TOKEN = "scrape-token-0123456789"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"metrics_token": SCRAPE_TOKEN})


def scrape(app: Flask) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    got = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    assert got.status_code == 200, got.get_data(as_text=True)
    assert got.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(got.get_data(as_text=True))
        for sample in family.samples
    }


def jobs(series: dict, state: str, kind: str = "train", queue: str = "cpu") -> float:
    return series[("trainyard_jobs", (("kind", kind), ("queue", queue), ("state", state)))]


def test_the_series_follow_the_jobs(app: Flask, db_url: str, users: TestUsers) -> None:
    before = scrape(app)
    assert jobs(before, "failed") == 0 and jobs(before, "queued", "prune") == 0  # zeros exported
    assert before[("trainyard_queue_waiting_jobs", (("queue", "cpu"),))] == 0
    assert before[("trainyard_queue_oldest_waiting_seconds", (("queue", "cpu"),))] == 0
    ids = add_jobs(db_url, [
        {"owner": users.alice.id, "state": "queued", "created_at": utcnow() - timedelta(seconds=90)},
        {"owner": users.alice.id, "state": "queued", "created_at": utcnow() - timedelta(seconds=10)},
        {"owner": users.bob.id, "state": "succeeded"},
        {"owner": users.bob.id, "state": "failed"},
    ])  # fmt: skip
    after = scrape(app)
    assert (
        jobs(after, "queued") == 2 and jobs(after, "succeeded") == 1 and jobs(after, "failed") == 1
    )
    assert after[("trainyard_queue_waiting_jobs", (("queue", "cpu"),))] == 2
    assert 89 <= after[("trainyard_queue_oldest_waiting_seconds", (("queue", "cpu"),))] < 200
    with transaction(db_url) as s:  # the oldest is claimed: the next one is the oldest
        s.get(Job, ids[0]).state = "running"
    moved = scrape(app)
    assert jobs(moved, "queued") == 1 and jobs(moved, "running") == 1
    assert moved[("trainyard_queue_oldest_waiting_seconds", (("queue", "cpu"),))] < 60


def test_only_the_scrape_token_and_admins_read_it(app: Flask, users: TestUsers) -> None:
    client = app.test_client()
    assert client.get("/metrics").status_code == 401
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-scrape-token-at-all"})
    assert wrong.status_code == 401
    member = as_user(app, users.alice).get("/metrics")
    assert member.status_code == 403 and "Authorization" in member.get_json()["error"]["fields"]
    assert as_user(app, users.admin).get("/metrics").status_code == 200
