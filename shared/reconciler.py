"""The reconciler: puts back what a dead worker or a lost broker message left behind.

The database is the truth and the broker only a fast path (docs/architecture.md,
"Reliability"), so a job can be stranded in two ways, and one pass of `reconcile_once`
repairs both:

- `running` with an expired lease: its worker died (SIGKILL, OOM, lost host) without
  writing a final state. It goes back to `queued` and is published again, unless it has
  used up `max_attempts`; then it ends `failed` with the reason.
- `queued`, unclaimed for `requeue_after_seconds`, with no message for it in Redis:
  Redis was flushed or restarted without persistence, or the server died between
  commit and enqueue. It is published again. A job whose message is
  still waiting behind busy workers is left alone, so messages never pile up.

A waiting job's message may stand in for another's (docs/architecture.md, R11): a
queued job whose own message is gone is covered by a waiting message whose job no
longer waits, and is republished only when no such spare message is left in its queue.
After each pass `run_forever` also decides preemptions (shared/scheduling.py), if this
reconciler holds the scheduler lock.

This module is the policy: which jobs to look at, when, and what to publish. What
happens to a job is a transition of shared/state_machine.py (`expire_lease`,
`settle_unclaimable`, `mark_for_republish`), each one compare-and-set UPDATE in its own
short transaction, conditional on what the reconciler saw (state, attempt, an expired
lease, a stale `updated_at`). So two reconcilers running at once act on a job once, a
lease renewed in the meantime is never touched, and a stray publish is harmless anyway:
the worker's claim is a compare-and-set too and turns a second delivery into a no-op.
What Redis holds is read through shared/broker.py.

No Flask, no torch: `trainyard reconcile` runs this in its own small process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import redis
from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.sql import ColumnElement

from shared import event_metrics
from shared import prometheus_catalog as pc
from shared.broker import (
    QueuedMessages,
    read_messages,
    redis_client,
    release_scheduler_lock,
    take_scheduler_lock,
)
from shared.celery_app import job_id_from_task_id, make_celery, publish_job, task_id_for
from shared.db import transaction, utcnow
from shared.job_events import add_event, last_event
from shared.log_setup import job_fields
from shared.orm import Job
from shared.scheduling import Preemption, preempt_once
from shared.settings import Settings
from shared.state_machine import (
    JobState,
    Settled,
    claimable_and_stale,
    expire_lease,
    mark_for_republish,
    settle_unclaimable,
)
from shared.sweep_controller import controller_pass
from shared.webhook_delivery import start as start_webhook_dispatcher

log = logging.getLogger(__name__)

# Jobs looked at per step and pass; a bigger backlog is worked off over several passes.
BATCH = 500


@dataclass
class ReconcileReport:
    requeued: int = 0  # running, lease expired -> queued and published again
    failed: int = 0  # out of attempts -> failed
    republished: int = 0  # queued, message lost -> published again
    cancelled: int = 0  # cancel requested but its worker is gone -> cancelled
    publish_errors: int = 0
    # Set when Redis could not be read; publishing waits for a later pass.
    broker_error: str | None = None
    job_ids: dict[str, list[int]] = field(default_factory=dict)

    def record(self, action: str, job_id: int) -> None:
        setattr(self, action, getattr(self, action) + 1)
        self.job_ids.setdefault(action, []).append(job_id)

    @property
    def acted(self) -> bool:
        return bool(self.requeued or self.failed or self.republished or self.cancelled)

    def __str__(self) -> str:
        text = (
            f"requeued={self.requeued} failed={self.failed} republished={self.republished} "
            f"cancelled={self.cancelled} publish_errors={self.publish_errors}"
        )
        return f"{text} broker_error={self.broker_error!r}" if self.broker_error else text


def _epoch(ts: datetime) -> float:
    return ts.replace(tzinfo=timezone.utc).timestamp()


# ----------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class _Row:
    id: int
    kind: str
    queue: str
    attempt: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    error_message: str | None
    max_runtime_s: int | None

    @property
    def task_id(self) -> str:
        return task_id_for(self.id)


def _select_rows(url: str, *where: ColumnElement[bool]) -> list[_Row]:
    stmt = (
        select(
            Job.id,
            Job.kind,
            Job.queue,
            Job.attempt,
            Job.max_attempts,
            Job.worker,
            Job.cancel_requested,
            Job.error_message,
            Job.spec,
        )
        .where(*where)
        .order_by(Job.id)
        .limit(BATCH)
    )
    with transaction(url) as session:
        rows = session.execute(stmt).all()
    return [
        _Row(
            id=r.id,
            kind=r.kind,
            queue=r.queue,
            attempt=r.attempt,
            max_attempts=r.max_attempts,
            worker=r.worker,
            cancel_requested=bool(r.cancel_requested),
            error_message=r.error_message,
            max_runtime_s=(r.spec or {}).get("max_runtime_s"),
        )
        for r in rows
    ]


class _Publisher:
    """Publishes job messages, reading the broker once per pass and only if needed."""

    def __init__(self, settings: Settings, celery: Celery, report: ReconcileReport) -> None:
        self._settings = settings
        self._celery = celery
        self._report = report
        self._view: QueuedMessages | None = None

    def view(self, queues: Iterable[str]) -> QueuedMessages | None:
        """The broker's messages for these queues, or None when Redis cannot be read."""
        if self._report.broker_error is not None:
            return None
        try:
            client = redis_client(self._settings.require_redis_url(), read_timeout_s=10)
            try:
                self._view = read_messages(client, queues)
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            self._report.broker_error = f"{type(exc).__name__}: {exc}"
            log.warning("reconciler: cannot read Redis (%s); publishing later", exc)
            return None
        return self._view

    def publish(self, row: _Row) -> bool:
        try:
            publish_job(self._celery, row.id, row.kind, row.queue, row.max_runtime_s)
        except Exception as exc:  # noqa: BLE001 - the job is safe as `queued`; retried later
            self._report.publish_errors += 1
            log.warning(
                "reconciler: job %s: publish failed (%s); retrying later",
                row.id,
                exc,
                extra=job_fields(row.id),
            )
            return False
        return True


