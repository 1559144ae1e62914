"""The sweep controller: one tick per running sweep, run by the reconciler's loop.

A tick takes the sweep's lease (a compare-and-set on `sweeps`, like a worker's claim on
a job: `controller_epoch` is the fencing count every later write names), then:

1. prunes: reads the running trials' per-epoch values of the sweep's metric from
   metric_points and asks shared/sweep_pruning.py; a trial to prune is marked (once:
   `pruned_at_epoch IS NULL`) and its job cancelled through the normal cooperative
   path with the reason on its timeline ("pruned by the sweep at epoch N ...");
2. creates trials: while fewer than `parallelism` trials have a job queued or running
   (a pruned trial's too, until its worker stopped it) and fewer than `max_trials`
   count, asks shared/sweep_search.py for the next points and
   inserts each trial's job (shared/job_builder.py) and its `sweep_trials` row in one
   transaction that re-checks the lease; the trial number is unique per sweep, so even
   a controller that lost its lease meanwhile cannot create a trial twice;
3. finishes the sweep when nothing more will run.

Everything a tick decides is read from the database at its start: the Optuna study
(for TPE) is rebuilt from the rows each time, so a controller that dies loses nothing
and one that starts again neither repeats nor skips a trial.

What counts toward `max_trials`: trials that succeeded, failed or were pruned, and
those queued or running. A trial cancelled with its sweep (not pruned) does not count:
a resumed sweep runs another in its place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.celery_app import publish_job
from shared.dataset_catalog import CatalogContext, UploadInfo, upload_info
from shared.db import transaction, utcnow
from shared.job_builder import new_job
from shared.job_events import add_event
from shared.job_states import JobState
from shared.orm import Job, MetricPoint, Sweep, SweepTrial, Upload
from shared.settings import Settings
from shared.spec import SpecError, parse_spec
from shared.state_machine import request_cancel
from shared.sweep_pruning import decisions
from shared.sweep_search import TrialRecord, propose
from shared.sweep_spec import SweepSpec, apply, load_sweep_spec
from shared.webhooks import record_sweep_finished

log = logging.getLogger(__name__)

RUNNING, CANCELLED, SUCCEEDED, FAILED = "running", "cancelled", "succeeded", "failed"
ACTIVE_JOB_STATES = (JobState.QUEUED.value, JobState.RUNNING.value)
SWEEP_TAG = "sweep-{id}"


# ---------------------------------------------------------------- the lease


def take(session: Session, sweep_id: int, holder: str, lease_s: float) -> int | None:
    """Take (or renew) the sweep's lease for `holder`; the fencing count to name in
    every write of this tick, or None while another controller holds it."""
    now = utcnow()
    free_or_ours = (
        (Sweep.controller_lease_expires_at.is_(None))
        | (Sweep.controller_lease_expires_at < now)
        | (Sweep.controller == holder)
    )
    stmt = (
        update(Sweep)
        .where(Sweep.id == sweep_id, free_or_ours)
        .values(
            controller=holder,
            controller_lease_expires_at=now + timedelta(seconds=lease_s),
            controller_epoch=Sweep.controller_epoch + 1,
            updated_at=now,
        )
        .returning(Sweep.controller_epoch)
    )
    return session.execute(stmt).scalar_one_or_none()


def still_holds(session: Session, sweep_id: int, epoch: int) -> bool:
    """Fenced no-op write: True while this tick's lease is the sweep's; it locks the row
    until the transaction ends, so a trial inserted with it cannot race another tick."""
    stmt = (
        update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.controller_epoch == epoch)
        .values(updated_at=utcnow())
    )
    return session.execute(stmt).rowcount == 1


# ---------------------------------------------------------------- reading a sweep


@dataclass
class TrialView:
    row: SweepTrial
    job_state: str
    value: float | None
    series: dict[int, float] = field(default_factory=dict)

    @property
    def state(self) -> str:
        """The trial's state in the sweep's counts (pruned is its own)."""
        if self.row.pruned_at_epoch is not None:
            return "pruned"
        return self.job_state

    @property
    def active(self) -> bool:
        """Still to be judged by early stopping: queued or running and not pruned."""
        return self.holds_slot and self.row.pruned_at_epoch is None

    @property
    def holds_slot(self) -> bool:
        """Its job is queued or running, pruned or not: a pruned trial's job runs until
        its worker sees the cancel, and until then it is one of `parallelism`."""
        return self.job_state in ACTIVE_JOB_STATES

    @property
    def counts(self) -> bool:
        """Toward max_trials: everything but a trial cancelled with its sweep."""
        return self.state != JobState.CANCELLED.value


def _final_value(result: Any, metric: str) -> float | None:
    metrics = (result or {}).get("metrics") if isinstance(result, dict) else None
    value = metrics.get(metric) if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_trials(session: Session, sweep: Sweep, spec: SweepSpec) -> list[TrialView]:
    rows = session.execute(
        select(SweepTrial, Job.state, Job.result)
        .join(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep.id)
        .order_by(SweepTrial.number)
    ).all()
    views = [TrialView(t, state, _final_value(result, spec.metric)) for t, state, result in rows]
    by_job = {v.row.job_id: v for v in views}
    if by_job:
        points = session.execute(
            select(MetricPoint.job_id, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
            .where(MetricPoint.job_id.in_(list(by_job)), MetricPoint.key == spec.metric)
            .order_by(MetricPoint.job_id, MetricPoint.id)
        ).all()
        for job_id, step, epoch, value in points:
            # Per-epoch series log step = epoch; a resumed attempt's points replace
            # the earlier attempt's for the same epoch (later ids win).
            by_job[job_id].series[int(epoch if epoch is not None else step)] = float(value)
    return views


def records(views: list[TrialView]) -> list[TrialRecord]:
    return [
        TrialRecord(v.row.number, v.row.params, v.state, v.value, dict(v.series))  # type: ignore[arg-type]
        for v in views
    ]


# ---------------------------------------------------------------- a tick


@dataclass
class TickReport:
    sweep_id: int
    held: bool = False
    created: list[int] = field(default_factory=list)  # trial numbers
    pruned: list[int] = field(default_factory=list)
    finished: str | None = None  # the sweep's new terminal state


def tick(
    settings: Settings,
    sweep_id: int,
    holder: str,
    publish: Callable[[Job], None],
    now: datetime | None = None,
) -> TickReport:
    """One controller step for one sweep (see the module docstring)."""
    url = settings.resolved_database_url
    report = TickReport(sweep_id)
    lease_s = max(3 * settings.reconcile_seconds, 10.0)
    with transaction(url) as session:
        epoch = take(session, sweep_id, holder, lease_s)
    if epoch is None:
        return report
    report.held = True
    with transaction(url) as session:
        sweep = session.get(Sweep, sweep_id)
        if sweep is None:
            return report
        spec = load_sweep_spec(sweep.spec)
        views = read_trials(session, sweep, spec)
        state, owner_id, created_at = sweep.state, sweep.owner_id, sweep.created_at
    if state == RUNNING:
        report.pruned = _prune(url, sweep_id, epoch, spec, views)
        if report.pruned:
            with transaction(url) as session:
                sweep = session.get(Sweep, sweep_id)
                assert sweep is not None
                views = read_trials(session, sweep, spec)
        report.created = _create(settings, sweep_id, epoch, spec, views, owner_id, created_at,
                                 publish, now or utcnow())  # fmt: skip
        if not report.created:
            report.finished = _finish_if_done(url, sweep_id, epoch, spec, views, created_at,
                                              now or utcnow())  # fmt: skip
    return report


def _prune(
    url: str, sweep_id: int, epoch: int, spec: SweepSpec, views: list[TrialView]
) -> list[int]:
    if spec.early_stopping is None:
        return []
    # As Optuna's pruners do: a running trial is judged against the trials that
    # completed, not against its running peers (half of a batch started together would
    # otherwise be cut at every epoch, whatever they are worth).
    completed = {
        v.row.number: v.series for v in views if v.state == JobState.SUCCEEDED.value and v.series
    }
    judged: dict[int, Any] = {}
    for v in views:
        if v.active and v.series:
            judged.update(decisions(spec, spec.direction, {v.row.number: v.series}, completed))
    pruned = []
    for number, decision in judged.items():
        if not decision.prune:
            continue
        view = next(v for v in views if v.row.number == number)
        with transaction(url) as session:
            if not still_holds(session, sweep_id, epoch):
                return pruned
            marked = session.execute(
                update(SweepTrial)
                .where(SweepTrial.id == view.row.id, SweepTrial.pruned_at_epoch.is_(None))
                .values(pruned_at_epoch=decision.epoch, prune_reason=decision.reason)
            ).rowcount
            if marked:
                request_cancel(session, view.row.job_id, reason=decision.reason)
                pruned.append(number)
                log.info("sweep %s: trial %s %s", sweep_id, number, decision.reason)
    return pruned


def _budget_spent(spec: SweepSpec, created_at: datetime, now: datetime) -> bool:
    return spec.time_budget_s is not None and now - created_at >= timedelta(
        seconds=spec.time_budget_s
    )


def _create(
    settings: Settings,
    sweep_id: int,
    epoch: int,
    spec: SweepSpec,
    views: list[TrialView],
    owner_id: int | None,
    created_at: datetime,
    publish: Callable[[Job], None],
    now: datetime,
) -> list[int]:
    if _budget_spent(spec, created_at, now):
        return []
    busy = sum(v.holds_slot for v in views)
    counted = sum(v.counts for v in views)
    wanted = min(spec.parallelism - busy, spec.max_trials - counted)
    if wanted <= 0:
        return []
    points = propose(spec, records(views), wanted)
    first = max((v.row.number for v in views), default=-1) + 1
    url = settings.resolved_database_url
    created = []
    for offset, params in enumerate(points):
        number = first + offset
        with transaction(url) as session:
            if not still_holds(session, sweep_id, epoch):
                break
            trial_spec = _trial_spec(session, settings, spec, params, sweep_id, number, owner_id)
            job = new_job(trial_spec, owner_id, settings.max_attempts)
            session.add(job)
            session.flush()
            session.add(SweepTrial(sweep_id=sweep_id, number=number, job_id=job.id,
                                   params=dict(params)))  # fmt: skip
            add_event(session, job.id, "sweep_trial", message=f"sweep {sweep_id} trial {number}")
        # Committed before it is published (R1): a lost publish is the reconciler's.
        try:
            publish(job)
        except Exception:  # noqa: BLE001 - the row is queued; the reconciler republishes it
            log.warning("sweep %s: trial %s's job %s not published", sweep_id, number, job.id,
                        exc_info=True)  # fmt: skip
        created.append(number)
    return created


def _trial_spec(
    session: Session,
    settings: Settings,
    spec: SweepSpec,
    params: dict[str, Any],
    sweep_id: int,
    number: int,
    owner_id: int | None,
) -> Any:
    data = apply(spec.base, params)
    data["tags"] = list(dict.fromkeys([*data.get("tags", []), SWEEP_TAG.format(id=sweep_id)]))
    if not data.get("name"):
        data["name"] = f"{spec.name or f'sweep {sweep_id}'} #{number}"
    try:
        return parse_spec(data, owner_context(session, settings, owner_id))
    except SpecError as exc:
        # Every point was validated at creation; a catalogue that changed since (an
        # upload deleted) fails the sweep rather than every later trial.
        raise SweepFailed(f"trial {number} is no longer a valid job: {exc}") from None


class SweepFailed(Exception):
    pass


def _finish_if_done(
    url: str,
    sweep_id: int,
    epoch: int,
    spec: SweepSpec,
    views: list[TrialView],
    created_at: datetime,
    now: datetime,
) -> str | None:
    if any(v.holds_slot for v in views):
        return None
    counted = sum(v.counts for v in views)
    exhausted = spec.method == "grid" and not propose(spec, records(views), 1)
    if counted < spec.max_trials and not exhausted and not _budget_spent(spec, created_at, now):
        return None
    state = SUCCEEDED if any(v.state == JobState.SUCCEEDED.value for v in views) else FAILED
    with transaction(url) as session:
        done = session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.controller_epoch == epoch, Sweep.state == RUNNING)
            .values(state=state, finished_at=now, updated_at=now,
                    error_message=None if state == SUCCEEDED else "no trial succeeded")
        ).rowcount  # fmt: skip
        if done:
            record_sweep_finished(session, sweep_id)  # its webhook event, in this transaction
    return state if done else None


# ---------------------------------------------------------------- catalogue, owners


def owner_context(session: Session, settings: Settings, owner_id: int | None) -> CatalogContext:
    """The catalogue as the sweep's owner sees it: their uploads only."""

    def find_upload(upload_id: int) -> UploadInfo | None:
        upload = session.get(Upload, upload_id)
        if upload is None or (owner_id is not None and upload.owner_id != owner_id):
            return None
        return upload_info(upload)

    return CatalogContext(
        data_dir=settings.resolved_data_dir,
        find_upload=find_upload,
        max_file_bytes=settings.max_dataset_file_bytes,
    )


