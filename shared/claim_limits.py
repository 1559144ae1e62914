"""Per-user limits checked when a worker claims a job: running jobs, GPU-hours a day.

Submission limits (shared/settings.py, enforced by server/submission.py) bound what a
user may put in the queue; these bound how much of the cluster one user holds at once,
so that a member with 200 queued jobs does not take every worker slot while others
wait. They are checked at the claim, where they are exact, and not at submission, where
a job may wait for hours:

- at most `max_running_jobs` of the owner's jobs running at once;
- at most `gpu_hours_per_day` of GPU time over the last 24 h, for a job this worker
  would run on a GPU.

A job over a limit is not run now: the worker leaves it `queued` (`defer_claim`) and
acknowledges its message; the reconciler offers it again after
TRAINYARD_REQUEUE_AFTER_SECONDS, behind what was queued meanwhile, so the other users'
jobs go first and nobody spins on it. Its timeline says why.

Race-safe: on PostgreSQL the owner's row is locked (SELECT ... FOR NO KEY UPDATE) before
the count, so two workers claiming two jobs of the same user at once take turns, and the
second counts the first's claim. On SQLite, writers take turns anyway, and the running
count is a condition of the claim's own UPDATE (shared/state_machine.py, `claim_job`).

The limits are the role's defaults (`max_running_jobs_per_user` and
`gpu_hours_per_day_per_user` for members, `*_per_admin` for admins, 0 = none) with an
admin's overrides for one user from users.limits, read through shared/limits.py. A
value there that is not a number, or negative, falls back to the role's with a warning
rather than being trusted or failing the claim.

GPU time comes from the timeline: each claim entry names its device ("on cuda:0 (...)"),
and an attempt lasts until its next entry (finished, requeued, handed back, or the next
claim), or until now while it runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.job_states import JobState
from shared.limits import effective_limits, role_limits
from shared.orm import Job, JobEvent, User
from shared.scheduling import gpu_needs
from shared.settings import Settings
from shared.state_machine import Claim, claim_job, defer_claim

log = logging.getLogger(__name__)

WINDOW = timedelta(hours=24)
# The timeline entries that end an attempt.
_ATTEMPT_ENDS = ("succeeded", "failed", "cancelled", "requeued", "handed_back")


@dataclass(frozen=True)
class UserLimits:
    max_running_jobs: int | None  # None: no limit
    gpu_hours_per_day: float | None


@dataclass(frozen=True)
class Deferred:
    """The claim was refused for now; `reason` is on the job's timeline."""

    job_id: int
    reason: str


def limits_for(settings: Settings, role: str, overrides: Any) -> UserLimits:
    """The role's defaults with the user's overrides on top (shared/limits.py); 0 means
    no limit. users.limits is an admin's JSON: anything but a mapping is ignored, and a
    negative or non-finite value falls back to the role's."""
    mapping = overrides if isinstance(overrides, Mapping) else None
    limits = effective_limits(settings, role, mapping)
    defaults = role_limits(settings, role)

    def value(name: str) -> float:
        got = limits.get(name, 0)
        if not math.isfinite(got) or got < 0:
            log.warning("users.limits: %s=%r is not a number >= 0; using the role's", name, got)
            got = defaults.get(name, 0)
        return got

    running, gpu_hours = value("max_running_jobs"), value("gpu_hours_per_day")
    return UserLimits(
        max_running_jobs=int(running) if running else None,
        gpu_hours_per_day=float(gpu_hours) if gpu_hours else None,
    )


def _on_gpu(device: str | None) -> bool:
    return bool(device) and str(device).startswith("cuda")


def running_jobs(session: Session, owner_id: int, besides: int) -> int:
    stmt = select(func.count()).where(
        Job.owner_id == owner_id, Job.state == JobState.RUNNING.value, Job.id != besides
    )
    return int(session.execute(stmt).scalar_one())


