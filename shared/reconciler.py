"""The reconciler: puts back what a dead worker or a lost broker message left behind.

The database is the truth and the broker only a fast path (design.md 4), so a job can
be stranded in two ways, and one pass of `reconcile_once` repairs both:

- `running` with an expired lease: its worker died (SIGKILL, OOM, lost host) without
  writing a final state. It goes back to `queued` and is published again, unless it has
  used up `max_attempts`; then it ends `failed` with the reason (design.md 4.4).
- `queued`, unclaimed for `requeue_after_seconds`, with no message for it in Redis:
  Redis was flushed or restarted without persistence, or the server died between
  commit and enqueue. It is published again (design.md 4.1). A job whose message is
  still waiting behind busy workers is left alone, so messages never pile up.

Every change is one compare-and-set UPDATE in its own short transaction, conditional on
what the reconciler saw (state, attempt, an expired lease, a stale `updated_at`). So two
reconcilers running at once act on a job once, a lease renewed in the meantime is never
touched, and a stray publish is harmless anyway: the worker's claim is a compare-and-set
too and turns a second delivery into a no-op.

No Flask, no torch: `trainyard reconcile` runs this in its own small process.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.transport.redis import PRIORITY_STEPS
from sqlalchemy import or_, select, update
from sqlalchemy.sql import ColumnElement

from shared.celery_app import make_celery, publish_job, task_id_for
from shared.db import transaction, utcnow
from shared.job_events import add_event
from shared.orm import Job
from shared.settings import Settings
from shared.state_machine import JobState

log = logging.getLogger(__name__)

# Jobs looked at per step and pass; a bigger backlog is worked off over several passes.
BATCH = 500
# Where kombu's Redis transport keeps messages (kombu/transport/redis.py): waiting ones
# as JSON in a list named after the queue (plus one list per priority step above 0),
# reserved-but-unacked ones in a hash keyed by delivery tag, and the time each was
# reserved in a sorted set.
PRIORITY_SEP = "\x06\x16"
UNACKED_HASH = "unacked"
UNACKED_INDEX = "unacked_index"


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


# ----------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class BrokerView:
    """Which job messages Redis holds right now, by Celery task id."""

    waiting: frozenset[str]
    # task id -> when a worker reserved it (Unix time, the reserving host's clock)
    reserved: dict[str, float]

    def holds(self, task_id: str, reserved_since: float) -> bool:
        """Whether a delivery of `task_id` is still coming.

        A message reserved before `reserved_since` by a worker that never claimed the
        job belongs to a worker that died between reserving and claiming: Redis would
        only hand it out again after the visibility timeout (hours), so it does not count.
        """
        return task_id in self.waiting or self.reserved.get(task_id, 0.0) >= reserved_since


def redis_client(url: str) -> redis.Redis:
    # kombu spells a unix socket redis+socket:///path; redis-py wants unix:///path.
    if url.startswith("redis+socket://"):
        url = "unix://" + url.removeprefix("redis+socket://")
    return redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)


def _queue_lists(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS if p]


def _message_task_id(raw: bytes | str) -> str | None:
    try:
        message = json.loads(raw)
        # An unacked entry is [message, exchange, routing_key]; a waiting one the message.
        if isinstance(message, list):
            message = message[0]
        return str(message["headers"]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a Celery task message; nothing of ours


def read_broker(client: redis.Redis, queues: Iterable[str]) -> BrokerView:
    """One MULTI/EXEC snapshot of the queues' lists and the unacked hash.

    Atomic, so a message moving from a list to `unacked` (or back, on restore) is seen
    in one place or the other. One window stays: a worker has popped a message but not
    yet recorded it as unacked. A publish then is a duplicate the claim absorbs.
    """
    lists = [name for q in sorted(set(queues)) for name in _queue_lists(q)]
    pipe = client.pipeline(transaction=True)
    for name in lists:
        pipe.lrange(name, 0, -1)
    pipe.hgetall(UNACKED_HASH)
    pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
    *waiting_lists, unacked, index = pipe.execute()
    waiting = {tid for msgs in waiting_lists for raw in msgs if (tid := _message_task_id(raw))}
    reserved_at = {_text(tag): score for tag, score in index}
    reserved: dict[str, float] = {}
    for tag, raw in unacked.items():
        tid = _message_task_id(raw)
        if tid is not None:
            # Not in the index (yet): treat as reserved just now, i.e. still coming.
            when = reserved_at.get(_text(tag), float("inf"))
            reserved[tid] = max(reserved.get(tid, 0.0), when)
    return BrokerView(frozenset(waiting), reserved)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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


def _cas(
    url: str,
    where: list[ColumnElement[bool]],
    values: dict[str, Any],
    event: tuple[_Row, str, str] | None = None,
) -> bool:
    """One conditional UPDATE in its own transaction; True if this process won it.

    `event` (row, kind, message) goes on the job's timeline in the same transaction.
    """
    stmt = update(Job).where(*where).values(**values).execution_options(synchronize_session=False)
    with transaction(url) as session:
        won = session.execute(stmt).rowcount == 1
        if won and event is not None:
            row, kind, message = event
            add_event(
                session, row.id, kind, attempt=row.attempt, worker=row.worker, message=message
            )
        return won


def _terminal_values(now: datetime, state: JobState, **values: Any) -> dict[str, Any]:
    return {
        "state": state.value,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        **values,
    }


class _Publisher:
    """Publishes job messages, reading the broker once per pass and only if needed."""

    def __init__(self, settings: Settings, celery: Celery, report: ReconcileReport) -> None:
        self._settings = settings
        self._celery = celery
        self._report = report
        self._view: BrokerView | None = None

    def view(self, queues: Iterable[str]) -> BrokerView | None:
        """The broker's messages for these queues, or None when Redis cannot be read."""
        if self._report.broker_error is not None:
            return None
        try:
            client = redis_client(self._settings.require_redis_url())
            try:
                self._view = read_broker(client, queues)
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
            log.warning("reconciler: job %s: publish failed (%s); retrying later", row.id, exc)
            return False
        return True


