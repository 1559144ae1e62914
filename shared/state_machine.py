"""The job state machine. Every transition is one conditional UPDATE (compare-and-set).

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled
    running -> queued   (lease expired or worker handed it back; attempt + 1 on reclaim)

A function here returns whether its UPDATE matched a row; zero rows means another
process got there first (a duplicate delivery, a newer attempt, a cancel) and the
caller must not act as if it had won. Worker-side writes carry the attempt number
they claimed with (a fencing token), so a zombie cannot overwrite a newer attempt.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Update, and_, case, insert, or_, select, update
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.job_events import add_event
from shared.orm import Job, JobMetric


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ALL_STATES = tuple(s.value for s in JobState)

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(src: JobState | str, dst: JobState | str) -> bool:
    return JobState(dst) in TRANSITIONS[JobState(src)]


@dataclass(frozen=True)
class Claim:
    job_id: int
    attempt: int
    spec: dict[str, Any]
    kind: str


def claim_job(session: Session, job_id: int, worker: str, lease_seconds: float) -> Claim | None:
    """Take the job for this worker: queued (or running with an expired lease) -> running.

    Returns None when the job is not claimable: already running under a live lease,
    finished, cancelled, out of attempts, or unknown. That is a duplicate delivery.
    """
    now = utcnow()
    stmt = (
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt < Job.max_attempts,
            Job.cancel_requested.is_(False),
            or_(
                Job.state == JobState.QUEUED.value,
                and_(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now),
            ),
        )
        .values(
            state=JobState.RUNNING.value,
            attempt=Job.attempt + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            worker=worker,
            started_at=now,
            updated_at=now,
        )
        .returning(Job.attempt, Job.spec, Job.kind)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        return None
    add_event(session, job_id, "claimed", attempt=row.attempt, worker=worker)
    return Claim(job_id=job_id, attempt=row.attempt, spec=row.spec, kind=row.kind)


@dataclass(frozen=True)
class LeaseRenewal:
    # False: this attempt no longer owns the job (reclaimed, finished elsewhere).
    owned: bool
    cancel_requested: bool


def renew_lease(session: Session, job_id: int, attempt: int, lease_seconds: float) -> LeaseRenewal:
    """Extend this attempt's lease and report whether a cancel was requested."""
    now = utcnow()
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    row = session.execute(stmt).first()
    if row is None:
        return LeaseRenewal(owned=False, cancel_requested=False)
    return LeaseRenewal(owned=True, cancel_requested=bool(row.cancel_requested))


def update_progress(session: Session, job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
    """Fenced write of live progress; False if this attempt lost the job."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(progress=progress, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1


def still_owns(session: Session, job_id: int, attempt: int) -> bool:
    """Fenced no-op write: True if this attempt still holds the running job. Being an
    UPDATE, it also locks the row until the transaction ends, so writes made in the same
    transaction cannot interleave with a reclaim by another worker."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return session.execute(stmt).rowcount == 1


def final_metrics(result: Any) -> dict[str, float]:
    """result["metrics"]'s finite numbers (not bools), as the job_final_metrics rows keep
    them for the leaderboard; keys longer than the column are left out."""
    metrics = result.get("metrics") if isinstance(result, dict) else None
    if not isinstance(metrics, dict):
        return {}
    return {
        key: number
        for key, value in metrics.items()
        if isinstance(key, str) and 0 < len(key) <= 64 and (number := _finite(value)) is not None
    }


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)  # an int too big for a float raises
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def finish_job(
    session: Session,
    job_id: int,
    attempt: int,
    state: JobState,
    *,
    result: dict[str, Any] | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
    checkpoint_path: str | None = None,
) -> bool:
    """running -> a terminal state, only for the attempt that holds the job."""
    if state not in TERMINAL:
        raise ValueError(f"{state} is not a terminal state")
    now = utcnow()
    values: dict[str, Any] = {
        "state": state.value,
        "finished_at": now,
        "updated_at": now,
        "lease_expires_at": None,
        "result": result,
        "error_type": error_type,
        "error_message": error_message,
    }
    if checkpoint_path is not None:
        values["checkpoint_path"] = checkpoint_path
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.state == JobState.RUNNING.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if state != JobState.SUCCEEDED:
        if session.execute(stmt).rowcount != 1:
            return False
    else:
        # RETURNING: the fenced UPDATE says whether it matched and gives the columns the
        # metric rows copy, in one statement.
        won = session.execute(stmt.returning(Job.dataset_name, Job.kind)).one_or_none()
        if won is None:
            return False
        rows = [
            {"job_id": job_id, "key": key, "value": value,
             "dataset_name": won.dataset_name, "kind": won.kind}
            for key, value in final_metrics(result).items()
        ]  # fmt: skip
        if rows:
            session.execute(insert(JobMetric), rows)
    message = f"{error_type}: {error_message}" if error_type else error_message
    add_event(session, job_id, state.value, attempt=attempt, message=message)
    return True


