"""The sweep controller (shared/sweep_controller.py) against the database, both
databases: trial creation within parallelism and max_trials, the lease and its fencing
(two controllers never act twice; a restarted one neither repeats nor skips a trial),
pruning through the cooperative cancel path, cancel and resume.

Trials' jobs are finished here by writing their rows (and metric points) directly: the
controller only reads the database. Real workers run sweeps in tests/test_sweeps.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import insert, select, update

from shared import accounts
from shared.db import transaction, utcnow
from shared.job_events import add_event  # noqa: F401 - imported for symmetry in debugging
from shared.orm import Job, JobEvent, MetricPoint, Sweep, SweepTrial
from shared.settings import Settings
from shared.sweep_controller import cancel_sweep, resume_sweep, still_holds, take, tick
from shared.sweep_spec import parse_sweep_spec, sweep_to_json
from tests.helpers import train_spec


def new_sweep(settings: Settings, **spec: Any) -> int:
    data = {
        "base": train_spec(epochs=4),
        "space": {"optimizer.lr": "choice([0.001, 0.01])", "batch_size": "choice([16, 32])"},
        "method": "grid",
        "metric": "val_accuracy",
        "parallelism": 2,
        **spec,
    }
    parsed = parse_sweep_spec(data)
    with transaction(settings.resolved_database_url) as s:
        owner = accounts.create_user(s, "sweeper", "member")
        sweep = Sweep(owner_id=owner.id, name="s", spec=sweep_to_json(parsed), state="running")
        s.add(sweep)
        s.flush()
        return sweep.id


def trials(settings: Settings, sweep_id: int) -> list[tuple[SweepTrial, Job]]:
    with transaction(settings.resolved_database_url) as s:
        rows = s.execute(
            select(SweepTrial, Job).join(Job, Job.id == SweepTrial.job_id)
            .where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)
        ).all()  # fmt: skip
        s.expunge_all()
        return [(t, j) for t, j in rows]


def finish(settings: Settings, job_id: int, accuracy: float, state: str = "succeeded") -> None:
    with transaction(settings.resolved_database_url) as s:
        s.execute(
            update(Job).where(Job.id == job_id)
            .values(state=state, result={"metrics": {"val_accuracy": accuracy}})
        )  # fmt: skip


def run(settings: Settings, sweep_id: int, holder: str = "c1") -> Any:
    published: list[int] = []
    report = tick(settings, sweep_id, holder, lambda job: published.append(job.id))
    report.published = published
    return report


def sweep_row(settings: Settings, sweep_id: int) -> Sweep:
    with transaction(settings.resolved_database_url) as s:
        sweep = s.get(Sweep, sweep_id)
        s.expunge(sweep)
        return sweep


def test_a_grid_runs_every_point_once_within_its_parallelism(settings: Settings) -> None:
    sweep_id = new_sweep(settings)
    first = run(settings, sweep_id)
    assert first.created == [0, 1] and len(first.published) == 2
    assert run(settings, sweep_id).created == []  # two active: parallelism 2
    done = trials(settings, sweep_id)
    finish(settings, done[0][1].id, 0.5)
    assert run(settings, sweep_id).created == [2]
    for trial, job in trials(settings, sweep_id):
        if job.state == "queued":
            finish(settings, job.id, 0.6 + trial.number / 10)
    assert run(settings, sweep_id).created == [3]
    finish(settings, trials(settings, sweep_id)[3][1].id, 0.95)
    report = run(settings, sweep_id)
    assert report.created == [] and report.finished == "succeeded"
    made = trials(settings, sweep_id)
    assert [t.number for t, _ in made] == [0, 1, 2, 3]
    points = {(t.params["optimizer.lr"], t.params["batch_size"]) for t, _ in made}
    assert points == {(0.001, 16), (0.001, 32), (0.01, 16), (0.01, 32)}
    # Each trial is an ordinary job of the owner, tagged with its sweep.
    for trial, job in made:
        assert job.owner_id == sweep_row(settings, sweep_id).owner_id
        assert f"sweep-{sweep_id}" in job.spec["tags"]
        assert job.spec["optimizer"]["lr"] == trial.params["optimizer.lr"]
    assert run(settings, sweep_id).created == []  # finished: nothing more


def test_another_controller_waits_for_the_lease_and_then_neither_repeats_nor_skips(
    settings: Settings,
) -> None:
    sweep_id = new_sweep(settings, method="random", space={"optimizer.lr": "loguniform(1e-4, 1e-1)"},
                         max_trials=5, parallelism=2)  # fmt: skip
    assert run(settings, sweep_id, "a").created == [0, 1]
    assert not run(settings, sweep_id, "b").held  # a's lease is running
    for _, job in trials(settings, sweep_id):
        finish(settings, job.id, 0.5)
    # a dies: its lease runs out, b takes over where a stopped.
    with transaction(settings.resolved_database_url) as s:
        s.execute(update(Sweep).where(Sweep.id == sweep_id)
                  .values(controller_lease_expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
    report = run(settings, sweep_id, "b")
    assert report.held and report.created == [2, 3]
    # a, back from the dead with its old count, can write nothing.
    with transaction(settings.resolved_database_url) as s:
        epoch = s.get(Sweep, sweep_id).controller_epoch
        assert not still_holds(s, sweep_id, epoch - 1)
    for _, job in trials(settings, sweep_id):
        if job.state == "queued":
            finish(settings, job.id, 0.7)
    with transaction(settings.resolved_database_url) as s:
        s.execute(update(Sweep).where(Sweep.id == sweep_id)
                  .values(controller_lease_expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
    assert run(settings, sweep_id, "c").created == [4]
    made = trials(settings, sweep_id)
    assert [t.number for t, _ in made] == [0, 1, 2, 3, 4]  # exactly max_trials, no gap
    lrs = [t.params["optimizer.lr"] for t, _ in made]
    assert len(set(lrs)) == 5  # seeded per trial number: no point proposed twice


def test_the_lease_is_a_compare_and_set(settings: Settings) -> None:
    sweep_id = new_sweep(settings)
    with transaction(settings.resolved_database_url) as s:
        first = take(s, sweep_id, "a", 60)
        assert first is not None
        assert take(s, sweep_id, "b", 60) is None
        again = take(s, sweep_id, "a", 60)  # renewed by its holder: a new count
        assert again == first + 1 and not still_holds(s, sweep_id, first)


def test_a_clearly_worse_trial_is_pruned_through_the_cancel_path(settings: Settings) -> None:
    sweep_id = new_sweep(
        settings, method="random", space={"optimizer.lr": "loguniform(1e-4, 1e-1)"},
        max_trials=5, parallelism=5,
        early_stopping={"rule": "median", "min_epochs": 1, "min_trials": 2},
    )  # fmt: skip
    assert run(settings, sweep_id).created == [0, 1, 2, 3, 4]
    made = trials(settings, sweep_id)
    curves = {0: [0.6, 0.7, 0.8], 1: [0.62, 0.72, 0.81], 2: [0.61, 0.71, 0.79],
              3: [0.1, 0.1, 0.1], 4: [0.65, 0.75, 0.85]}  # fmt: skip
    with transaction(settings.resolved_database_url) as s:
        for trial, job in made:
            # 0-2 completed; 3 (clearly worse) and 4 (the best) still running.
            state = "succeeded" if trial.number < 3 else "running"
            s.execute(update(Job).where(Job.id == job.id).values(state=state, attempt=1))
            s.execute(insert(MetricPoint), [
                {"job_id": job.id, "attempt": 1, "key": "val_accuracy", "step": e, "epoch": e,
                 "value": v, "wall_time": 0.0}
                for e, v in enumerate(curves[trial.number], start=1)
            ])  # fmt: skip
    report = run(settings, sweep_id)
    assert report.pruned == [3]
    made = {t.number: (t, j) for t, j in trials(settings, sweep_id)}
    trial, job = made[3]
    assert (
        trial.pruned_at_epoch is not None and "pruned by the sweep at epoch" in trial.prune_reason
    )
    assert job.cancel_requested and job.state == "running"  # its worker stops it
    assert not made[4][1].cancel_requested  # the best goes on
    with transaction(settings.resolved_database_url) as s:
        event = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id,
                                                 JobEvent.kind == "cancel_requested")).one()  # fmt: skip
        assert event.message == trial.prune_reason
    assert not any(j.cancel_requested for n, (_, j) in made.items() if n != 3)  # best kept
    assert run(settings, sweep_id).pruned == []  # judged once


def test_cancel_then_resume_continues_without_rerunning_finished_trials(
    settings: Settings,
) -> None:
    sweep_id = new_sweep(settings, parallelism=2)
    run(settings, sweep_id)
    first, second = trials(settings, sweep_id)
    finish(settings, first[1].id, 0.8)
    with transaction(settings.resolved_database_url) as s:
        assert cancel_sweep(s, sweep_id) and not cancel_sweep(s, sweep_id)
    assert trials(settings, sweep_id)[1][1].state == "cancelled"  # the queued one
    assert run(settings, sweep_id).created == []  # cancelled: nothing new
    with transaction(settings.resolved_database_url) as s:
        assert resume_sweep(s, sweep_id)
    report = run(settings, sweep_id)
    # Trial 1 was cancelled with its sweep, not finished: its point runs again.
    assert report.created == [2, 3]
    made = trials(settings, sweep_id)
    assert made[2][0].params == second[0].params
    assert sum(j.state == "succeeded" for _, j in made) == 1  # trial 0 is not run again


def test_a_pruned_trial_holds_its_slot_until_its_job_has_stopped(settings: Settings) -> None:
    """Pruning asks the job to stop; until its worker has stopped it, its job is still
    one of the `parallelism` queued or running (found on real workers under load)."""
    sweep_id = new_sweep(settings, method="random", space={"optimizer.lr": "loguniform(1e-4, 1e-1)"},
                         max_trials=4, parallelism=2)  # fmt: skip
    assert run(settings, sweep_id).created == [0, 1]
    (first, job), _ = trials(settings, sweep_id)
    with transaction(settings.resolved_database_url) as s:
        s.execute(
            update(Job).where(Job.id == job.id).values(state="running", cancel_requested=True)
        )
        s.execute(update(SweepTrial).where(SweepTrial.id == first.id).values(pruned_at_epoch=1))
    assert run(settings, sweep_id).created == []
    finish(settings, job.id, 0.1, state="cancelled")
    assert run(settings, sweep_id).created == [2]
