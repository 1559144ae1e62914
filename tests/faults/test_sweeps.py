"""Sweeps on real workers (issue 15): trials are ordinary jobs run by `celery worker`
subprocesses, created by the controller inside a real `trainyard reconcile` process.
The number of trials queued or running is watched the whole time; the reconciler is
SIGKILLed mid-sweep and another takes over without repeating or losing a trial."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest
from sqlalchemy import select

from shared.db import transaction
from shared.orm import Job, Sweep, SweepTrial
from tests.faults.conftest import Cluster, wait_for
from tests.helpers import train_spec

pytestmark = pytest.mark.integration

TINY = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}


def create(cluster: Cluster, **spec: Any) -> int:
    got = cluster.http.post(f"{cluster.url}/api/v1/sweeps", json=spec, timeout=30)
    assert got.status_code == 201, got.text
    return int(got.json()["id"])


def active_trials(cluster: Cluster, sweep_id: int) -> int:
    with transaction(cluster.db_url) as s:
        return len(
            s.scalars(
                select(Job.id).join(SweepTrial, SweepTrial.job_id == Job.id)
                .where(SweepTrial.sweep_id == sweep_id, Job.state.in_(("queued", "running")))
            ).all()
        )  # fmt: skip


def sweep_state(cluster: Cluster, sweep_id: int) -> str:
    with transaction(cluster.db_url) as s:
        return s.get(Sweep, sweep_id).state


def watch_until_done(cluster: Cluster, sweep_id: int, parallelism: int, timeout: float) -> int:
    """Poll until the sweep ends, asserting the parallelism at every look; the most
    trials seen active at once."""
    deadline, most = time.monotonic() + timeout, 0
    while sweep_state(cluster, sweep_id) == "running":
        active = active_trials(cluster, sweep_id)
        assert active <= parallelism, f"{active} trials queued or running at once"
        most = max(most, active)
        assert time.monotonic() < deadline, "the sweep did not finish"
        time.sleep(0.05)
    return most


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("method", ["grid", "random"])
def test_a_sweep_runs_exactly_its_trials_within_its_parallelism(
    cluster: Cluster, method: str
) -> None:
    cluster.start_workers(3)  # more slots than the sweep may use
    cluster.start_reconciler()
    space = (
        {"optimizer.lr": "choice([0.003, 0.03])", "model.params.hidden": "choice([8, 32])"}
        if method == "grid"
        else {"optimizer.lr": "loguniform(1e-3, 1e-1)", "model.params.hidden": "int(8, 32)"}
    )
    sweep_id = create(
        cluster, base=train_spec(model=TINY, epochs=2, batch_size=64), space=space,
        method=method, metric="val_accuracy", max_trials=4, parallelism=2, seed=3,
    )  # fmt: skip
    most = watch_until_done(cluster, sweep_id, parallelism=2, timeout=240)
    sweep = cluster.http.get(f"{cluster.url}/api/v1/sweeps/{sweep_id}", timeout=30).json()
    assert sweep["state"] == "succeeded", sweep
    assert most == 2  # it did run two at once
    trials = sweep["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3]
    assert {t["state"] for t in trials} == {"succeeded"}
    best = max(trials, key=lambda t: t["value"])
    assert sweep["best"]["number"] == best["number"]
    assert all(t["num_parameters"] and t["samples_per_s"] for t in trials)
    if method == "grid":
        points = {(t["params"]["optimizer.lr"], t["params"]["model.params.hidden"]) for t in trials}
        assert len(points) == 4
    with transaction(cluster.db_url) as s:
        tagged = s.scalars(select(Job.id).where(Job.spec.is_not(None))).all()
    assert len(tagged) == 4  # exactly max_trials jobs, nothing else


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_killed_controller_is_replaced_without_a_repeated_or_lost_trial(
    cluster: Cluster,
) -> None:
    cluster.start_workers(2)
    first = cluster.start_reconciler()
    sweep_id = create(
        cluster, base=train_spec(model=TINY, epochs=2, batch_size=64),
        space={"optimizer.lr": "loguniform(1e-3, 1e-1)"}, method="tpe",
        metric="val_accuracy", max_trials=5, parallelism=2, seed=1,
    )  # fmt: skip
    wait_for(lambda: active_trials(cluster, sweep_id) == 2, 60, "the first two trials")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    cluster.reconcilers.remove(first)  # dead on purpose: not a crash of the test's
    cluster.start_reconciler()  # waits out the dead one's lease, then goes on
    watch_until_done(cluster, sweep_id, parallelism=2, timeout=240)
    with transaction(cluster.db_url) as s:
        rows = s.execute(
            select(SweepTrial.number, Job.state).join(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)
        ).all()  # fmt: skip
        jobs = s.scalars(select(Job.id)).all()
    assert [n for n, _ in rows] == [0, 1, 2, 3, 4]
    assert {state for _, state in rows} == {"succeeded"}
    assert len(jobs) == 5
    assert sweep_state(cluster, sweep_id) == "succeeded"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_median_stopping_prunes_a_clearly_worse_trial_and_keeps_the_best(cluster: Cluster) -> None:
    """A grid (in order, one trial at a time) of three modest learning rates, one that
    cannot learn (1e-7) and the best (0.003): once three trials completed, the median
    rule stops the fourth through the cancel path and lets the fifth run to its end. A
    trial is judged at an epoch the completed trials reached (as Optuna's
    MedianPruner), so every trial is long enough (a CNN, ~0.15 s an epoch) to be looked
    at while it runs."""
    cluster.start_workers(1)
    cluster.start_reconciler()
    sweep_id = create(
        cluster, base=train_spec(epochs=10), method="grid", metric="val_accuracy",
        space={"optimizer.lr": "choice([0.001, 0.0003, 0.0001, 1e-7, 0.003])"}, parallelism=1,
        early_stopping={"rule": "median", "min_epochs": 1, "min_trials": 3},
    )  # fmt: skip
    watch_until_done(cluster, sweep_id, parallelism=1, timeout=300)
    sweep = cluster.http.get(f"{cluster.url}/api/v1/sweeps/{sweep_id}", timeout=30).json()
    states = [(t["number"], t["state"]) for t in sweep["trials"]]
    assert states == [(0, "succeeded"), (1, "succeeded"), (2, "succeeded"), (3, "pruned"),
                      (4, "succeeded")], sweep["trials"]  # fmt: skip
    pruned = sweep["trials"][3]
    assert pruned["pruned_at_epoch"] is not None and pruned["pruned_at_epoch"] < 10
    assert f"pruned by the sweep at epoch {pruned['pruned_at_epoch']}" in pruned["prune_reason"]
    assert sweep["counts"] == {"queued": 0, "running": 0, "succeeded": 4, "pruned": 1,
                               "failed": 0, "cancelled": 0}  # fmt: skip
    assert sweep["best"]["number"] == 4 and sweep["trials"][4]["pruned_at_epoch"] is None
    with transaction(cluster.db_url) as s:
        job = s.get(Job, pruned["job_id"])
        assert job.state == "cancelled" and job.progress["epoch"] < 10
