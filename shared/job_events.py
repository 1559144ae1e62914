"""The job timeline: what happened to a job and when, as JobEvent rows.

Events are added in the caller's transaction, next to the state change they describe,
so the timeline never shows a transition that was rolled back.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.orm import JobEvent
from shared.webhooks import JOB_FINISH_EVENTS, record_job_finished

# kind -> what the web UI calls it. Anything else is shown by its kind.
EVENT_KINDS = {
    "claimed": "claimed by a worker",
    "resumed": "resumed from a checkpoint",
    "requeued": "requeued",
    "handed_back": "handed back (worker shutting down)",
    "preempt_requested": "asked to make room for a higher-priority job",
    "preempted": "preempted (handed back; resumes from its checkpoint)",
    "republished": "message re-sent to the broker",
    "deferred": "waiting: its owner is at a limit",
    "cancel_requested": "cancel requested",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
    "artifacts_deleted": "files deleted (checkpoints, exports, log)",
}


def add_event(
    session: Session,
    job_id: int,
    kind: str,
    *,
    attempt: int | None = None,
    worker: str | None = None,
    message: str | None = None,
) -> None:
    session.add(
        JobEvent(
            job_id=job_id,
            at=utcnow(),
            kind=kind,
            attempt=attempt,
            worker=worker,
            message=message[:2000] if message else None,
        )
    )
    if kind in JOB_FINISH_EVENTS:
        # Every move into a finished state passes here, inside its transaction: the
        # webhook event commits (or rolls back) with it (shared/webhooks.py).
        record_job_finished(session, job_id, kind, attempt)


def last_event(
    session: Session, job_id: int, ignoring: tuple[str, ...] = ()
) -> tuple[str, str | None] | None:
    """(kind, message) of the job's newest event whose kind is not in `ignoring`."""
    stmt = select(JobEvent.kind, JobEvent.message).where(JobEvent.job_id == job_id)
    if ignoring:
        stmt = stmt.where(JobEvent.kind.not_in(ignoring))
    row = session.execute(stmt.order_by(JobEvent.id.desc()).limit(1)).first()
    return None if row is None else (row.kind, row.message)


def job_events(session: Session, job_id: int, limit: int = 500) -> list[JobEvent]:
    """The job's events, oldest first (the newest `limit` of them)."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
    return list(reversed(session.scalars(stmt.limit(limit)).all()))
