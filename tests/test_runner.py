"""The job runner in-process, on each database: claim-once, failures, cancel."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func, select

from shared.celery_app import TRAIN_TASK, make_celery
from shared.db import transaction
from shared.models import Job, MetricPoint
from shared.settings import Settings
from tests.helpers import evaluate_spec, train_spec
from worker.runner import run_job
from worker.tasks import register_tasks

TINY = train_spec(
    model={"name": "mlp", "params": {"hidden": 32, "layers": 1}}, epochs=2, batch_size=64
)


def submit(client, spec: dict) -> int:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def point_count(url: str, job_id: int) -> int:
    with transaction(url) as s:
        return s.scalar(
            select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)
        )


def test_task_delivered_twice_runs_once(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, TINY)
    app = make_celery(settings)
    register_tasks(app, settings)
    first = app.tasks[TRAIN_TASK].apply(args=[job_id]).get()
    points = point_count(settings.resolved_database_url, job_id)
    second = app.tasks[TRAIN_TASK].apply(args=[job_id]).get()
    assert (first, second) == ("succeeded", "duplicate")
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["state"] == "succeeded" and job["attempt"] == 1
    assert point_count(settings.resolved_database_url, job_id) == points > 0


def test_concurrent_deliveries_run_once(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, TINY)
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(run_job(job_id, settings)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate", "succeeded"]
    with transaction(settings.resolved_database_url) as s:
        keys = s.scalars(
            select(MetricPoint.key).where(
                MetricPoint.job_id == job_id, MetricPoint.key == "val_loss"
            )
        ).all()
    assert len(keys) == 2  # one val_loss per epoch, not two runs' worth


def test_a_job_that_raises_is_failed_with_the_error(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    source = submit(client, TINY)
    assert run_job(source, settings) == "succeeded"
    evaluation = submit(client, evaluate_spec(source))
    with transaction(db_url) as s:
        s.get(Job, source).checkpoint_path = "/nonexistent/ckpt"
    assert run_job(evaluation, settings) == "failed"
    job = client.get(f"/api/v1/jobs/{evaluation}").get_json()
    assert job["state"] == "failed" and job["finished_at"]
    assert job["error"]["type"] == "UserError"
    assert "/nonexistent/ckpt" in job["error"]["message"]


def test_cancel_a_running_job(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, train_spec(epochs=500, model={"name": "mlp"}))
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings)))
    thread.start()
    deadline = time.monotonic() + 30
    while client.get(f"/api/v1/jobs/{job_id}").get_json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resp = client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.get_json()["cancel_requested"]
    asked = time.monotonic()
    thread.join(30)
    assert outcome == ["cancelled"]
    # Heartbeat every 1 s in these settings: the loop must notice within a few.
    assert time.monotonic() - asked < 5
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["state"] == "cancelled"


def test_cancelled_queued_job_is_not_run_on_delivery(client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, TINY)
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    assert run_job(job_id, settings) == "duplicate"
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["state"] == "cancelled" and job["attempt"] == 0


def test_a_requeued_job_resumes_from_its_checkpoint(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    from shared.state_machine import requeue_job

    fast = settings.model_copy(update={"heartbeat_seconds": 0.1})
    spec = train_spec(model={"name": "cnn", "params": {"dropout": 0.3}}, epochs=8)
    reference = submit(client, spec)
    assert run_job(reference, fast) == "succeeded"
    expected = client.get(f"/api/v1/jobs/{reference}").get_json()["result"]["metrics"]

    job_id = submit(client, spec)
    outcome: list[str] = []
    first = threading.Thread(target=lambda: outcome.append(run_job(job_id, fast)))
    first.start()
    deadline = time.monotonic() + 60
    while (client.get(f"/api/v1/jobs/{job_id}").get_json()["progress"] or {}).get("epoch", 0) < 3:
        assert time.monotonic() < deadline and first.is_alive()
        time.sleep(0.02)
    # What the reconciler does once a lease has expired: hand the job back.
    with transaction(db_url) as s:
        assert requeue_job(s, job_id, 1, "worker lost")
    first.join(30)
    assert outcome == ["lost"]

    assert run_job(job_id, fast) == "succeeded"
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    metrics = job["result"]["metrics"]
    assert job["attempt"] == 2
    with transaction(db_url) as s:
        assert s.get(Job, job_id).checkpoint_path.endswith("attempt-2")
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 2
    for key in ("train_loss", "val_loss", "val_accuracy", "val_f1", "epochs_run"):
        assert metrics[key] == expected[key], key
