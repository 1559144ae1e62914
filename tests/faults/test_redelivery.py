"""A job that outlives Redis's visibility timeout (issue 4, scenario 3; celery#5935)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import (
    Cluster,
    claims_logged,
    long_spec,
    restore_unacked,
    task_outcomes,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_redelivered_copy_of_a_running_job_does_not_run_it_twice(cluster: Cluster) -> None:
    """Kombu's Redis transport puts a message that stayed unacked longer than the
    visibility timeout back in its queue (each consumer sweeps for them when it connects
    and periodically); another worker then receives the job while the first still
    trains it. The settings refuse a visibility timeout shorter than a minute, so the
    test runs the transport's own sweep with a timeout of zero once the job runs."""
    epochs = 10
    workers = cluster.start_workers(2)  # one takes the job, the other stays idle
    job_id = cluster.submit(long_spec(epochs=epochs))
    holder = cluster.worker_holding(cluster.wait_training(job_id, 1), workers)
    (idle,) = [w for w in workers if w is not holder]

    assert restore_unacked(cluster.redis.url) == 1
    wait_for(
        lambda: task_outcomes(cluster.tmp_path).get(job_id, {}).get("duplicate"),
        60,
        "the idle worker to receive and drop the redelivered copy",
    )
    assert "' duplicate'" not in idle.log_tail() and "'duplicate'" in idle.log_path.read_text()
    assert cluster.job(job_id).state == "running", "the job finished before the redelivery"

    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"})
    assert job.state == "succeeded", cluster.describe(job_id)
    assert job.attempt == 1, "the redelivery must not start a second attempt"
    assert claims_logged(cluster.tmp_path)[job_id] == [1]
    # Celery logs the task's return value just after the runner committed the state.
    outcomes = wait_for(
        lambda: (
            task_outcomes(cluster.tmp_path)[job_id].get("succeeded")
            and dict(task_outcomes(cluster.tmp_path)[job_id])
        ),
        10,
        "the holder to log the task's outcome",
    )
    assert outcomes == {"succeeded": 1, "duplicate": 1}
    assert cluster.epochs_logged(job_id, 1) == list(range(1, epochs + 1))
    assert cluster.point_count(job_id) == cluster.point_count(job_id, attempt=1)
    assert all(w.proc.poll() is None for w in workers)
