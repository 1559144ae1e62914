"""GET /metrics (server/prometheus.py): the Prometheus text format, parsed with
prometheus-client's own parser; the series follow the jobs' rows; only the scrape
token and admins may read it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from shared import prometheus_catalog as pc
from shared.celery_app import make_celery
from shared.db import transaction, utcnow
from shared.orm import Job
from shared.reconciler import reconcile_once
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.helpers import train_spec
from tests.job_rows import add_jobs

SCRAPE_TOKEN = "scrape-token-0123456789"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # JSON logs too: the real worker and gunicorn below show them (shared/log_setup.py).
    return settings.model_copy(update={"metrics_token": SCRAPE_TOKEN, "log_format": "json"})


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


def sample(series: dict, name: str, **labels: str) -> float:
    return series[(name, tuple(sorted(labels.items())))]


def family_names(app: Flask) -> set[str]:
    got = app.test_client().get("/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"})
    return {f.name for f in text_string_to_metric_families(got.get_data(as_text=True))}


def test_every_catalogued_family_is_exported_before_its_first_sample(app: Flask) -> None:
    """Alert rules and dashboards (deploy/monitoring/) find every series from the start."""
    names = family_names(app)
    # The parser names a counter family without its _total suffix.
    assert {s.name.removesuffix("_total") for s in pc.WEB_SERIES} <= names


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_job_on_a_real_worker_moves_the_series(
    app: Flask, settings: Settings, db_url: str, users: TestUsers, start_worker
) -> None:  # type: ignore[no-untyped-def]
    """Wait and run time, attempts, metric points (counted by the worker into Redis),
    slots and consumers (its registry entry), submissions and HTTP requests (the web's
    own counters), the reconciler's pass."""
    before = scrape(app)
    assert sample(before, "trainyard_queue_consumers", queue="cpu") == 0
    assert ("trainyard_job_wait_seconds_count", (("queue", "cpu"),)) not in before
    worker = start_worker("cpu")
    client = as_user(app, users.alice)
    refused = client.post("/api/v1/jobs", json=train_spec(epochs=0))
    assert refused.status_code == 422
    tiny = train_spec(model={"name": "mlp", "params": {"hidden": 16, "layers": 1}}, epochs=2)
    created = client.post("/api/v1/jobs", json=tiny)
    assert created.status_code == 201, created.get_data(as_text=True)
    job_id = created.get_json()["id"]
    deadline = time.monotonic() + 90
    while client.get(f"/api/v1/jobs/{job_id}").get_json()["state"] != "succeeded":
        assert time.monotonic() < deadline, client.get(f"/api/v1/jobs/{job_id}").get_json()
        time.sleep(0.3)
    reconcile_once(settings, make_celery(settings))

    after = scrape(app)
    done = {"queue": "cpu", "kind": "train", "outcome": "succeeded"}
    assert sample(after, "trainyard_job_attempts_finished_total", **done) == 1
    assert sample(after, "trainyard_job_run_seconds_count", **done) == 1
    assert 0 < sample(after, "trainyard_job_run_seconds_sum", **done) < 90
    assert sample(after, "trainyard_job_wait_seconds_count", queue="cpu") == 1
    assert sample(after, "trainyard_job_wait_seconds_bucket", queue="cpu", le="+Inf") == 1
    assert sample(after, "trainyard_metric_points_written_total") >= 2 * 3  # 2 epochs x 3+ keys

    # The web's own counters live as long as this test process (no multiprocess
    # directory here): what this test added.
    def added(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert added("trainyard_submissions_total", kind="train", outcome="accepted") == 1
    assert added("trainyard_submissions_total", kind="train", outcome="invalid") == 1
    post = {"method": "POST", "route": "/api/v1/jobs"}
    assert added("trainyard_http_requests_total", **post, status="201") == 1
    assert added("trainyard_http_requests_total", **post, status="422") == 1
    assert added("trainyard_http_request_duration_seconds_count", **post) == 2
    host = socket.gethostname()
    assert sample(after, "trainyard_worker_slots", host=host, queue="cpu") == 1
    assert sample(after, "trainyard_worker_slots_busy", host=host, queue="cpu") == 0
    assert sample(after, "trainyard_queue_consumers", queue="cpu") == 1
    assert sample(after, "trainyard_worker_nodes", state="online") == 1
    ages = [v for (name, _), v in after.items() if name == "trainyard_worker_heartbeat_age_seconds"]
    assert len(ages) == 1 and 0 <= ages[0] < 20
    assert sample(after, "trainyard_reconciler_actions_total", action="requeued") == 0
    assert abs(sample(after, "trainyard_reconciler_last_pass_timestamp_seconds") - time.time()) < 60
    assert sample(after, "trainyard_artifact_store_free_bytes") > 0
    # Counters only grow: the next scrape (from any process) agrees.
    assert scrape(app)[("trainyard_job_attempts_finished_total", tuple(sorted(done.items())))] == 1

    # TRAINYARD_LOG_FORMAT=json: the worker's log lines are JSON objects (Celery's
    # banner is printed, not logged), and every line about the job names it and its
    # attempt, those of the lease and metric threads included.
    logged = [json.loads(line) for line in worker.log_path.read_text().splitlines()
              if line.startswith("{")]  # fmt: skip
    about = [line for line in logged if line.get("job_id") == job_id]
    assert any(line["message"] == f"job {job_id}: claimed, attempt 1" for line in about), logged
    ours = [line for line in about if not line["logger"].startswith("celery")]
    assert all(line["attempt"] == 1 and line["process"] == "worker" for line in ours)
    # Celery's own "Task ... received" (the main process, before any claim) names it too.
    assert any(line["message"].endswith("received") for line in about), about
    assert any("ready" in line["message"] for line in logged)  # Celery's own lines too


def _requests_to(url: str, route: str, status: str) -> float:
    text = requests.get(
        url + "/metrics", headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}, timeout=10
    ).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "trainyard_http_requests_total" and s.labels == {
                "method": "GET", "route": route, "status": status,
            }:  # fmt: skip
                return s.value
    return 0.0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_counts_add_up_across_gunicorn_processes(settings: Settings, tmp_path: Path) -> None:
    """`trainyard web`'s gunicorn with 2 processes: every scrape, whichever process
    answers it, counts every request served by either; a killed process's counts stay;
    a restarted server starts from zero (its directory is emptied at start)."""
    from tests.test_web_availability import Gunicorn

    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "counter_999999.db").write_bytes(b"left over from a previous run")
    env = {"TRAINYARD_METRICS_TOKEN": SCRAPE_TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir)}
    server = Gunicorn(settings, tmp_path, **env)
    try:
        # TRAINYARD_LOG_FORMAT=json (the settings fixture): gunicorn's lines too.
        booted = [json.loads(line) for line in server.log.read_text().splitlines()]
        assert any(line["message"].startswith("Booting worker") for line in booted), booted
        assert not (prom_dir / "counter_999999.db").exists()
        base = _requests_to(server.url, "/healthz", "200")  # the start-up probes

        def health(n: int) -> None:
            with requests.Session() as http:
                for _ in range(n):
                    assert http.get(server.url + "/healthz", headers={"Connection": "close"}).ok

        def scraped_when_up() -> float:
            deadline = time.monotonic() + 30
            while True:
                try:
                    return _requests_to(server.url, "/healthz", "200")
                except requests.RequestException:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)

        health(30)
        # The process(es) that served them die; gunicorn starts another, which serves
        # the next ones: now at least two processes counted, one of them dead.
        served = [int(p.name.removeprefix("counter_").removesuffix(".db"))
                  for p in prom_dir.glob("counter_*.db")]  # fmt: skip
        assert served
        for pid in served:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        scraped_when_up()
        health(30)
        counter_files = sorted(p.name for p in prom_dir.glob("counter_*.db"))
        assert len(counter_files) >= 2, counter_files
        for _ in range(6):  # several scrapes: they land on either process
            assert scraped_when_up() == base + 60
    finally:
        server.stop()
    restarted = Gunicorn(settings, tmp_path, **env)
    try:
        assert _requests_to(restarted.url, "/healthz", "200") < 60
    finally:
        restarted.stop()


