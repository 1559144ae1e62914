"""The job runner in-process, on each database: claim-once, failures, cancel."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from sqlalchemy import func, select

from shared.celery_app import TRAIN_TASK, make_celery
from shared.dataset_catalog import CatalogContext
from shared.db import transaction
from shared.job_events import job_events
from shared.job_files import job_dir, log_path
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from shared.spec import parse_spec, spec_to_json
from tests.conftest import SQLITE_ONLY, as_user
from tests.helpers import evaluate_spec, train_spec
from worker import runner
from worker.job_log import EpochLogSink, JobLog
from worker.runner import checkpoint_dir, run_job, worker_name
from worker.tasks import register_tasks
from worker.training import ListSink

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
    app, client, settings: Settings, db_url: str, users
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
    # The owner (a member) is told what failed, without the server's path; an admin
    # sees the path in the detail.
    assert job["error"]["message"].endswith("not found: <path>/best.pt")
    assert "/nonexistent" not in str(job)
    admin_view = as_user(app, users.admin).get(f"/api/v1/jobs/{evaluation}").get_json()
    assert "/nonexistent/ckpt/best.pt" in admin_view["error"]["detail"]


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


@SQLITE_ONLY
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
        # The timeline tells the same story, in order.
        events = [(e.kind, e.attempt) for e in job_events(s, job_id)]
        resumed = [e.message for e in job_events(s, job_id) if e.kind == "resumed"]
    assert events == [
        ("claimed", 1),
        ("requeued", 1),
        ("claimed", 2),
        ("resumed", 2),
        ("succeeded", 2),
    ]
    assert resumed == ["attempt-1/last.pt"]
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 2
    for key in ("train_loss", "val_loss", "val_accuracy", "val_f1", "epochs_run"):
        assert metrics[key] == expected[key], key


# -- the job log ----------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[attempt (\d+)\] (.*)$")


def insert_job(settings: Settings, spec: dict[str, Any], **columns: Any) -> int:
    """A queued job row written straight to the database, without the HTTP API."""
    parsed = parse_spec(spec, CatalogContext(data_dir=settings.resolved_data_dir))
    with transaction(settings.resolved_database_url) as s:
        job = Job(
            kind=parsed.kind, state="queued", queue=parsed.queue, spec=spec_to_json(parsed),
            max_attempts=settings.max_attempts, **columns,
        )  # fmt: skip
        s.add(job)
        s.flush()
        return job.id


def log_events(settings: Settings, job_id: int) -> list[str]:
    """The job log's messages, each line checked for the timestamp and attempt prefix."""
    events = []
    for line in log_path(settings, job_id).read_text().splitlines():
        match = LOG_LINE.match(line)
        assert match, line
        events.append(match.group(2))
    return events