# ---------------------------------------------------------------- cancel and resume


def cancel_sweep(session: Session, sweep_id: int) -> bool:
    """Stop a running sweep: no new trials; queued ones cancelled, running ones stop
    through the cooperative cancel path. False when it was not running."""
    now = utcnow()
    done = session.execute(
        update(Sweep)
        .where(Sweep.id == sweep_id, Sweep.state == RUNNING)
        .values(state=CANCELLED, finished_at=now, updated_at=now)
    ).rowcount
    if not done:
        return False
    active = session.scalars(
        select(SweepTrial.job_id)
        .join(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id, Job.state.in_(ACTIVE_JOB_STATES))
    ).all()
    for job_id in active:
        request_cancel(session, job_id, reason=f"sweep {sweep_id} cancelled")
    return True


def resume_sweep(session: Session, sweep_id: int) -> bool:
    """Run a cancelled sweep again from where it stopped (finished trials stay)."""
    now = utcnow()
    return bool(
        session.execute(
            update(Sweep)
            .where(Sweep.id == sweep_id, Sweep.state == CANCELLED)
            .values(state=RUNNING, finished_at=None, updated_at=now)
        ).rowcount
    )


# ---------------------------------------------------------------- the reconciler's pass


def controller_pass(settings: Settings, holder: str, celery: Any) -> list[TickReport]:
    """A tick for every running sweep; a sweep whose tick fails is marked failed only
    for SweepFailed (its spec no longer makes jobs), else retried next pass."""
    with transaction(settings.resolved_database_url) as session:
        ids = session.scalars(select(Sweep.id).where(Sweep.state == RUNNING)).all()

    def publish(job: Job) -> None:
        publish_job(celery, job.id, job.kind, job.queue, job.spec.get("max_runtime_s"))

    reports = []
    for sweep_id in ids:
        try:
            reports.append(tick(settings, sweep_id, holder, publish))
        except SweepFailed as exc:
            with transaction(settings.resolved_database_url) as session:
                failed = session.execute(
                    update(Sweep).where(Sweep.id == sweep_id, Sweep.state == RUNNING)
                    .values(state=FAILED, error_message=str(exc), finished_at=utcnow())
                ).rowcount  # fmt: skip
                if failed:
                    record_sweep_finished(session, sweep_id)
        except Exception:  # noqa: BLE001 - one sweep's trouble must not stop the others
            log.warning("sweep %s: controller tick failed; retried next pass", sweep_id,
                        exc_info=True)  # fmt: skip
    return reports