def test_webhook_deliveries_by_status_and_the_oldest_pending(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    from shared.orm import NotificationEvent, Webhook, WebhookDelivery

    assert sample(scrape(app), "trainyard_webhook_oldest_pending_seconds") == 0
    now = utcnow()
    with transaction(db_url) as s:
        hook = Webhook(owner_id=users.alice.id, url="https://example.com/hook", secret="s" * 32,
                       events=["job.failed"])  # fmt: skip
        s.add(hook)
        s.flush()
        for i, (status, age) in enumerate([("pending", 300), ("pending", 20), ("delivered", 900),
                                           ("failed", 5000)]):  # fmt: skip
            s.add(NotificationEvent(event_id=f"job.failed:{i}:1", kind="job.failed",
                                    owner_id=users.alice.id, payload={}))  # fmt: skip
            s.add(WebhookDelivery(webhook_id=hook.id, event_id=f"job.failed:{i}:1", status=status,
                                  created_at=now - timedelta(seconds=age)))  # fmt: skip
    got = scrape(app)
    assert sample(got, "trainyard_webhook_deliveries", status="pending") == 2
    assert sample(got, "trainyard_webhook_deliveries", status="delivered") == 1
    assert sample(got, "trainyard_webhook_deliveries", status="failed") == 1
    assert 299 <= sample(got, "trainyard_webhook_oldest_pending_seconds") < 400
