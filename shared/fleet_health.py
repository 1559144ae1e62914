"""A fleet that heals: workers that stopped consuming, and workers that were lost.

Stuck consumer. A known Celery-on-Redis failure after broker reconnects leaves a worker
alive (its pool children beat, shared/worker_registry.py) but its main process takes no
messages. Seen from outside, a node is *not consuming* when all of these hold:

- it takes jobs: not cordoned or draining (shared/worker_nodes.py), and the slot below
  is not stopped by the crash guard;
- one of its slots is idle (runs no job), idle for TRAINYARD_STUCK_CONSUMER_SECONDS;
- no message reached any of its slots for that long (a consuming node gets every
  message it can while a slot is free, even one it only puts back or defers);
- its queues hold messages in Redis now (with a free consuming slot somewhere, a
  message does not stay there); and
- a queued job that idle slot could run (shared/scheduling.py `slot_takes`: GPU count
  and memory) has waited that long.

The last two keep a healthy node quiet: a job left queued without a message (its owner
at a limit, no slot with enough GPUs anywhere) is the reconciler's and the scheduler's
business, and a job that only a bigger slot can run says nothing about this one.

Lost worker. A node whose registry entries all expired without a clean shutdown
(SIGKILL, a lost host) is "lost"; its record (worker_registry.departed_nodes) names the
slots it ran, and `last_jobs` reads from the timeline what those slots claimed and what
became of each job since.

No Flask, no torch: the web reads these for GET /api/v1/workers and the workers page.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.job_states import JobState
from shared.orm import Job, JobEvent
from shared.scheduling import gpu_needs, slot_takes

QUEUED, RUNNING = JobState.QUEUED.value, JobState.RUNNING.value
# Jobs of a lost node shown, newest claim first.
LAST_JOBS = 5


# ----------------------------------------------------------------------------- stuck


@dataclass(frozen=True)
class QueuedJob:
    id: int
    queue: str
    waited_s: float
    gpus: int
    gpu_memory_gb: float | None


@dataclass(frozen=True)
class IdleSlot:
    """What the rule needs of one slot (server/cluster_status.py builds them)."""

    queues: tuple[str, ...]
    gpu_memory: tuple[int | None, ...]  # each of its GPUs' memory in bytes; () for CPU
    busy: bool
    stopped: bool  # by the crash guard
    idle_s: float | None  # None: a worker that does not say
    quiet_s: float | None


def queued_jobs(session: Session, queues: Iterable[str], now: datetime) -> list[QueuedJob]:
    """Jobs waiting in `queues` that a slot could claim (not out of attempts, no cancel
    pending), with how long each has waited since it last entered the queue."""
    queues = sorted(set(queues))
    if not queues:
        return []
    rows = session.execute(
        select(Job.id, Job.queue, Job.updated_at, Job.spec).where(
            Job.state == QUEUED,
            Job.queue.in_(queues),
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
    ).all()
    return [
        QueuedJob(r.id, r.queue, max((now - r.updated_at).total_seconds(), 0.0), *gpu_needs(r.spec))
        for r in rows
    ]


def duration_words(seconds: float) -> str:
    """ "45 s", "4 min", "2 h 5 min": how long, for a sentence."""
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def not_consuming(
    slots: Sequence[IdleSlot],
    cordoned: bool,
    messages: dict[str, int],
    waiting: Sequence[QueuedJob],
    after_s: float,
) -> str | None:
    """Why this node looks alive but not consuming (module docstring), as the page
    says it; None while nothing says so."""
    if cordoned or not slots:
        return None
    quiet = [s.quiet_s for s in slots]
    if any(q is None or q < after_s for q in quiet):
        return None  # some slot got a message lately (or a worker that does not say)
    idle = [
        s
        for s in slots
        if not s.busy and not s.stopped and s.idle_s is not None and s.idle_s >= after_s
    ]
    if not idle:
        return None
    queues = {q for s in idle for q in s.queues}
    if not any(messages.get(q, 0) > 0 for q in queues):
        return None
    could = [
        job
        for job in waiting
        if job.waited_s >= after_s
        and any(
            job.queue in s.queues and slot_takes(job.gpus, job.gpu_memory_gb, s.gpu_memory)
            for s in idle
        )
    ]
    if not could:
        return None
    longest = max(job.waited_s for job in could)
    jobs = "1 job it could take has" if len(could) == 1 else f"{len(could)} jobs it could take have"
    return (
        f"not consuming: {jobs} waited {duration_words(longest)}, "
        f"its idle slots got no message for {duration_words(min(q or 0 for q in quiet))}"
    )


# ----------------------------------------------------------------------------- lost


@dataclass(frozen=True)
class LostJob:
    id: int
    name: str | None
    owner_id: int | None
    attempt: int  # the attempt the lost node's slot ran
    state: str  # the job's state now
    fate: str  # what became of it, e.g. "requeued, resumed on host-b:123 (attempt 2)"


def last_jobs(session: Session, slot_names: Sequence[str], limit: int = LAST_JOBS) -> list[LostJob]:
    """The jobs the slots `slot_names` (host:pid) claimed last, newest claim first, each
    with what became of it since (from the jobs table and the timeline)."""
    if not slot_names:
        return []
    claims = session.execute(
        select(JobEvent.job_id, JobEvent.attempt, JobEvent.id)
        .where(JobEvent.kind == "claimed", JobEvent.worker.in_(list(slot_names)))
        .order_by(JobEvent.id.desc())
        .limit(limit * 4)
    ).all()
    seen: dict[int, tuple[int, int]] = {}
    for job_id, attempt, event_id in claims:
        if job_id not in seen and len(seen) < limit:
            seen[job_id] = (attempt or 0, event_id)
    if not seen:
        return []
    jobs = {
        j.id: j
        for j in session.execute(
            select(
                Job.id, Job.name, Job.owner_id, Job.state, Job.attempt, Job.worker,
                Job.error_message,
            ).where(Job.id.in_(list(seen)))
        )
    }  # fmt: skip
    later = session.execute(
        select(JobEvent.job_id, JobEvent.id, JobEvent.kind, JobEvent.attempt, JobEvent.worker)
        .where(JobEvent.job_id.in_(list(seen)))
        .order_by(JobEvent.id)
    ).all()
    out: list[LostJob] = []
    for job_id, (attempt, claim_id) in seen.items():
        job = jobs.get(job_id)
        if job is None:
            continue
        after = [e for e in later if e.job_id == job_id and e.id > claim_id]
        out.append(
            LostJob(
                id=job_id, name=job.name, owner_id=job.owner_id, attempt=attempt,
                state=job.state, fate=_fate(job, attempt, set(slot_names), after),
            )
        )  # fmt: skip
    return out


def _fate(job, attempt: int, here: set[str], after: list) -> str:  # type: ignore[no-untyped-def]
    """What became of `job` after this node's slot claimed its `attempt`."""
    claims = [e for e in after if e.kind == "claimed"]
    resumed = {e.attempt for e in after if e.kind == "resumed"}
    requeued = any(e.kind in ("requeued", "handed_back", "preempted") for e in after)
    elsewhere = claims[-1] if claims else None
    where = ""
    if elsewhere is not None:
        verb = "resumed" if elsewhere.attempt in resumed else "started again"
        where = f"{verb} on {elsewhere.worker} (attempt {elsewhere.attempt})"
    if job.state == RUNNING:
        if job.attempt == attempt and job.worker in here:
            return "still running here by the database: requeued once its lease runs out"
        return f"requeued, {where}" if where else "running"
    if job.state == QUEUED:
        return f"requeued, waiting for attempt {job.attempt + 1}"
    if job.state == "succeeded":
        return f"requeued, {where}, succeeded" if where else "succeeded"
    if job.state == "failed":
        detail = f": {job.error_message}" if job.error_message else ""
        prefix = f"requeued, {where}, " if where else ("requeued, " if requeued else "")
        return f"{prefix}failed{detail}"
    return job.state