# ----------------------------------------------------------------------------- steps


def _recover_expired_leases(
    url: str, now: datetime, publisher: _Publisher, report: ReconcileReport
) -> None:
    """running jobs whose lease expired: requeue (and publish), or fail, or cancel."""
    rows = _select_rows(url, Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
    requeued: list[_Row] = []
    for row in rows:
        # Exactly what was seen: same attempt, still running, lease still expired. A
        # heartbeat that renewed the lease since, or another reconciler, makes it miss.
        seen = [
            Job.id == row.id,
            Job.attempt == row.attempt,
            Job.state == JobState.RUNNING.value,
            Job.lease_expires_at < now,
        ]
        last_seen = row.worker or "an unknown worker"
        if row.cancel_requested:
            # Nobody is left to notice the flag; a requeued copy could never be claimed.
            message = f"cancelled; its worker was lost before it stopped (last seen on {last_seen})"
            values = _terminal_values(now, JobState.CANCELLED, error_message=message)
            if _cas(url, seen, values, (row, "cancelled", message)):
                _log_action("cancelled", row.id, message, report)
        elif row.attempt < row.max_attempts:
            reason = (
                f"lease expired on worker {last_seen}; requeued "
                f"(attempt {row.attempt + 1} of {row.max_attempts})"
            )
            # `attempt` stays: the next claim increments it (the fencing token).
            values = {
                "state": JobState.QUEUED.value,
                "lease_expires_at": None,
                "worker": None,
                "error_message": reason,
                "updated_at": now,
            }
            if _cas(
                url, [*seen, Job.cancel_requested.is_(False)], values, (row, "requeued", reason)
            ):
                _log_action("requeued", row.id, reason, report)
                requeued.append(row)
        else:
            reason = (
                f"worker lost on attempt {row.attempt} of {row.max_attempts}, no attempts left; "
                f"last seen on {last_seen}"
            )
            values = _terminal_values(
                now, JobState.FAILED, error_type="WorkerLost", error_message=reason
            )
            if _cas(url, seen, values, (row, "failed", f"WorkerLost: {reason}")):
                _log_action("failed", row.id, reason, report)
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
    """queued jobs that no claim will ever take: cancel requested, or out of attempts.

    Both arise when a worker hands a job back (shutdown) just as a cancel arrives or on
    its last attempt; without this they would stay queued forever.
    """
    rows = _select_rows(
        url,
        Job.state == JobState.QUEUED.value,
        or_(Job.cancel_requested.is_(True), Job.attempt >= Job.max_attempts),
    )
    for row in rows:
        seen = [Job.id == row.id, Job.attempt == row.attempt, Job.state == JobState.QUEUED.value]
        if row.cancel_requested:
            message = "cancelled before it could run again"
            values = _terminal_values(now, JobState.CANCELLED, error_message=message)
            action = "cancelled"
        else:
            message = (
                f"no attempts left ({row.attempt} of {row.max_attempts} used); "
                f"last: {row.error_message or 'interrupted'}"
            )
            values = _terminal_values(
                now, JobState.FAILED, error_type="AttemptsExhausted", error_message=message
            )
            action = "failed"
        if _cas(url, seen, values, (row, action, message)):
            _log_action(action, row.id, message, report)


def _republish_lost_messages(
    url: str, now: datetime, settings: Settings, publisher: _Publisher, report: ReconcileReport
) -> None:
    """queued jobs unclaimed for requeue_after_seconds whose message Redis lacks."""
    cutoff = now - timedelta(seconds=settings.requeue_after_seconds)
    stale = [
        Job.state == JobState.QUEUED.value,
        Job.cancel_requested.is_(False),
        Job.attempt < Job.max_attempts,
        Job.updated_at < cutoff,
    ]
    rows = _select_rows(url, *stale)
    if not rows:
        return  # the common case: Redis is not even asked
    view = publisher.view(r.queue for r in rows)
    if view is None:
        return
    for row in rows:
        if view.holds(row.task_id, reserved_since=_epoch(cutoff)):
            continue
        # Touch updated_at first, conditional on the job still being stale: of two
        # reconcilers only one wins, and the next pass does not see it as stale again.
        if not _cas(url, [Job.id == row.id, *stale], {"updated_at": now}):
            continue
        if publisher.publish(row):
            _log_action("republished", row.id, "its message was not in the broker", report)
            with transaction(url) as session:
                add_event(
                    session, row.id, "republished", message="its message was not in the broker"
                )


def _log_action(action: str, job_id: int, reason: str, report: ReconcileReport) -> None:
    report.record(action, job_id)
    log.info("reconciler: job %s %s: %s", job_id, action, reason)


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
    return report


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
    while not stop_event.is_set():
        try:
            reconcile_once(settings, celery)
        except Exception:  # noqa: BLE001 - survive and retry on the next pass
            log.exception("reconcile pass failed; retrying in %.0f s", settings.reconcile_seconds)
        if alive_file is not None:
            _touch(alive_file)
        stop_event.wait(settings.reconcile_seconds)
    log.info("reconciler stopped")


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError as exc:
        log.warning("cannot touch %s: %s", path, exc)
