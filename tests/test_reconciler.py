"""The reconciler against a real database (SQLite and PostgreSQL) and a real Redis.

Time is moved by passing `now` to reconcile_once rather than by sleeping, so the
tests stay fast; messages are read straight from Redis, as kombu stores them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import shared.reconciler as reconciler
from shared.broker import read_messages
from shared.celery_app import make_celery, publish_job, task_id_for
from shared.db import transaction, utcnow
from shared.job_events import job_events
from shared.orm import Job
from shared.reconciler import ReconcileReport, reconcile_once, run_forever
from shared.settings import Settings
from shared.state_machine import claim_job, renew_lease
from tests.conftest import ON_POSTGRESQL, REPO, SQLITE_ONLY, settings_env
from tests.helpers import train_spec

WORKER = "gpu-host-1:4242"


@pytest.fixture
def celery(settings: Settings) -> Celery:
    return make_celery(settings)


def add_job(
    url: str,
    *,
    state: str = "queued",
    attempt: int = 0,
    max_attempts: int = 3,
    lease_expires_at: datetime | None = None,
    worker: str | None = None,
    cancel_requested: bool = False,
    queue: str = "cpu",
) -> int:
    now = utcnow()
    with transaction(url) as session:
        job = Job(
            kind="train",
            state=state,
            queue=queue,
            priority=5,
            spec={"kind": "train", "max_runtime_s": 600},
            attempt=attempt,
            max_attempts=max_attempts,
            lease_expires_at=lease_expires_at,
            worker=worker,
            cancel_requested=cancel_requested,
            started_at=now if state != "queued" else None,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        return job.id


def running_job(url: str, *, attempt: int = 1, expired: bool = True, **kw: Any) -> int:
    lease = utcnow() + (timedelta(seconds=-1) if expired else timedelta(seconds=30))
    return add_job(
        url, state="running", attempt=attempt, lease_expires_at=lease, worker=WORKER, **kw
    )


def get(url: str, job_id: int) -> Job:
    with transaction(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def messages(redis_url: str, queue: str = "cpu") -> Counter[str]:
    """Task ids waiting in a queue's Redis list, with how often each appears."""
    client = redis.Redis.from_url(redis_url)
    try:
        return Counter(json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1))
    finally:
        client.close()


def later(settings: Settings) -> datetime:
    """A moment at which every job queued so far counts as unclaimed for too long."""
    return utcnow() + timedelta(seconds=settings.requeue_after_seconds + 1)


# ----------------------------------------------------------------------------- leases


def test_expired_lease_is_requeued_and_published(settings: Settings, celery: Celery) -> None:
    url = settings.resolved_database_url
    job_id = running_job(url, attempt=1)
    report = reconcile_once(settings, celery)
    assert (report.requeued, report.failed, report.republished) == (1, 0, 0)
    job = get(url, job_id)
    assert job.state == "queued" and job.attempt == 1
    assert job.lease_expires_at is None and job.worker is None
    assert job.error_message == f"lease expired on worker {WORKER}; requeued (attempt 2 of 3)"
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}
    # The next claim takes it, with the next fencing token.
    with transaction(url) as session:
        claim = claim_job(session, job_id, "other:1", settings.lease_seconds)
        timeline = [(e.kind, e.attempt, e.worker) for e in job_events(session, job_id)]
    assert claim is not None and claim.attempt == 2
    assert timeline == [("requeued", 1, WORKER), ("claimed", 2, "other:1")]


def test_no_attempts_left_fails_with_the_reason(settings: Settings, celery: Celery) -> None:
    url = settings.resolved_database_url
    job_id = running_job(url, attempt=3, max_attempts=3)
    report = reconcile_once(settings, celery)
    assert (report.requeued, report.failed) == (0, 1)
    job = get(url, job_id)
    assert job.state == "failed" and job.error_type == "WorkerLost"
    assert job.error_message == (
        f"worker lost on attempt 3 of 3, no attempts left; last seen on {WORKER}"
    )
    assert job.finished_at is not None and job.lease_expires_at is None
    assert not messages(settings.redis_url)
    with transaction(url) as session:
        [event] = job_events(session, job_id)
    assert (event.kind, event.attempt) == ("failed", 3) and "WorkerLost" in event.message
    # Terminal: later passes leave it alone.
    assert not reconcile_once(settings, celery, now=later(settings)).acted


def test_a_live_lease_is_left_alone(settings: Settings, celery: Celery) -> None:
    url = settings.resolved_database_url
    job_id = running_job(url, expired=False)
    report = reconcile_once(settings, celery)
    assert not report.acted
    assert get(url, job_id).state == "running"
    assert not messages(settings.redis_url)


