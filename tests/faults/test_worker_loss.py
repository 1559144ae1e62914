"""Workers that die or are stopped mid-job (issue 4, scenarios 1, 2 and 4)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.conftest import ON_POSTGRESQL, SQLITE_ONLY
from tests.faults.conftest import (
    TERMINAL,
    Cluster,
    claims_logged,
    long_spec,
    pool_children,
    small_spec,
    task_outcomes,
    wait_for,
    worker_pid,
)

pytestmark = pytest.mark.integration

# Result metrics that must match an uninterrupted run exactly (CPU, same seed, one thread).
SAME_AS_UNINTERRUPTED = (
    "train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "best_metric_value",
    "best_epoch", "epochs_run", "steps",
)  # fmt: skip


@SQLITE_ONLY
def test_killed_worker_group_job_resumes_elsewhere_with_identical_results(cluster: Cluster) -> None:
    """1. SIGKILL a worker's whole process group mid-training: the reconciler requeues the
    job once the lease runs out, another worker resumes it from the checkpoint, and it
    ends exactly as an uninterrupted run of the same spec."""
    spec = long_spec(epochs=10)
    workers = cluster.start_workers(2)
    cluster.start_reconciler()

    # The reference runs on one worker while the job to kill runs on the other.
    reference_id = cluster.submit(spec)
    job_id = cluster.submit(spec)
    wait_for(
        lambda: cluster.job(job_id).state == "running" and cluster.checkpoint(job_id, 1).is_file(),
        90,
        "attempt 1 to write its first checkpoint",
    )
    job = cluster.job(job_id)
    victim = cluster.worker_holding(job, workers)
    survivor = next(w for w in workers if w is not victim)
    killed_at = time.monotonic()
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    assert cluster.job(job_id).state == "running", (
        "the job finished before the kill; make it longer"
    )

    # Noticed after the lease plus a reconcile pass (with slack for a loaded machine).
    wait_for(
        lambda: cluster.job(job_id).attempt >= 2 or cluster.job(job_id).state in TERMINAL,
        60,
        "another attempt to claim the job",
    )
    lease = cluster.timings["lease_seconds"]
    assert time.monotonic() - killed_at < lease + 20, "requeue took far longer than the lease"

    reference = cluster.wait_state(reference_id, {"succeeded", "failed", "cancelled"})
    assert reference.state == "succeeded" and reference.attempt == 1, cluster.describe(reference_id)
    expected = reference.result["metrics"]
    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"})
    assert job.state == "succeeded", cluster.describe(job_id)
    assert job.attempt == 2, cluster.describe(job_id)
    assert worker_pid(job) in pool_children(survivor), (job.worker, cluster.describe(job_id))
    metrics = job.result["metrics"]
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1, metrics
    resumed_ckpt = torch.load(cluster.checkpoint(job_id, 1), map_location="cpu", weights_only=True)
    assert metrics["resumed_from_epoch"] == resumed_ckpt["epoch"]
    for key in SAME_AS_UNINTERRUPTED:
        assert metrics[key] == expected[key], (key, metrics[key], expected[key])
    # The metric history of attempt 1 stops where the kill hit; attempt 2's picks up.
    assert cluster.epochs_logged(job_id, 2) == list(
        range(metrics["resumed_from_epoch"] + 1, spec["epochs"] + 1)
    )


# A lease long enough that a stall on a loaded machine does not hand the job to the
# reconciler before the kill: this is about the kill, not the lease.
@pytest.mark.timings(lease_seconds=10.0)
@SQLITE_ONLY
def test_job_whose_child_is_killed_fails_at_once_and_the_worker_goes_on(cluster: Cluster) -> None:
    """2. The pool child dies under the job by SIGKILL (what the OOM killer does). Before,
    the job waited for its lease, was requeued and killed its next worker, max_attempts
    times. Now the worker's main process sees the signal and records the job failed as
    KilledBySignal on that attempt (docs/architecture.md, "Reliability" R10): no retry,
    and the same worker runs the next job."""
    worker = cluster.start_worker()
    cluster.start_reconciler()
    job_id = cluster.submit(long_spec(epochs=60))

    job = cluster.wait_training(job_id, 1)
    pid = worker_pid(job)
    assert pid in pool_children(worker), (job.worker, pool_children(worker))
    os.kill(pid, signal.SIGKILL)

    job = cluster.wait_state(job_id, {"failed", "succeeded", "cancelled"}, timeout=60)
    assert (job.state, job.attempt, job.error_type) == ("failed", 1, "KilledBySignal"), (
        cluster.describe(job_id)
    )
    assert "killed by signal 9 (SIGKILL), likely out of memory" in job.error_message
    assert worker.proc.poll() is None, "the worker itself survives its children"

    # The worker goes on (with a new pool child) and nothing retries the killed job:
    # not the message Celery would have put back, not the reconciler.
    next_id = cluster.submit(small_spec())
    assert cluster.wait_state(next_id, TERMINAL).state == "succeeded", cluster.describe(next_id)
    time.sleep(4 * cluster.timings["reconcile_seconds"])
    after = cluster.job(job_id)
    assert (after.state, after.attempt) == ("failed", 1)
    assert claims_logged(cluster.tmp_path).get(job_id, []) == [1]
    assert task_outcomes(cluster.tmp_path).get(job_id, {}) == {}


@pytest.mark.timings(lease_seconds=30.0)
@ON_POSTGRESQL
def test_sigterm_hands_the_job_back_promptly_and_it_resumes(cluster: Cluster) -> None:
    """4. SIGTERM to a worker: the running job is checkpointed and handed back in
    seconds, not after the lease (30 s here), the worker exits, and the next worker
    resumes the job from that checkpoint. Twice: first to the main process only (what
    `docker stop` and Kubernetes send), then to the whole process group, pool child
    included (what `trainyard up`, systemd or a Ctrl-C send)."""
    epochs = 50
    cluster.start_reconciler()
    # All three workers boot before the job exists: a successor booting while the job
    # trains made the test a race between boot time and training speed (on a fast machine
    # the job finished before the second signal).
    workers = cluster.start_workers(3)
    job_id = cluster.submit(long_spec(epochs=epochs))
    for attempt, whole_group in ((1, False), (2, True)):
        job = cluster.wait_training(job_id, attempt)
        [worker] = [w for w in workers if worker_pid(job) in pool_children(w)]
        stopped_at = time.monotonic()
        if whole_group:
            os.killpg(worker.proc.pid, signal.SIGTERM)
        else:
            os.kill(worker.proc.pid, signal.SIGTERM)
        job = wait_for(
            lambda n=attempt: (
                j if (j := cluster.job(job_id)).state != "running" or j.attempt > n else None
            ),
            20,
            "the job to be handed back",
        )
        handed_back_after = time.monotonic() - stopped_at
        assert job.state in ("queued", "running"), cluster.describe(job_id)
        assert "shutting down" in (job.error_message or ""), job.error_message
        assert handed_back_after < 10, f"handed back after {handed_back_after:.1f}s"
        worker.proc.wait(20)  # the worker exits too, promptly
        assert time.monotonic() - stopped_at < 25
        handback = torch.load(
            cluster.checkpoint(job_id, attempt), map_location="cpu", weights_only=True
        )
        assert handback["epoch"] < epochs
        workers.remove(worker)

    job = cluster.wait_state(job_id, {"succeeded", "failed", "cancelled"})
    assert job.state == "succeeded", cluster.describe(job_id)
    assert job.attempt == 3
    [last] = workers
    assert worker_pid(job) in pool_children(last)
    metrics = job.result["metrics"]
    # Resumed from the second hand-back's checkpoint, exactly where it stopped.
    assert (metrics["resumed_from_epoch"], metrics["resumed_from_step"]) == (
        handback["epoch"], handback["step"],
    ), metrics  # fmt: skip
    assert metrics["epochs_run"] == epochs
