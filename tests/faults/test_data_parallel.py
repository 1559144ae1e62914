"""Data-parallel jobs through real workers (issue 12, "Multi-GPU jobs"), on CPU: the
`resources.processes` mode trains with gloo through the code path a multi-GPU job takes
with NCCL (docs/architecture.md, "Data-parallel jobs").

Tolerance of the loss-curve comparison: relative 1e-5 per point. With the same global
batch, a 2-process step computes the gradient of the same mean loss as the 1-process
step (each rank's share is weighted by its size, also for the uneven last batch); what
differs is only float32 rounding (two partial gradients averaged instead of one
full-batch mean). Measured on this spec: at most 3.6e-8 (step_loss), 1.8e-8
(train_loss), 8.9e-8 (val_loss), 0 (val_accuracy). 1e-5 leaves two orders of magnitude
for other CPUs and kernels, and stays well below what a real mistake does: with the
shares left unweighted the same comparison is off by 1.0e-3 (step_loss), 3.9e-4
(train_loss) and 6.2e-4 (val_loss); a lost, doubled or misassigned sample does more. The
model has no dropout: ranks draw their own dropout masks, so a dropout model's curve
differs by design.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from sqlalchemy import select

from shared.db import transaction
from shared.job_files import log_path
from shared.orm import MetricPoint
from tests.conftest import ON_POSTGRESQL, SQLITE_ONLY
from tests.faults.conftest import (
    TERMINAL,
    Cluster,
    long_spec,
    pool_children,
    wait_for,
    worker_pid,
)
from tests.helpers import train_spec

pytestmark = pytest.mark.integration

RELATIVE_TOLERANCE = 1e-5
# 31 does not divide the training split: the last batch of each epoch is uneven across
# the ranks, which the weighting must get right.
MATCH_SPEC = train_spec(
    model={"name": "mlp", "params": {"hidden": 32, "layers": 1}},
    epochs=3,
    batch_size=31,
    optimizer={"name": "adam", "lr": 0.003},
)
SERIES = ("step_loss", "train_loss", "val_loss", "val_accuracy")
# Must equal an uninterrupted 2-process run's exactly (CPU, same seed, one thread each).
SAME_AS_UNINTERRUPTED = (
    "train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "best_metric_value",
    "best_epoch", "epochs_run", "steps",
)  # fmt: skip


def rank_processes(
    cluster: Cluster, job_id: int, attempt: int | None = None
) -> list[psutil.Process]:
    """The live rank processes (ranks 1..) of one of this cluster's jobs, found by their
    command line and their database: other test processes run job 1 at the same time."""
    label = f"job-{job_id}-attempt-{attempt}" if attempt else f"job-{job_id}-attempt-"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "worker.rank_process" not in cmdline:
            continue
        if not any(arg.startswith(label) for arg in cmdline):
            continue
        try:
            database = proc.environ().get("TRAINYARD_DATABASE_URL")
        except psutil.Error:
            continue  # gone meanwhile
        if database == cluster.db_url:
            found.append(proc)
    return found


def series(cluster: Cluster, job_id: int, key: str) -> list[tuple[int, float]]:
    with transaction(cluster.db_url) as s:
        rows = s.execute(
            select(MetricPoint.step, MetricPoint.value)
            .where(MetricPoint.job_id == job_id, MetricPoint.key == key)
            .order_by(MetricPoint.step)
        ).all()
    return [(int(step), float(value)) for step, value in rows]


@ON_POSTGRESQL
def test_two_process_job_matches_the_one_process_run(cluster: Cluster) -> None:
    """A 2-process gloo job trains through a real worker, its loss curve matches the
    1-process run with the same global batch (RELATIVE_TOLERANCE, see the module
    docstring), and no rank process outlives it."""
    cluster.start_worker()
    single = cluster.submit(MATCH_SPEC)
    double = cluster.submit({**MATCH_SPEC, "resources": {"processes": 2}})
    one = cluster.wait_state(single, TERMINAL)
    two = cluster.wait_state(double, TERMINAL)
    assert (one.state, two.state) == ("succeeded", "succeeded"), cluster.describe()
    assert not rank_processes(cluster, double), "a rank process outlived its job"

    m1, m2 = one.result["metrics"], two.result["metrics"]
    assert (m1["device"], m2["device"]) == ("cpu", "2 x cpu")
    assert m2["steps"] == m1["steps"] and m2["epochs_run"] == m1["epochs_run"] == 3
    for key in SERIES:
        a, b = series(cluster, single, key), series(cluster, double, key)
        assert a and [s for s, _ in a] == [s for s, _ in b], (key, a, b)
        for (step, x), (_, y) in zip(a, b, strict=True):
            assert abs(x - y) <= RELATIVE_TOLERANCE * max(abs(x), 1e-12), (key, step, x, y)
    assert "training data-parallel in 2 processes" in log_path(cluster.settings, double).read_text()


@SQLITE_ONLY
def test_cancel_stops_every_rank(cluster: Cluster) -> None:
    """Cancel reaches rank 0 through the lease; rank 0's broadcast stops the others at
    the same step: the job ends cancelled with a checkpoint and no rank left."""
    cluster.start_worker()
    job_id = cluster.submit(long_spec(epochs=200, resources={"processes": 2}))
    cluster.wait_training(job_id, 1)
    ranks = wait_for(lambda: rank_processes(cluster, job_id, 1), 30, "the job's rank 1 process")
    resp = cluster.cancel(job_id)
    assert resp.status_code == 200, resp.text
    job = cluster.wait_state(job_id, TERMINAL, timeout=60)
    assert job.state == "cancelled", cluster.describe(job_id)
    last = torch.load(cluster.checkpoint(job_id, 1), map_location="cpu", weights_only=True)
    assert last["epoch"] < 200 and last["world_size"] == 2
    assert len(last["rng"]["ranks"]) == 2
    for proc in ranks:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    assert not rank_processes(cluster, job_id)


# Once, on PostgreSQL: a lease expiry and a reclaim are the database's part here.
# A 10 s lease, not the fault suite's 3 s: two 2-process jobs start at once here (four
# processes importing torch), and on a loaded 2-core machine a stall of over 3 s cost
# both attempts their leases before the kill (seen once in CI), so the kill met no ranks.
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
@pytest.mark.timings(lease_seconds=10.0)
def test_killed_worker_job_resumes_elsewhere_and_leaves_no_rank_behind(
    cluster: Cluster,
) -> None:
    """SIGKILL the worker's main process and then its pool child (rank 0), but not the
    rank processes: they die with rank 0 (parent-death signal), the reconciler requeues
    the job once its lease runs out, another worker resumes it from the checkpoint with
    every rank's RNG state, and it ends exactly as an uninterrupted 2-process run."""
    spec = long_spec(epochs=8, resources={"processes": 2})
    workers = cluster.start_workers(2)
    cluster.start_reconciler()
    reference_id = cluster.submit(spec)
    job_id = cluster.submit(spec)
    wait_for(
        lambda: cluster.job(job_id).state == "running" and cluster.checkpoint(job_id, 1).is_file(),
        120,
        "attempt 1 to write its first checkpoint",
    )
    job = cluster.job(job_id)
    victim = cluster.worker_holding(job, workers)
    survivor = next(w for w in workers if w is not victim)
    ranks = wait_for(lambda: rank_processes(cluster, job_id, 1), 30, "the job's rank 1 process")
    os.kill(victim.proc.pid, signal.SIGKILL)
    os.kill(worker_pid(job), signal.SIGKILL)  # type: ignore[arg-type]
    victim.proc.wait(10)
    wait_for(
        lambda: all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in ranks),
        20,
        "the killed worker's rank processes to die with it",
    )
    assert cluster.job(job_id).state == "running", "the job ended before the kill; make it longer"

    reference = cluster.wait_state(reference_id, TERMINAL, timeout=240)
    assert reference.state == "succeeded", cluster.describe(reference_id)
    job = cluster.wait_state(job_id, TERMINAL, timeout=240)
    assert (job.state, job.attempt) == ("succeeded", 2), cluster.describe(job_id)
    assert worker_pid(job) in pool_children(survivor)
    metrics, expected = job.result["metrics"], reference.result["metrics"]
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    for key in SAME_AS_UNINTERRUPTED:
        assert metrics[key] == expected[key], (key, metrics[key], expected[key])
    time.sleep(0.5)
    assert not rank_processes(cluster, job_id), "a rank process outlived its job"