def test_a_lease_renewed_during_the_pass_is_not_touched(
    settings: Settings, celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = settings.resolved_database_url
    job_id = running_job(url, attempt=1)
    select_rows = reconciler._select_rows

    def select_then_heartbeat(*args: Any) -> Any:
        rows = select_rows(*args)
        # The worker was only slow: its heartbeat lands between the read and the UPDATE.
        with transaction(url) as session:
            assert renew_lease(session, job_id, 1, settings.lease_seconds).owned
        return rows

    monkeypatch.setattr(reconciler, "_select_rows", select_then_heartbeat)
    report = reconcile_once(settings, celery)
    assert not report.acted
    job = get(url, job_id)
    assert job.state == "running" and job.attempt == 1 and job.worker == WORKER
    assert not messages(settings.redis_url)


def test_a_requeued_job_still_waiting_in_redis_is_not_published_twice(
    settings: Settings, celery: Celery
) -> None:
    # reject_on_worker_lost put the message back, but no worker has picked it up yet.
    url = settings.resolved_database_url
    job_id = running_job(url, attempt=1)
    publish_job(celery, job_id, "train", "cpu")
    assert reconcile_once(settings, celery).requeued == 1
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}


# ----------------------------------------------------------------------------- lost messages


def test_a_queued_job_whose_message_waits_is_not_republished(
    settings: Settings, celery: Celery
) -> None:
    url = settings.resolved_database_url
    job_id = add_job(url)
    publish_job(celery, job_id, "train", "cpu")
    report = reconcile_once(settings, celery, now=later(settings))
    assert report.republished == 0 and report.broker_error is None
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}


def test_a_freshly_reserved_message_counts_but_a_stale_one_does_not(
    settings: Settings, celery: Celery
) -> None:
    """Reserved (unacked) by a worker: fine while it is about to claim; if it reserved
    long ago and never claimed, it died in between and Redis would wait hours."""
    url = settings.resolved_database_url
    job_id = add_job(url)
    publish_job(celery, job_id, "train", "cpu")
    with celery.connection_for_read() as conn:
        # What a worker does with acks_late: take the message, leave it unacked.
        message = conn.default_channel.basic_get("cpu", no_ack=False)
        assert message is not None and message.headers["id"] == task_id_for(job_id)
        client = redis.Redis.from_url(settings.redis_url)
        view = read_messages(client, ["cpu"])
        client.close()
        assert task_id_for(job_id) in view.reserved and not view.waiting
        assert not messages(settings.redis_url)

        soon = utcnow() + timedelta(seconds=settings.requeue_after_seconds / 2)
        with transaction(url) as session:  # unclaimed for long enough, reserved recently
            session.get(Job, job_id).updated_at = utcnow() - timedelta(days=1)
        assert reconcile_once(settings, celery, now=soon).republished == 0

        much_later = utcnow() + timedelta(seconds=settings.requeue_after_seconds * 3)
        assert reconcile_once(settings, celery, now=much_later).republished == 1
        assert messages(settings.redis_url) == {task_id_for(job_id): 1}


def test_a_message_whose_job_another_message_ran_stands_in_for_that_one(
    settings: Settings, celery: Celery
) -> None:
    """A slot took x's message and ran y, the better-ranked job (shared/scheduling.py):
    y's message still waits and will run x, so x is not republished (R11). Once y's
    message is gone too, x is."""
    url = settings.resolved_database_url
    x, y = add_job(url), add_job(url)
    publish_job(celery, y, "train", "cpu")  # x's message was taken and acknowledged
    with transaction(url) as session:
        assert claim_job(session, y, WORKER, 3600) is not None
    report = reconcile_once(settings, celery, now=later(settings))
    assert report.republished == 0 and report.broker_error is None
    assert messages(settings.redis_url) == {task_id_for(y): 1}

    redis.Redis.from_url(settings.redis_url).delete("cpu")
    report = reconcile_once(settings, celery, now=later(settings))
    assert report.job_ids == {"republished": [x]}
    assert messages(settings.redis_url) == {task_id_for(x): 1}


def test_after_flushall_each_job_is_republished_exactly_once(
    settings: Settings, celery: Celery
) -> None:
    url = settings.resolved_database_url
    ids = [add_job(url), add_job(url, queue="gpu")]
    for job_id, queue in zip(ids, ("cpu", "gpu"), strict=True):
        publish_job(celery, job_id, "train", queue)
    redis.Redis.from_url(settings.redis_url).flushall()  # Redis lost everything

    now = later(settings)
    first = reconcile_once(settings, celery, now=now)
    second = reconcile_once(settings, celery, now=now + timedelta(seconds=1))
    assert (first.republished, second.republished) == (2, 0)
    assert first.job_ids["republished"] == ids
    assert messages(settings.redis_url, "cpu") == {task_id_for(ids[0]): 1}
    assert messages(settings.redis_url, "gpu") == {task_id_for(ids[1]): 1}
    for job_id in ids:
        assert get(url, job_id).state == "queued"


def test_a_job_is_not_republished_before_requeue_after(settings: Settings, celery: Celery) -> None:
    # The server may still be between commit and enqueue: give it requeue_after_seconds.
    job_id = add_job(settings.resolved_database_url)
    assert reconcile_once(settings, celery).republished == 0
    assert not messages(settings.redis_url)
    assert reconcile_once(settings, celery, now=later(settings)).job_ids == {
        "republished": [job_id]
    }


