"""The job state machine: the only code that writes a job's state, attempt and lease.

    queued  -> running                      claim_job
    running -> running                      claim_job, once the lease has expired
    running -> succeeded | failed | cancelled
                                            finish_job (the worker), expire_lease (the
                                            reconciler, for a worker that is gone)
    running -> queued                       hand_back_job, hand_back_preempted,
                                            requeue_after_failure, requeue_job,
                                            expire_lease
    running -> running                      request_preemption, clear_preemption (the
                                            scheduler flags a victim; its heartbeat sees it)
    running -> failed | cancelled           fail_killed_attempt (the worker's main
                                            process, for a pool child killed by SIGKILL)
    queued  -> cancelled                    request_cancel, settle_unclaimable
    queued  -> failed                       settle_unclaimable
    queued  -> queued                       defer_claim (the owner is at a claim limit)

Every move is one conditional UPDATE (compare-and-set) built by a `Transition` in
TRANSITIONS, so the table above and the SQL cannot disagree: the UPDATE's WHERE clause
names the transition's source states and its SET names the target. A function returns
whether its UPDATE matched a row; zero rows means another process got there first (a
duplicate delivery, a newer attempt, a cancel, another reconciler) and the caller must
not act as if it had won. Worker-side writes carry the attempt number they claimed with
(a fencing token), so a zombie cannot overwrite a newer attempt. Each transition adds
its entry to the job's timeline in the same transaction (shared/job_events.py).

Callers own the transaction (`with transaction(url) as session:`) and the policy: the
runner decides when a job is finished or handed back, the reconciler which jobs to look
at. Why it is built this way: docs/architecture.md, "Reliability".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Update, case, func, insert, or_, select, update
from sqlalchemy.orm import Session, aliased

from shared.db import utcnow
from shared.job_events import add_event, last_event
from shared.job_states import FINISHED_STATES, JobState
from shared.metric_catalog import final_metrics
from shared.orm import Job, JobMetric

QUEUED, RUNNING = JobState.QUEUED, JobState.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED


@dataclass(frozen=True)
class Transition:
    """A move from any of `sources` to `target`, as a compare-and-set UPDATE."""

    sources: tuple[JobState, ...]
    target: JobState

    def update(self, *where: ColumnElement[bool], **values: Any) -> Update:
        """UPDATE jobs SET state=<target>, **values WHERE state IN <sources> AND *where."""
        in_source = (
            Job.state == self.sources[0].value
            if len(self.sources) == 1
            else Job.state.in_([s.value for s in self.sources])
        )
        return (
            update(Job)
            .where(in_source, *where)
            .values(state=self.target.value, **values)
            .execution_options(synchronize_session=False)
        )


CLAIM = Transition((QUEUED, RUNNING), RUNNING)  # from running only once the lease expired
SUCCEED = Transition((RUNNING,), SUCCEEDED)
FAIL = Transition((RUNNING,), FAILED)
CANCEL = Transition((RUNNING,), CANCELLED)
REQUEUE = Transition((RUNNING,), QUEUED)
CANCEL_QUEUED = Transition((QUEUED,), CANCELLED)
FAIL_QUEUED = Transition((QUEUED,), FAILED)
TRANSITIONS = (CLAIM, SUCCEED, FAIL, CANCEL, REQUEUE, CANCEL_QUEUED, FAIL_QUEUED)
_FINISH = {SUCCEEDED: SUCCEED, FAILED: FAIL, CANCELLED: CANCEL}


def can_transition(src: JobState | str, dst: JobState | str) -> bool:
    """Whether any transition moves a job from `src` to `dst`."""
    src, dst = JobState(src), JobState(dst)
    return any(src in t.sources and t.target == dst for t in TRANSITIONS)


def _write(*where: ColumnElement[bool], **values: Any) -> Update:
    """A fenced UPDATE of a job that keeps its state (lease, progress, flags)."""
    return update(Job).where(*where).values(**values).execution_options(synchronize_session=False)


def _held_by(job_id: int, attempt: int) -> tuple[ColumnElement[bool], ...]:
    """The running job, as long as this attempt holds it."""
    return (Job.id == job_id, Job.attempt == attempt, Job.state == RUNNING.value)


def _finished(now: datetime, **values: Any) -> dict[str, Any]:
    """The columns every move into a finished state sets, plus `values`."""
    return {"finished_at": now, "updated_at": now, "lease_expires_at": None, **values}


def _back_in_queue(now: datetime, reason: str) -> dict[str, Any]:
    # `attempt` stays: the next claim increments it (the fencing token only grows).
    return {
        "lease_expires_at": None,
        "worker": None,
        "error_message": reason,
        "updated_at": now,
        "preempt_requested_by": None,
    }


def _won(
    session: Session,
    stmt: Update,
    job_id: int,
    event: str,
    attempt: int,
    message: str,
    worker: str | None = None,
) -> bool:
    """Run a transition's UPDATE; if it matched, put `event` on the job's timeline."""
    if session.execute(stmt).rowcount != 1:
        return False
    add_event(session, job_id, event, attempt=attempt, worker=worker, message=message)
    return True


# ----------------------------------------------------------------------------- the worker


@dataclass(frozen=True)
class Claim:
    job_id: int
    attempt: int
    spec: dict[str, Any]
    kind: str
    # For the wait-time histogram (shared/event_metrics.py): where and since when it waited.
    queue: str = ""
    created_at: datetime | None = None


def running_jobs_of_owner() -> ColumnElement[int]:
    """How many other jobs of the same owner are running, as a subquery correlated with
    the job being written."""
    other = aliased(Job)
    return (
        select(func.count())
        .select_from(other)
        .where(other.owner_id == Job.owner_id, other.state == RUNNING.value, other.id != Job.id)
        .scalar_subquery()
    )


def claim_job(
    session: Session,
    job_id: int,
    worker: str,
    lease_seconds: float,
    *,
    device: str | None = None,
    max_running: int | None = None,
    placement: dict[str, Any] | None = None,
) -> Claim | None:
    """Take the job for this worker: queued (or running with an expired lease) -> running.

    Returns None when the job is not claimable: already running under a live lease,
    finished, cancelled, out of attempts, or unknown. That is a duplicate delivery.
    `device` ("cuda:0 (NVIDIA H200)", "cpu") goes on the timeline's claim entry, which is
    what GPU-hours are counted from (shared/claim_limits.py). With `max_running`, the
    claim also needs fewer than that many other jobs of the owner running: checked in
    the same UPDATE, so on SQLite (one writer at a time) two claims cannot both pass;
    on PostgreSQL the caller locks the owner's row first (shared/claim_limits.py).
    `placement` ({"host", "slot", "gpus"}: where this attempt runs, worker/slots.py) is
    written by the same UPDATE, so a running job's row never names a previous attempt's
    GPUs.
    """
    now = utcnow()
    limits = () if not max_running else (running_jobs_of_owner() < max_running,)
    stmt = CLAIM.update(
        Job.id == job_id,
        Job.attempt < Job.max_attempts,
        Job.cancel_requested.is_(False),
        or_(Job.state == QUEUED.value, Job.lease_expires_at < now),
        *limits,
        attempt=Job.attempt + 1,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        worker=worker,
        placement=placement,
        started_at=now,
        updated_at=now,
        preempt_requested_by=None,
    ).returning(Job.attempt, Job.spec, Job.kind, Job.queue, Job.created_at)
    row = session.execute(stmt).first()
    if row is None:
        return None
    message = f"on {device}" if device else None
    add_event(session, job_id, "claimed", attempt=row.attempt, worker=worker, message=message)
    return Claim(
        job_id=job_id,
        attempt=row.attempt,
        spec=row.spec,
        kind=row.kind,
        queue=row.queue,
        created_at=row.created_at,
    )


@dataclass(frozen=True)
class LeaseRenewal:
    # False: this attempt no longer owns the job (reclaimed, finished elsewhere).
    owned: bool
    cancel_requested: bool
    # The waiting job this one must make room for (shared/scheduling.py), if any.
    preempted_by: int | None = None


def renew_lease(session: Session, job_id: int, attempt: int, lease_seconds: float) -> LeaseRenewal:
    """Extend this attempt's lease and report whether a cancel or a preemption was
    requested. A preemption whose preemptor no longer waits (it started elsewhere, or
    was cancelled) is withdrawn here: the victim stops only for a job still waiting."""
    now = utcnow()
    stmt = _write(
        *_held_by(job_id, attempt), lease_expires_at=now + timedelta(seconds=lease_seconds)
    ).returning(Job.cancel_requested, Job.preempt_requested_by)
    row = session.execute(stmt).first()
    if row is None:
        return LeaseRenewal(owned=False, cancel_requested=False)
    preempted_by = row.preempt_requested_by
    if preempted_by is not None:
        waiting = session.execute(
            select(Job.id).where(Job.id == preempted_by, Job.state == QUEUED.value)
        ).first()
        if waiting is None:
            clear_preemption(session, job_id, attempt)
            preempted_by = None
    return LeaseRenewal(
        owned=True, cancel_requested=bool(row.cancel_requested), preempted_by=preempted_by
    )


def request_preemption(session: Session, job_id: int, attempt: int, preemptor_id: int) -> bool:
    """running -> running, flagged: the scheduler asks this attempt to hand its job back
    for the waiting job `preemptor_id`. Only once per attempt (a flag already set, or a
    cancel pending, makes it miss); the heartbeat delivers it (worker/lease.py)."""
    stmt = _write(
        *_held_by(job_id, attempt),
        Job.preempt_requested_by.is_(None),
        Job.cancel_requested.is_(False),
        preempt_requested_by=preemptor_id,
        updated_at=utcnow(),
    )
    if session.execute(stmt).rowcount != 1:
        return False
    add_event(
        session, job_id, "preempt_requested", attempt=attempt,
        message=f"to make room for job {preemptor_id}",
    )  # fmt: skip
    return True


def clear_preemption(session: Session, job_id: int, attempt: int) -> bool:
    """Withdraw a preemption request whose preemptor no longer waits."""
    stmt = _write(
        *_held_by(job_id, attempt),
        Job.preempt_requested_by.is_not(None),
        preempt_requested_by=None,
    )
    return session.execute(stmt).rowcount == 1


def update_progress(session: Session, job_id: int, attempt: int, progress: dict[str, Any]) -> bool:
    """Fenced write of live progress; False if this attempt lost the job."""
    stmt = _write(*_held_by(job_id, attempt), progress=progress, updated_at=utcnow())
    return session.execute(stmt).rowcount == 1


def still_owns(session: Session, job_id: int, attempt: int) -> bool:
    """Fenced no-op write: True if this attempt still holds the running job. Being an
    UPDATE, it also locks the row until the transaction ends, so writes made in the same
    transaction cannot interleave with a reclaim by another worker."""
    stmt = _write(*_held_by(job_id, attempt), updated_at=utcnow())
    return session.execute(stmt).rowcount == 1


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
    """running -> a finished state, only for the attempt that holds the job."""
    if state.value not in FINISHED_STATES:
        raise ValueError(f"{state} is not a finished state")
    values = _finished(utcnow(), result=result, error_type=error_type, error_message=error_message)
    if checkpoint_path is not None:
        values["checkpoint_path"] = checkpoint_path
    stmt = _FINISH[state].update(Job.id == job_id, Job.attempt == attempt, **values)
    if state != SUCCEEDED:
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


def _requeue(
    session: Session,
    job_id: int,
    attempt: int,
    event: str,
    reason: str,
    *where: ColumnElement[bool],
    **values: Any,
) -> bool:
    # A job with cancel_requested would sit in `queued` forever (claim_job skips it), so
    # these leave it running; the worker then finishes it as cancelled.
    stmt = REQUEUE.update(
        Job.id == job_id,
        Job.attempt == attempt,
        Job.cancel_requested.is_(False),
        *where,
        **_back_in_queue(utcnow(), reason),
        **values,
    )
    return _won(session, stmt, job_id, event, attempt, reason)


def requeue_job(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued for a job this attempt hands back (tests and tools; the runner
    uses hand_back_job / requeue_after_failure, which also handle the attempt cap)."""
    return _requeue(session, job_id, attempt, "requeued", reason)


