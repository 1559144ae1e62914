"""The invariant check that runs after every fault test must see what it looks for."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
from sqlalchemy import delete

from server.cli.local.embedded_redis import LocalRedis
from shared.celery_app import make_celery, publish_job
from shared.db import transaction, utcnow
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from tests.faults.conftest import check_invariants


def _job(job_id: int, state: str, attempt: int = 1, **values: object) -> Job:
    return Job(
        id=job_id, kind="train", state=state, queue="cpu", spec={}, attempt=attempt,
        max_attempts=3, **values,
    )  # fmt: skip


def _point(job_id: int, attempt: int, epoch: int) -> MetricPoint:
    return MetricPoint(
        job_id=job_id, attempt=attempt, key="val_loss", step=epoch, epoch=epoch, value=1.0,
        wall_time=0.0,
    )  # fmt: skip


def test_each_violation_is_reported(
    settings: Settings, db_url: str, local_redis: LocalRedis, tmp_path: Path
) -> None:
    now = utcnow()
    good_dir = tmp_path / "jobs" / "7" / "attempt-2"
    good_dir.mkdir(parents=True)
    torch.save({"epoch": 3}, good_dir / "last.pt")
    metrics = {"epochs_run": 3, "resumed_from_epoch": None}
    with transaction(db_url) as s:
        s.add_all([
            _job(1, "queued", attempt=0),  # no message anywhere
            _job(2, "running", lease_expires_at=now - timedelta(seconds=1)),
            _job(3, "failed", attempt=4, finished_at=now),
            _job(4, "succeeded", finished_at=now, result={"metrics": metrics},
                 checkpoint_path=str(tmp_path / "jobs" / "4" / "attempt-1")),  # no last.pt
            _job(5, "succeeded", finished_at=now, result={"metrics": metrics},
                 checkpoint_path=str(good_dir)),
            _job(6, "queued", attempt=0),  # its message is in Redis: fine
            _job(8, "failed", attempt=3, finished_at=now),  # the worker and the reconciler
            _job(7, "succeeded", attempt=2, finished_at=now,
                 result={"metrics": {"epochs_run": 3, "resumed_from_epoch": 1}},
                 checkpoint_path=str(good_dir)),  # fine
        ])  # fmt: skip
        s.flush()
        s.add_all([_point(4, 1, e) for e in (1, 2, 2, 3)] + [_point(7, 2, e) for e in (2, 3)])
    (tmp_path / "worker-0.log").write_text(
        "[INFO/ForkPoolWorker-1] job 5 attempt 1: succeeded\n"
        "[INFO/ForkPoolWorker-1] job 5 attempt 1: succeeded\n"
        "[INFO/ForkPoolWorker-1] job 7 attempt 2: succeeded\n"
        "[INFO/ForkPoolWorker-1] job 4 attempt 1: succeeded\n"
        "[INFO/ForkPoolWorker-1] job 8 attempt 3: failed\n"
        # A message's return value names the message's job, not the one it ran: ignored.
        "Task trainyard.train[trainyard-job-9] succeeded in 1.0s: 'succeeded'\n"
    )
    (tmp_path / "reconciler-0.log").write_text(
        "INFO reconciler: job 8 failed: worker lost on attempt 3 of 3, no attempts left\n"
    )
    celery = make_celery(settings)
    publish_job(celery, 6, "train", "cpu")
    celery.close()

    problems = check_invariants(db_url, local_redis, tmp_path)
    text = "\n".join(problems)
    assert "job 1 (queued, attempt 0/3): queued but no message" in text
    assert "job 2 (running, attempt 1/3): running under an expired lease" in text
    assert "job 3 (failed, attempt 4/3): more attempts than max_attempts" in text
    assert "job 4 attempt 1: 2 points for val_loss at step 2" in text
    assert "job 4 (succeeded, attempt 1/3): final attempt's val_loss epochs [1, 2, 2, 3]" in text
    assert "job 4 (succeeded, attempt 1/3)" in text and "last.pt does not load" in text
    assert "job 5 (succeeded, attempt 1/3): finished 2 times" in text
    assert "job 5 (succeeded, attempt 1/3): final attempt's val_loss epochs []" in text
    assert "job 5 (succeeded, attempt 1/3): checkpoint_path" in text  # attempt-2 is not its
    assert "job 8 (failed, attempt 3/3): finished 2 times" in text
    assert not [p for p in problems if p.startswith(("job 6 ", "job 7 "))], problems

    # Leave nothing behind for the check that runs after this test.
    with transaction(db_url) as s:
        s.execute(delete(MetricPoint))
        s.execute(delete(Job))
    (tmp_path / "worker-0.log").unlink()
    (tmp_path / "reconciler-0.log").unlink()