def gpu_seconds(
    session: Session, owner_id: int, now: datetime, window: timedelta = WINDOW
) -> float:
    """GPU time the owner's job attempts used within `window` before `now`: an
    attempt on N GPUs counts N times its wall time, as N 1-GPU jobs would."""
    since = now - window
    stmt = (
        select(
            JobEvent.job_id,
            JobEvent.attempt,
            JobEvent.kind,
            JobEvent.at,
            JobEvent.message,
            Job.spec,
        )
        .join(Job, Job.id == JobEvent.job_id)
        .where(
            Job.owner_id == owner_id,
            Job.started_at.is_not(None),
            or_(Job.finished_at.is_(None), Job.finished_at >= since),
            JobEvent.attempt.is_not(None),
            JobEvent.kind.in_(("claimed", *_ATTEMPT_ENDS)),
        )
        .order_by(JobEvent.job_id, JobEvent.id)
    )
    starts: dict[tuple[int, int], datetime] = {}
    ends: dict[tuple[int, int], datetime] = {}
    widths: dict[int, int] = {}
    for row in session.execute(stmt):
        key = (row.job_id, row.attempt)
        if row.kind == "claimed":
            if _on_gpu((row.message or "").removeprefix("on ")):
                starts[key] = row.at
                widths[row.job_id] = max(1, gpu_needs(row.spec or {})[0])
            # A reclaim ends the attempt it took over from, if that never said goodbye.
            ends.setdefault((row.job_id, row.attempt - 1), row.at)
        else:
            ends.setdefault(key, row.at)
    total = 0.0
    for key, start in starts.items():
        end = min(ends.get(key, now), now)
        total += widths[key[0]] * max(0.0, (end - max(start, since)).total_seconds())
    return total


def _lock_owner(session: Session, owner_id: int) -> User | None:
    # FOR NO KEY UPDATE serialises claims of one user's jobs on PostgreSQL (SQLite ignores
    # it and serialises writers itself) until the claim's transaction ends. Not FOR
    # UPDATE: that would also hold up the user's submissions and token uses meanwhile
    # (their foreign keys to users take KEY SHARE locks, which FOR NO KEY UPDATE allows).
    return session.execute(
        select(User).where(User.id == owner_id).with_for_update(key_share=True)
    ).scalar_one_or_none()


def claim_within_limits(
    session: Session,
    settings: Settings,
    job_id: int,
    worker: str,
    device: str,
    now: datetime | None = None,
    placement: dict[str, Any] | None = None,
) -> Claim | Deferred | None:
    """`claim_job`, unless the job's owner is at one of their limits: then the job stays
    queued and Deferred says why. None: not claimable (a duplicate delivery)."""
    now = now or utcnow()
    owner_id = session.execute(select(Job.owner_id).where(Job.id == job_id)).scalar_one_or_none()
    owner = _lock_owner(session, owner_id) if owner_id is not None else None
    if owner is None:  # a job from before accounts existed, or an unknown job
        return claim_job(
            session, job_id, worker, settings.lease_seconds, device=device, placement=placement
        )
    limits = limits_for(settings, owner.role, owner.limits)
    retry_after = settings.requeue_after_seconds + settings.reconcile_seconds
    reason = _over_limit(session, owner, limits, job_id, device, now, retry_after)
    if reason is None:
        claim = claim_job(
            session, job_id, worker, settings.lease_seconds,
            device=device, max_running=limits.max_running_jobs, placement=placement,
        )  # fmt: skip
        if claim is not None or limits.max_running_jobs is None:
            return claim
        # Not claimed: a duplicate, or (on SQLite) another claim of the owner's got in
        # between the count above and the UPDATE. Count again to tell which.
        reason = _over_limit(session, owner, limits, job_id, device, now, retry_after)
        if reason is None:
            return None
    if not defer_claim(session, job_id, reason):
        return None  # not queued: running elsewhere, finished or cancelled
    return Deferred(job_id, reason)


def _over_limit(
    session: Session,
    owner: User,
    limits: UserLimits,
    job_id: int,
    device: str,
    now: datetime,
    retry_after_s: float,
) -> str | None:
    # Worded without the live numbers, so that the timeline gets one entry per reason
    # and not one per offer (shared/state_machine.py, `defer_claim`).
    retry = f"offered again in about {retry_after_s:.0f} s"
    if limits.max_running_jobs is not None:
        running = running_jobs(session, owner.id, besides=job_id)
        if running >= limits.max_running_jobs:
            return (
                f"waiting: {owner.username} is at the limit of {limits.max_running_jobs} "
                f"running jobs; {retry}"
            )
    if limits.gpu_hours_per_day is not None and _on_gpu(device):
        used = gpu_seconds(session, owner.id, now) / 3600
        if used >= limits.gpu_hours_per_day:
            return (
                f"waiting: {owner.username} used the {limits.gpu_hours_per_day:g} GPU-hours "
                f"allowed per 24 h; {retry}"
            )
    return None
