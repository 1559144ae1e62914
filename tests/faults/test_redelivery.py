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
    and periodically); a second worker then receives the job while the first still
    trains it. The settings refuse a visibility timeout shorter than a minute, so the
    test runs the transport's own sweep with a timeout of zero once the job runs."""
    epochs = 20
    first = cluster.start_worker()
    job_id = cluster.submit(long_spec(epochs=epochs))
    cluster.wait_training(job_id, 1)
    second = cluster.start_worker()  # idle, so it takes the copy at once

    assert restore_unacked(cluster.redis.url) == 1
    wait_for(
        lambda: task_outcomes(cluster.tmp_path).get(job_id, {}).get("duplicate"),
        60,
        "the second worker to receive and drop the redelivered copy",
    )
    assert cluster.job(job_id).state == "running", "the job finished before the redelivery"

    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"})
    assert job.state == "succeeded", cluster.describe(job_id)
    assert job.attempt == 1, "the redelivery must not start a second attempt"
    assert claims_logged(cluster.tmp_path)[job_id] == [1]
    assert dict(task_outcomes(cluster.tmp_path)[job_id]) == {"succeeded": 1, "duplicate": 1}
    assert cluster.epochs_logged(job_id, 1) == list(range(1, epochs + 1))
    assert cluster.point_count(job_id) == cluster.point_count(job_id, attempt=1)
    assert first.proc.poll() is None and second.proc.poll() is None