def request_cancel(session: Session, job_id: int) -> str | None:
    """Cancel a job: a queued one ends at once, a running one is flagged for its worker.

    Returns the state the job is in afterwards, or None if there is no such job.
    """
    now = utcnow()
    cancelled_now = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.QUEUED.value)
        .values(
            state=JobState.CANCELLED.value,
            cancel_requested=True,
            finished_at=now,
            updated_at=now,
            error_message="cancelled before it started",
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if cancelled_now:
        add_event(session, job_id, "cancelled", message="cancelled before it started")
        return JobState.CANCELLED.value
    flagged = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.state == JobState.RUNNING.value,
            Job.cancel_requested.is_(False),
        )
        .values(cancel_requested=True, updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    if flagged:
        add_event(session, job_id, "cancel_requested")
    return session.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()


def requeue_job(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued for a job this attempt hands back (tests and tools; the
    runner uses hand_back_job / requeue_after_failure, which also handle the attempt cap)."""
    return _requeued(session, _requeue_statement(job_id, attempt, reason), "requeued", reason)


def _requeued(session: Session, stmt: Update, kind: str, reason: str) -> bool:
    row = session.execute(stmt.returning(Job.id, Job.attempt)).first()
    if row is None:
        return False
    add_event(session, row.id, kind, attempt=row.attempt, message=reason)
    return True


def _requeue_statement(job_id: int, attempt: int, reason: str) -> Update:
    # A job with cancel_requested would sit in `queued` forever (claim_job skips it), so
    # these leave it running; the worker then finishes it as cancelled.
    return (
        update(Job)
        .where(
            Job.id == job_id,
            Job.attempt == attempt,
            Job.state == JobState.RUNNING.value,
            Job.cancel_requested.is_(False),
        )
        .values(
            state=JobState.QUEUED.value,
            lease_expires_at=None,
            worker=None,
            error_message=reason,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def hand_back_job(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued for a job its worker gives up through no fault of the job's
    (the worker is shutting down). That must not use up an attempt: the next claim
    increments `attempt` (the fencing token must only grow), so on the last attempt
    the cap moves up by one, or the job could never be claimed again.
    """
    stmt = _requeue_statement(job_id, attempt, reason).values(
        max_attempts=case(
            (Job.attempt >= Job.max_attempts, Job.attempt + 1), else_=Job.max_attempts
        )
    )
    return _requeued(session, stmt, "handed_back", reason)


def requeue_after_failure(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued after an infrastructure failure (out of memory, database or
    broker lost), if the job has attempts left. False: none left, a cancel is pending,
    or this attempt no longer holds the job; the caller then finishes it instead."""
    stmt = _requeue_statement(job_id, attempt, reason).where(Job.attempt < Job.max_attempts)
    return _requeued(session, stmt, "requeued", reason)