def hand_back_job(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued for a job its worker gives up through no fault of the job's
    (the worker is shutting down). That must not use up an attempt: the next claim
    increments `attempt` (the fencing token must only grow), so on the last attempt
    the cap moves up by one, or the job could never be claimed again.
    """
    cap = case((Job.attempt >= Job.max_attempts, Job.attempt + 1), else_=Job.max_attempts)
    return _requeue(session, job_id, attempt, "handed_back", reason, max_attempts=cap)


def hand_back_preempted(session: Session, job_id: int, attempt: int, preemptor_id: int) -> bool:
    """running -> queued for a job that stopped, after a checkpoint, to make room for
    the waiting job `preemptor_id`. Like hand_back_job it uses up no attempt; it also
    records when, so the scheduler does not preempt the job again within
    TRAINYARD_PREEMPT_GUARD_SECONDS (shared/scheduling.py)."""
    reason = f"preempted by job {preemptor_id}"
    cap = case((Job.attempt >= Job.max_attempts, Job.attempt + 1), else_=Job.max_attempts)
    return _requeue(
        session, job_id, attempt, "preempted", reason, max_attempts=cap, preempted_at=utcnow()
    )


def requeue_after_failure(session: Session, job_id: int, attempt: int, reason: str) -> bool:
    """running -> queued after an infrastructure failure (database, broker or disk
    lost), if the job has attempts left. False: none left, a cancel is pending,
    or this attempt no longer holds the job; the caller then finishes it instead."""
    return _requeue(session, job_id, attempt, "requeued", reason, Job.attempt < Job.max_attempts)


def defer_claim(session: Session, job_id: int, reason: str) -> bool:
    """queued -> queued: a worker took the job's message but may not run it now (its
    owner is at a claim limit, shared/claim_limits.py). Touching `updated_at` makes the
    reconciler offer it again after TRAINYARD_REQUEUE_AFTER_SECONDS, at the back of the
    queue. The timeline says why, once per reason rather than once per offer."""
    stmt = _write(Job.id == job_id, Job.state == QUEUED.value, updated_at=utcnow())
    if session.execute(stmt).rowcount != 1:
        return False
    # The reconciler's republish in between says nothing new (and adds no event).
    if last_event(session, job_id, ignoring=("republished",)) != ("deferred", reason):
        add_event(session, job_id, "deferred", message=reason)
    return True


KILLED = "KilledBySignal"


def fail_killed_attempt(session: Session, job_id: int, worker: str, reason: str) -> Settled | None:
    """running -> failed (cancelled if a cancel is pending) for the attempt that `worker`
    (host:pid of a pool child) holds, when the worker's main process saw that child
    killed by SIGKILL mid-job: the kernel's OOM killer, or an operator. Not requeued:
    the same job on the same kind of slot would most likely be killed again, and each
    try takes the host to the brink (docs/architecture.md, "Reliability" R10). None if
    that child no longer held the job (it finished, or the lease ran out and another
    worker reclaimed it)."""
    now = utcnow()
    held = (Job.id == job_id, Job.worker == worker)
    cancelled = "cancelled; its process was killed before it stopped"
    for stmt, action, message in (
        (
            CANCEL.update(
                *held, Job.cancel_requested.is_(True), **_finished(now, error_message=cancelled)
            ),
            CANCELLED.value,
            cancelled,
        ),
        (
            FAIL.update(
                *held,
                Job.cancel_requested.is_(False),
                **_finished(now, error_type=KILLED, error_message=reason),
            ),
            FAILED.value,
            f"{KILLED}: {reason}",
        ),
    ):
        row = session.execute(stmt.returning(Job.attempt)).first()
        if row is not None:
            add_event(session, job_id, action, attempt=row.attempt, worker=worker, message=message)
            return Settled(action, message)
    return None


# ----------------------------------------------------------------------------- users


def request_cancel(session: Session, job_id: int, reason: str | None = None) -> str | None:
    """Cancel a job: a queued one ends at once, a running one is flagged for its worker.
    `reason` (a sweep pruning its trial) goes on the timeline and, for a queued job,
    into its error message.

    Returns the state the job is in afterwards, or None if there is no such job.
    """
    now = utcnow()
    message = reason or "cancelled before it started"
    stmt = CANCEL_QUEUED.update(
        Job.id == job_id, **_finished(now, cancel_requested=True, error_message=message)
    )
    if session.execute(stmt).rowcount:
        add_event(session, job_id, CANCELLED.value, message=message)
        return CANCELLED.value
    flag = _write(
        Job.id == job_id,
        Job.state == RUNNING.value,
        Job.cancel_requested.is_(False),
        cancel_requested=True,
        updated_at=now,
    )
    if session.execute(flag).rowcount:
        add_event(session, job_id, "cancel_requested", message=reason)
    return session.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()


def mark_artifacts_deleted(session: Session, job_id: int) -> bool:
    """Record that a finished job's files (checkpoints, exports, log) were deleted.

    Only a finished job: a queued or running one may still write them. The state does
    not change; the checkpoint path is cleared, so nothing tries to load it (an evaluate
    job naming this one is refused at submission). False when the job is not finished
    or was already marked.
    """
    now = utcnow()
    stmt = _write(
        Job.id == job_id,
        Job.state.in_(sorted(FINISHED_STATES)),
        Job.artifacts_deleted_at.is_(None),
        artifacts_deleted_at=now,
        checkpoint_path=None,
        updated_at=now,
    )
    if not session.execute(stmt).rowcount:
        return False
    add_event(session, job_id, "artifacts_deleted")
    return True


# ----------------------------------------------------------------------------- the reconciler


@dataclass(frozen=True)
class Settled:
    """What a reconciler transition did to a job: its event and the reason recorded."""

    action: str  # requeued | failed | cancelled
    message: str


def expire_lease(
    session: Session,
    job_id: int,
    attempt: int,
    max_attempts: int,
    worker: str | None,
    now: datetime,
) -> Settled | None:
    """A running job whose lease expired before `now`: its worker is gone.

    With a cancel pending it ends cancelled (nobody is left to notice the flag); with
    attempts left it goes back to the queue (the caller publishes it again); on its
    last attempt it ends failed as WorkerLost, so a job that kills its worker cannot
    loop. `attempt`, `max_attempts` and `worker` are what the caller read: the UPDATE
    matches only that attempt, still running, lease still expired, so a heartbeat that
    renewed the lease since, or another reconciler, makes it miss (None).
    """
    seen = (Job.id == job_id, Job.attempt == attempt, Job.lease_expires_at < now)
    last_seen = worker or "an unknown worker"
    message = f"cancelled; its worker was lost before it stopped (last seen on {last_seen})"
    stmt = CANCEL.update(
        *seen, Job.cancel_requested.is_(True), **_finished(now, error_message=message)
    )
    if _won(session, stmt, job_id, CANCELLED.value, attempt, message, worker):
        return Settled(CANCELLED.value, message)

    not_cancelled = Job.cancel_requested.is_(False)
    message = (
        f"lease expired on worker {last_seen}; requeued (attempt {attempt + 1} of {max_attempts})"
    )
    stmt = REQUEUE.update(
        *seen, not_cancelled, Job.attempt < Job.max_attempts, **_back_in_queue(now, message)
    )
    if _won(session, stmt, job_id, "requeued", attempt, message, worker):
        return Settled("requeued", message)

    message = (
        f"worker lost on attempt {attempt} of {max_attempts}, no attempts left; "
        f"last seen on {last_seen}"
    )
    values = _finished(now, error_type="WorkerLost", error_message=message)
    stmt = FAIL.update(*seen, not_cancelled, Job.attempt >= Job.max_attempts, **values)
    if _won(session, stmt, job_id, FAILED.value, attempt, f"WorkerLost: {message}", worker):
        return Settled(FAILED.value, message)
    return None


def settle_unclaimable(
    session: Session,
    job_id: int,
    attempt: int,
    max_attempts: int,
    last_error: str | None,
    now: datetime,
) -> Settled | None:
    """A queued job no claim will ever take: cancel requested (-> cancelled) or out of
    attempts (-> failed, AttemptsExhausted). Both arise when a worker hands a job back
    (shutdown) just as a cancel arrives or on its last attempt."""
    seen = (Job.id == job_id, Job.attempt == attempt)
    message = "cancelled before it could run again"
    stmt = CANCEL_QUEUED.update(
        *seen, Job.cancel_requested.is_(True), **_finished(now, error_message=message)
    )
    if _won(session, stmt, job_id, CANCELLED.value, attempt, message):
        return Settled(CANCELLED.value, message)
    message = (
        f"no attempts left ({attempt} of {max_attempts} used); last: {last_error or 'interrupted'}"
    )
    stmt = FAIL_QUEUED.update(
        *seen,
        Job.attempt >= Job.max_attempts,
        **_finished(now, error_type="AttemptsExhausted", error_message=message),
    )
    if _won(session, stmt, job_id, FAILED.value, attempt, f"AttemptsExhausted: {message}"):
        return Settled(FAILED.value, message)
    return None


def claimable_and_stale(stale_before: datetime) -> tuple[ColumnElement[bool], ...]:
    """Queued jobs a claim could take that have not moved since `stale_before`."""
    return (
        Job.state == QUEUED.value,
        Job.cancel_requested.is_(False),
        Job.attempt < Job.max_attempts,
        Job.updated_at < stale_before,
    )


def mark_for_republish(
    session: Session, job_id: int, stale_before: datetime, now: datetime
) -> bool:
    """Take a queued job, unclaimed since before `stale_before`, for publishing again:
    touch its `updated_at`, still conditional on it being that stale. Of two reconcilers
    only one wins, and the next pass does not see the job as stale again."""
    stmt = _write(*claimable_and_stale(stale_before), Job.id == job_id, updated_at=now)
    return session.execute(stmt).rowcount == 1