def test_runner_checkpoints_live_in_the_job_dir(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    assert checkpoint_dir(settings, 3, 2) == job_dir(settings, 3) / "attempt-2"


def test_job_log_of_a_train_job(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.training")
    job_id = insert_job(settings, TINY)
    assert run_job(job_id, settings) == "succeeded"
    events = log_events(settings, job_id)
    assert events[0].startswith(f"claimed by {worker_name()} on ")
    epochs = [e for e in events if e.startswith("epoch ")]
    assert [e.split(":")[0] for e in epochs] == ["epoch 1/2", "epoch 2/2"]
    for line in epochs:
        assert all(f" {key}=" in line for key in ("train_loss", "val_loss", "val_accuracy"))
        assert "step_loss" not in line
    # The training code's own INFO lines land in the job log too.
    assert any(e.startswith("training mlp on digits") for e in events)
    assert events[-1].startswith("succeeded: train_loss=")
    assert " epochs_run=2 " in events[-1]


def test_job_log_of_a_failed_job(settings: Settings) -> None:
    source = insert_job(settings, TINY)
    with transaction(settings.resolved_database_url) as s:
        row = s.get(Job, source)
        row.state, row.checkpoint_path = "succeeded", "/nonexistent/ckpt"
    job_id = insert_job(settings, evaluate_spec(source), source_job_id=source)
    assert run_job(job_id, settings) == "failed"
    events = log_events(settings, job_id)
    assert events[0].startswith("claimed by ")
    assert events[-1].startswith("failed: UserError: ")
    assert "/nonexistent/ckpt" in events[-1]
    assert not any(e.startswith("Traceback") for e in events)  # a user error: message only


def test_job_log_of_a_code_error_has_the_traceback(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_a: Any, **_k: Any) -> None:
        raise ValueError("shapes do not match")

    monkeypatch.setattr(runner, "train_job", broken)
    job_id = insert_job(settings, TINY)
    assert run_job(job_id, settings) == "failed"
    events = log_events(settings, job_id)
    failed = events.index("failed: ValueError: shapes do not match")
    # Detail lines (shared/redaction.py): kept in the log, shown to admins only.
    assert events[failed + 1] == "| Traceback (most recent call last):"
    assert events[-1] == "| ValueError: shapes do not match"


def test_job_log_of_an_infrastructure_failure(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(*_a: Any, **_k: Any) -> None:
        raise sqlalchemy.exc.OperationalError("UPDATE jobs", {}, ConnectionError("refused"))

    monkeypatch.setattr(runner, "train_job", database_gone)
    job_id = insert_job(settings, TINY)
    assert run_job(job_id, settings) == "requeued"
    events = log_events(settings, job_id)
    assert events[-1].startswith(
        "requeued after an infrastructure failure: InfrastructureError: database unavailable"
    )


def test_job_log_events_and_training_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.training")
    training = logging.getLogger("worker.training.train")
    path = tmp_path / "jobs" / "1" / "job.log"
    with JobLog(path, 1, 2) as job_log:
        job_log.event("two\nlines")
        training.info("from the job's thread")
        training.debug("too detailed")
        training.warning("careful")
        other = threading.Thread(target=lambda: training.info("another job's thread"))
        other.start()
        other.join()
    training.info("after the job")
    lines = path.read_text().splitlines()
    assert all(LOG_LINE.match(line).group(1) == "2" for line in lines)  # type: ignore[union-attr]
    assert [LOG_LINE.match(line).group(2) for line in lines] == [  # type: ignore[union-attr]
        "two",
        "lines",
        "from the job's thread",
        "warning: careful",
    ]


def test_job_log_write_failure_never_fails_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "jobs").write_text("a file where the job directory should be")
    job_log = JobLog(tmp_path / "jobs" / "1" / "job.log", 1, 1)
    with job_log:
        for _ in range(3):
            job_log.event("lost to the void")
    warnings = [r for r in caplog.records if "cannot write the job log" in r.getMessage()]
    assert len(warnings) == 1


def test_epoch_log_sink_writes_one_line_per_epoch(tmp_path: Path) -> None:
    inner = ListSink()
    path = tmp_path / "job.log"
    with JobLog(path, 1, 1) as job_log:
        sink = EpochLogSink(inner, job_log)
        sink.log("step_loss", 0.9, step=1, epoch=1)
        sink.progress({"epoch": 1, "epochs": 2})  # mid-epoch: nothing to write yet
        sink.log("train_loss", 0.5, step=1, epoch=1)
        sink.log("val_accuracy", 0.875, step=1, epoch=1)
        sink.progress({"epoch": 1, "epochs": 2})
        sink.log("train_loss", 0.25, step=2, epoch=2)
        sink.flush()
    assert len(inner.points) == 4 and len(inner.progress_updates) == 2
    messages = [LOG_LINE.match(x).group(2) for x in path.read_text().splitlines()]  # type: ignore[union-attr]
    assert messages == [
        "epoch 1/2: train_loss=0.5 val_accuracy=0.875",
        "epoch 2/2: train_loss=0.25",
    ]