# ----------------------------------------------------------------------------- steps


def _recover_expired_leases(
    url: str, now: datetime, publisher: _Publisher, report: ReconcileReport
) -> None:
    """running jobs whose lease expired: requeued (and published), failed or cancelled."""
    rows = _select_rows(url, Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
    requeued: list[_Row] = []
    for row in rows:
        with transaction(url) as session:
            settled = expire_lease(session, row.id, row.attempt, row.max_attempts, row.worker, now)
        if settled is not None:
            _log_action(settled, row.id, report)
            if settled.action == "requeued":
                requeued.append(row)
    if requeued:
        _publish_requeued(requeued, publisher)


def _publish_requeued(rows: list[_Row], publisher: _Publisher) -> None:
    view = publisher.view(r.queue for r in rows)
    if view is None:
        return  # Redis is down: the unclaimed-queued step publishes them once it is back
    for row in rows:
        # A copy still waiting in the queue (put back by reject_on_worker_lost) will
        # claim the requeued job; a second one would only be a duplicate delivery.
        if row.task_id not in view.waiting:
            publisher.publish(row)


def _settle_unclaimable(url: str, now: datetime, report: ReconcileReport) -> None:
    """queued jobs that no claim will ever take: cancel requested, or out of attempts."""
    rows = _select_rows(
        url,
        Job.state == JobState.QUEUED.value,
        or_(Job.cancel_requested.is_(True), Job.attempt >= Job.max_attempts),
    )
    for row in rows:
        with transaction(url) as session:
            settled = settle_unclaimable(
                session, row.id, row.attempt, row.max_attempts, row.error_message, now
            )
        if settled is not None:
            _log_action(settled, row.id, report)


def _republish_lost_messages(
    url: str, now: datetime, settings: Settings, publisher: _Publisher, report: ReconcileReport
) -> None:
    """queued jobs unclaimed for requeue_after_seconds whose message Redis lacks."""
    cutoff = now - timedelta(seconds=settings.requeue_after_seconds)
    rows = _select_rows(url, *claimable_and_stale(cutoff))
    if not rows:
        return  # the common case: Redis is not even asked
    view = publisher.view(r.queue for r in rows)
    if view is None:
        return
    spare = _spare_messages(url, view)
    for row in rows:
        if view.holds(row.task_id, reserved_since=_epoch(cutoff)):
            continue
        if spare.get(row.queue, 0) > 0:
            # A waiting message whose own job another message ran stands in for this
            # job (shared/scheduling.py): a slot taking it runs the best waiting job.
            spare[row.queue] -= 1
            continue
        with transaction(url) as session:
            if not mark_for_republish(session, row.id, cutoff, now):
                continue  # claimed, cancelled or taken by another reconciler meanwhile
        if publisher.publish(row):
            message = "its message was not in the broker"
            _log_action(Settled("republished", message), row.id, report)
            with transaction(url) as session:
                # A job a worker left queued at its owner's limit is offered again on
                # purpose, every pass it waits: its "deferred" entry already says so.
                last = last_event(session, row.id)
                if last is None or last[0] != "deferred":
                    add_event(session, row.id, "republished", message=message)


def _spare_messages(url: str, view: QueuedMessages) -> dict[str, int]:
    """Waiting messages, per queue, whose own job no longer waits: each still runs one
    waiting job of its queue when a slot takes it (shared/scheduling.py)."""
    ids = [i for t in view.waiting if (i := job_id_from_task_id(t)) is not None]
    spare: dict[str, int] = {}
    for start in range(0, len(ids), BATCH):
        with transaction(url) as session:
            rows = session.execute(
                select(Job.queue).where(
                    Job.id.in_(ids[start : start + BATCH]), Job.state != JobState.QUEUED.value
                )
            ).all()
        for (queue,) in rows:
            spare[queue] = spare.get(queue, 0) + 1
    return spare


def _log_action(settled: Settled, job_id: int, report: ReconcileReport) -> None:
    report.record(settled.action, job_id)
    log.info(
        "reconciler: job %s %s: %s",
        job_id,
        settled.action,
        settled.message,
        extra=job_fields(job_id),
    )


# ----------------------------------------------------------------------------- entry points


def reconcile_once(
    settings: Settings, celery: Celery, now: datetime | None = None
) -> ReconcileReport:
    """One pass over the database (and, when needed, the broker). Database errors
    propagate; an unreachable Redis is reported in `broker_error` and not raised."""
    now = now or utcnow()
    url = settings.resolved_database_url
    report = ReconcileReport()
    publisher = _Publisher(settings, celery, report)
    _recover_expired_leases(url, now, publisher, report)
    _settle_unclaimable(url, now, report)
    _republish_lost_messages(url, now, settings, publisher, report)
    if report.acted or report.broker_error or report.publish_errors:
        log.info("reconcile pass: %s", report)
    else:
        log.debug("reconcile pass: nothing to do")
    _count_pass(settings, report)
    return report


def _count_pass(settings: Settings, report: ReconcileReport) -> None:
    """For Prometheus (shared/event_metrics.py): what the pass did, and that it ran (an
    alert fires when no reconciler has finished a pass for a while)."""
    actions = ("requeued", "failed", "republished", "cancelled", "publish_errors")
    event_metrics.count_many(
        settings.redis_url, pc.RECONCILER_ACTIONS, {(a,): getattr(report, a) for a in actions}
    )
    event_metrics.set_gauge(settings.redis_url, pc.RECONCILER_LAST_PASS, time.time())


def run_forever(
    settings: Settings, stop_event: threading.Event, alive_file: Path | None = None
) -> None:
    """Reconcile every `reconcile_seconds` until `stop_event` is set.

    A failed pass (database down, a bug) is logged and the loop goes on: the next pass
    starts from the database again, so nothing is lost by skipping one. `alive_file` is
    touched after every pass, for a container healthcheck that the loop is not stuck.
    """
    celery = make_celery(settings)
    log.info(
        "reconciler started: every %.0f s; lease %.0f s, requeue after %.0f s, max attempts %d",
        settings.reconcile_seconds,
        settings.lease_seconds,
        settings.requeue_after_seconds,
        settings.max_attempts,
    )
    token = f"{socket.gethostname()}:{os.getpid()}"
    # Webhooks (shared/webhook_delivery.py) poll every second, not every pass.
    webhooks = start_webhook_dispatcher(settings, stop_event)
    while not stop_event.is_set():
        try:
            reconcile_once(settings, celery)
        except Exception:  # noqa: BLE001 - survive and retry on the next pass
            log.exception("reconcile pass failed; retrying in %.0f s", settings.reconcile_seconds)
        try:
            preempt_pass(settings, token)
        except Exception:  # noqa: BLE001 - preemption waits for the next pass
            log.warning("preemption pass failed", exc_info=True)
        try:
            # Sweeps' controllers (shared/sweep_controller.py): each holds its sweep by a
            # lease, so reconcilers on several hosts never act on one sweep twice.
            controller_pass(settings, token, celery)
        except Exception:  # noqa: BLE001 - the next pass starts again from the database
            log.warning("sweep controller pass failed", exc_info=True)
        if alive_file is not None:
            _touch(alive_file)
        stop_event.wait(settings.reconcile_seconds)
    webhooks.join(2 * settings.webhook_timeout_seconds + 5)
    log.info("reconciler stopped")


def preempt_pass(settings: Settings, token: str, *, release: bool = False) -> list[Preemption]:
    """Decide preemptions (shared/scheduling.py), if this reconciler holds the scheduler
    lock: one at a time, so two never stop two jobs for one waiting job. `release`:
    give the lock up afterwards (a one-off pass, which has no next pass to renew it)."""
    client = redis_client(settings.require_redis_url(), read_timeout_s=10)
    try:
        # Held across passes, and lost to another reconciler only if this one stops.
        if not take_scheduler_lock(client, token, 3 * settings.reconcile_seconds):
            return []
        try:
            done = preempt_once(settings, client)
            event_metrics.count(
                settings.redis_url, pc.RECONCILER_ACTIONS, ("preempted",), len(done)
            )
            return done
        finally:
            if release:
                release_scheduler_lock(client, token)
    finally:
        client.close()


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError as exc:
        log.warning("cannot touch %s: %s", path, exc)