@SQLITE_ONLY
@pytest.mark.timings(lease_seconds=30.0)
def test_sigterm_to_the_worker_group_hands_the_job_back_with_every_rank_stopped(
    cluster: Cluster,
) -> None:
    """SIGTERM to the worker's whole process group (Ctrl-C, systemd) reaches the rank
    processes too: they ignore it, rank 0 checkpoints and hands the job back within
    seconds (not after the 30 s lease), and then every rank is gone."""
    worker = cluster.start_worker()
    job_id = cluster.submit(long_spec(epochs=200, resources={"processes": 2}))
    cluster.wait_training(job_id, 1)
    wait_for(lambda: rank_processes(cluster, job_id, 1), 30, "the job's rank 1 process")
    os.killpg(worker.proc.pid, signal.SIGTERM)
    job = wait_for(
        lambda: j if (j := cluster.job(job_id)).state != "running" else None,
        20,
        "the job to be handed back",
    )
    assert job.state == "queued" and "shutting down" in (job.error_message or ""), cluster.describe(
        job_id
    )
    worker.proc.wait(20)
    last = torch.load(cluster.checkpoint(job_id, 1), map_location="cpu", weights_only=True)
    assert last["step"] > 0 and last["epoch"] < 200 and len(last["rng"]["ranks"]) == 2
    assert not rank_processes(cluster, job_id)


@SQLITE_ONLY
def test_the_time_limit_stops_every_rank(cluster: Cluster) -> None:
    cluster.start_worker()
    job_id = cluster.submit(long_spec(epochs=200, max_runtime_s=8, resources={"processes": 2}))
    job = cluster.wait_state(job_id, TERMINAL, timeout=60)
    assert (job.state, job.error_type) == ("failed", "TimeLimitExceeded"), cluster.describe(job_id)
    assert not rank_processes(cluster, job_id)
