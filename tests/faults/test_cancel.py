"""Cancel a queued job and a running one (issue 4, scenario 8)."""

from __future__ import annotations

import time

import pytest
import torch

from shared.celery_app import task_id_for
from tests.conftest import ON_POSTGRESQL
from tests.faults.conftest import Cluster, claims_logged, long_spec, task_outcomes, wait_for

pytestmark = pytest.mark.integration


@ON_POSTGRESQL
def test_cancel_queued_then_running(cluster: Cluster) -> None:
    cluster.start_reconciler()

    # Queued, no worker up: cancelled at once; the message a worker gets later is dropped.
    queued = cluster.submit(long_spec(epochs=3))
    resp = cluster.cancel(queued)
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "cancelled"
    assert cluster.job(queued).state == "cancelled"

    cluster.start_worker()
    wait_for(
        lambda: task_outcomes(cluster.tmp_path).get(queued, {}).get("duplicate"),
        60,
        "the worker to receive the cancelled job's message and drop it",
    )
    assert task_id_for(queued) not in cluster.broker_task_ids()
    job = cluster.job(queued)
    assert (job.state, job.attempt, job.started_at) == ("cancelled", 0, None)
    assert queued not in claims_logged(cluster.tmp_path)

    # Running: the loop sees the flag at its next heartbeat, checkpoints and stops.
    running = cluster.submit(long_spec(epochs=60))
    cluster.wait_training(running, 1)
    asked = time.monotonic()
    resp = cluster.cancel(running)
    assert resp.status_code == 200, resp.text
    job = cluster.wait_state(running, {"cancelled", "succeeded", "failed"}, timeout=30)
    took = time.monotonic() - asked
    assert job.state == "cancelled", cluster.describe(running)
    assert took < 5, f"cancel took {took:.1f}s"
    assert job.attempt == 1 and job.finished_at is not None
    last = torch.load(cluster.checkpoint(running, 1), map_location="cpu", weights_only=True)
    assert last["epoch"] < 60, "the job ran to the end instead of stopping"

    # The reconciler leaves both alone afterwards.
    time.sleep(3 * cluster.timings["reconcile_seconds"])
    assert [cluster.job(i).state for i in (queued, running)] == ["cancelled", "cancelled"]