def test_a_job_stored_while_redis_was_down_is_published_once_it_is_back(
    settings: Settings, celery: Celery, auth_headers: dict[str, str]
) -> None:
    from server.app import create_app

    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    resp = (
        create_app(dead).test_client().post("/api/v1/jobs", json=train_spec(), headers=auth_headers)
    )
    assert resp.status_code == 201
    job_id = resp.get_json()["id"]
    assert not messages(settings.redis_url)

    # Still down: reported, not raised, and the job is left for a later pass.
    down = reconcile_once(dead, make_celery(dead), now=later(settings))
    assert down.broker_error and "ConnectionError" in down.broker_error
    assert down.republished == 0

    up = reconcile_once(settings, celery, now=later(settings))
    assert up.republished == 1 and up.broker_error is None
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}


def test_expired_lease_with_redis_down_is_requeued_and_published_later(
    settings: Settings, celery: Celery
) -> None:
    url = settings.resolved_database_url
    job_id = running_job(url)
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    report = reconcile_once(dead, make_celery(dead))
    assert report.requeued == 1 and report.broker_error
    assert get(url, job_id).state == "queued"
    assert reconcile_once(settings, celery, now=later(settings)).republished == 1
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}


# ----------------------------------------------------------------------------- cancel


def test_cancelled_jobs_are_never_republished(settings: Settings, celery: Celery) -> None:
    url = settings.resolved_database_url
    done = add_job(url, state="cancelled", cancel_requested=True)
    # A worker handed the job back just as a cancel came in: no claim will take it.
    handed_back = add_job(url, attempt=1, cancel_requested=True)
    # Cancel asked, then the worker died before it noticed.
    orphan = running_job(url, cancel_requested=True)

    report = reconcile_once(settings, celery, now=later(settings))
    assert (report.cancelled, report.requeued, report.republished) == (2, 0, 0)
    assert get(url, done).state == "cancelled"
    assert get(url, handed_back).state == "cancelled"
    job = get(url, orphan)
    assert job.state == "cancelled" and job.finished_at is not None
    assert WORKER in (job.error_message or "")
    assert not messages(settings.redis_url)


def test_a_queued_job_without_attempts_left_fails(settings: Settings, celery: Celery) -> None:
    # Handed back (worker shutdown) on its last attempt: no claim can ever take it.
    url = settings.resolved_database_url
    job_id = add_job(url, attempt=3, max_attempts=3)
    assert reconcile_once(settings, celery).failed == 1
    job = get(url, job_id)
    assert job.state == "failed" and job.error_type == "AttemptsExhausted"
    assert not messages(settings.redis_url)


# ----------------------------------------------------------------------------- concurrency


def test_two_reconcilers_at_once_act_once_per_job(settings: Settings) -> None:
    url = settings.resolved_database_url
    expired = [running_job(url) for _ in range(10)]
    out_of_attempts = [running_job(url, attempt=3) for _ in range(5)]
    lost = [add_job(url) for _ in range(10)]
    now = later(settings)
    reports: list[ReconcileReport] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def one() -> None:
        celery = make_celery(settings)
        barrier.wait()
        try:
            reports.append(reconcile_once(settings, celery, now=now))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sum(r.requeued for r in reports) == len(expired)
    assert sum(r.failed for r in reports) == len(out_of_attempts)
    assert sum(r.republished for r in reports) == len(lost)
    assert messages(settings.redis_url) == {task_id_for(i): 1 for i in expired + lost}
    # A pass after them finds nothing left to do.
    assert not reconcile_once(settings, make_celery(settings), now=now).acted


# ----------------------------------------------------------------------------- processes


def test_run_forever_survives_a_failing_database(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'missing' / 'dir' / 'db.sqlite'}",
        redis_url=redis_url,
        reconcile_seconds=0.05,
    )
    alive = tmp_path / "alive"
    stop = threading.Event()
    thread = threading.Thread(target=run_forever, args=(settings, stop, alive))
    with caplog.at_level(logging.ERROR, logger="shared.reconciler"):
        thread.start()
        deadline = time.monotonic() + 10
        while sum("reconcile pass failed" in r.message for r in caplog.records) < 3:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert alive.exists()


@SQLITE_ONLY
def test_reconcile_command_once(settings: Settings) -> None:
    job_id = running_job(settings.resolved_database_url)
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "reconcile", "--once"],
        cwd=REPO,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "requeued=1 failed=0 republished=0" in out.stdout
    assert f"reconciler: job {job_id} requeued" in out.stderr
    assert messages(settings.redis_url) == {task_id_for(job_id): 1}


@ON_POSTGRESQL
def test_reconcile_command_stops_on_sigterm(settings: Settings) -> None:
    env = {**settings_env(settings), "TRAINYARD_RECONCILE_SECONDS": "0.2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "reconcile"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        job_id = running_job(settings.resolved_database_url)
        deadline = time.monotonic() + 30
        while get(settings.resolved_database_url, job_id).state != "queued":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "reconciler stopped" in output
