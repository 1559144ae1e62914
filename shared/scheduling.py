"""Scheduling: which waiting job a free slot runs, and when a running job makes room.

Celery's Redis lists are FIFO, so the order cannot live there. It lives in the database,
and a message is a token rather than an order: every queued job still gets exactly one
message, published after its row is committed (server/enqueue.py), exactly as before.
When a slot takes a message whose job is still queued, the worker does not simply run
that job: it ranks every job waiting in the same queue (`rank`) and claims the first it
can, each try a compare-and-set claim (shared/state_machine.py `claim_job`). The job it
ran still has its own message waiting in Redis, and that message, when a slot takes
it, runs the best job then waiting (which may be the one it was published for). So one
message still runs at most one job, every waiting job has a message, and the reconciler
recovers lost messages and dead workers as it always did (docs/architecture.md,
"Reliability"). A message whose own job is no longer queued (a duplicate) runs nothing.

The rank, highest first:

1. level: floor(effective priority), where effective priority = priority +
   TRAINYARD_AGING_POINTS_PER_HOUR x hours waited (since submission). Low priority is
   delayed, never starved: at the default of 1 point an hour a priority-0 job is level 9
   after nine hours, ahead of every fresh job.
2. within a level, owners take turns: an owner's waiting jobs are numbered from the
   number of jobs that owner already runs (0, 1, 2, ...), and lower numbers go first;
   among equal numbers, the owner whose last job started longest ago (or never) goes
   first. So user B's single job starts before user A's second (or 50th) job of the
   same level, also on a single slot where A never has two running.
3. then the higher effective priority, the older job, the lower id.

Preemption (`preempt_once`, run by the reconciler each pass): when the best waiting
job of a queue finds no free slot, it may stop one running job of the same queue whose
priority is strictly lower than its own (base priorities, so aging never preempts), that
is preemptible (spec `preemptible`, else TRAINYARD_PREEMPTIBLE_QUEUES), has run at least
TRAINYARD_PREEMPT_MIN_RUNTIME_SECONDS, and was not preempted in the last
TRAINYARD_PREEMPT_GUARD_SECONDS. The victim is flagged (`request_preemption`); its lease
heartbeat sees the flag, checkpoints and hands the job back ("preempted by job N"), and
it resumes from that checkpoint later. The loop guard: the guard window above, one
victim per waiting job at a time, and a flag withdrawn at the next heartbeat if the
preemptor no longer waits (shared/state_machine.py `renew_lease`).

No Flask, no torch, no Celery: the worker, the reconciler and the web's queues page use it.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import transaction, utcnow
from shared.job_states import JobState
from shared.log_setup import job_fields
from shared.orm import Job
from shared.settings import Settings
from shared.state_machine import request_preemption

log = logging.getLogger(__name__)

QUEUED, RUNNING = JobState.QUEUED.value, JobState.RUNNING.value
# Waiting jobs ranked per decision. A longer queue is ranked by its first this many in
# (priority, age) order: the rest cannot outrank them within one decision anyway unless
# aging lifts them, which the next decisions see as the front drains.
RANK_LIMIT = 5000


@dataclass(frozen=True)
class Waiting:
    id: int
    owner_id: int | None
    priority: int
    created_at: datetime
    max_runtime_s: int | None = None
    gpus: int = 0  # resources.gpus
    gpu_memory_gb: float | None = None  # resources.gpu_memory_gb


def gpu_needs(spec: dict[str, Any] | None) -> tuple[int, float | None]:
    """(resources.gpus, resources.gpu_memory_gb) of a stored spec."""
    resources = (spec or {}).get("resources") or {}
    memory = resources.get("gpu_memory_gb")
    return int(resources.get("gpus") or 0), float(memory) if memory else None


def slot_takes(gpus: int, gpu_memory_gb: float | None, slot_gpus: Sequence[int | None]) -> bool:
    """Whether a slot whose GPUs have `slot_gpus` bytes of memory each (None: unknown)
    can run a job needing `gpus` GPUs of at least `gpu_memory_gb` GB. A GPU of unknown
    memory (named by the operator on a host without NVML) never meets a memory need."""
    if gpus > len(slot_gpus):
        return False
    if gpu_memory_gb is None:
        return True
    return all(m is not None and m >= gpu_memory_gb * 1e9 for m in slot_gpus)


@dataclass(frozen=True)
class Ranked:
    job_id: int
    position: int  # 1: the next job a free slot of this queue runs
    priority: int
    effective_priority: float


def effective_priority(priority: int, waited_s: float, points_per_hour: float) -> float:
    """priority + aging: points_per_hour for every hour waited."""
    return priority + points_per_hour * max(0.0, waited_s) / 3600.0


def rank(
    waiting: Iterable[Waiting],
    running_per_owner: dict[int | None, int],
    now: datetime,
    points_per_hour: float,
    last_started: dict[int | None, datetime] | None = None,
) -> list[Ranked]:
    """The waiting jobs of one queue in the order free slots take them (module docstring).
    `last_started`: when each owner's most recent job started (absent: never)."""
    last_started = last_started or {}
    scored = [
        (job, effective_priority(job.priority, (now - job.created_at).total_seconds(),
                                 points_per_hour))
        for job in waiting
    ]  # fmt: skip
    by_owner: dict[int | None, list[tuple[Waiting, float]]] = defaultdict(list)
    for item in scored:
        by_owner[item[0].owner_id].append(item)
    keyed = []
    for owner, items in by_owner.items():
        items.sort(key=lambda it: (-it[1], it[0].created_at, it[0].id))
        turn = running_per_owner.get(owner, 0)
        served = last_started.get(owner, datetime.min)
        # Turns count within a level: an owner's job in a higher level does not spend
        # the owner's turn in a lower one.
        turns: dict[int, int] = {}
        for job, eff in items:
            level = math.floor(eff)
            mine = turns.get(level, turn)
            keyed.append(((-level, mine, served, -eff, job.created_at, job.id), job, eff))
            turns[level] = mine + 1
    keyed.sort(key=lambda k: k[0])
    return [
        Ranked(job.id, i, job.priority, round(eff, 3))
        for i, (_, job, eff) in enumerate(keyed, start=1)
    ]


def _waiting_in(session: Session, queue: str) -> list[Waiting]:
    rows = session.execute(
        select(Job.id, Job.owner_id, Job.priority, Job.created_at, Job.spec)
        .where(
            Job.state == QUEUED,
            Job.queue == queue,
            Job.cancel_requested.is_(False),
            Job.attempt < Job.max_attempts,
        )
        .order_by(Job.priority.desc(), Job.id)
        .limit(RANK_LIMIT)
    ).all()
    return [
        Waiting(
            r.id, r.owner_id, r.priority, r.created_at, (r.spec or {}).get("max_runtime_s"),
            *gpu_needs(r.spec),
        )
        for r in rows
    ]  # fmt: skip


def _running_per_owner(session: Session) -> dict[int | None, int]:
    stmt = select(Job.owner_id, func.count()).where(Job.state == RUNNING).group_by(Job.owner_id)
    return {owner: int(n) for owner, n in session.execute(stmt).all()}


def _last_started(session: Session, waiting: list[Waiting]) -> dict[int | None, datetime]:
    owners = sorted({w.owner_id for w in waiting if w.owner_id is not None})
    if len(owners) < 2:
        return {}  # one owner (or none): nobody to take turns with
    stmt = (
        select(Job.owner_id, func.max(Job.started_at))
        .where(Job.owner_id.in_(owners), Job.started_at.is_not(None))
        .group_by(Job.owner_id)
    )
    return {owner: when for owner, when in session.execute(stmt).all() if when is not None}


def _rank_waiting(
    session: Session, waiting: list[Waiting], now: datetime, points_per_hour: float
) -> list[Ranked]:
    return rank(
        waiting,
        _running_per_owner(session),
        now,
        points_per_hour,
        _last_started(session, waiting),
    )


def queue_order(
    session: Session, points_per_hour: float, queue: str, now: datetime | None = None
) -> list[Ranked]:
    """Every waiting job of `queue` (up to RANK_LIMIT), ranked: what the queues page and
    API show, and what the preemption pass looks at."""
    return _rank_waiting(session, _waiting_in(session, queue), now or utcnow(), points_per_hour)


def candidates_for(
    session: Session,
    settings: Settings,
    job_id: int,
    now: datetime | None = None,
    slot_gpus: Sequence[int | None] | None = None,
) -> list[int]:
    """The jobs a slot holding `job_id`'s message may run, best first.

    Only jobs of that job's queue; when the message carries a hard time limit
    (shared/celery_app.py), only jobs whose own limit fits under it; with `slot_gpus`
    (the memory of each of the slot's GPUs), only jobs the slot can take (`slot_takes`),
    so a 1-GPU slot never takes another message's 2-GPU job. The message's own
    job need not be waiting any more: when another message ran it, this one stands in
    for that message (module docstring). [] for an unknown job or an empty queue.
    """
    own = session.execute(select(Job.queue, Job.spec, Job.state).where(Job.id == job_id)).first()
    if own is None:
        return []
    limit = (own.spec or {}).get("max_runtime_s")

    def fits(w: Waiting) -> bool:
        # Not even its own message runs a job on too few GPUs: it would fail there
        # (NotEnoughDevices). Left waiting without a message, the reconciler publishes
        # it again until a slot with enough GPUs takes it.
        if slot_gpus is not None and not slot_takes(w.gpus, w.gpu_memory_gb, slot_gpus):
            return False
        if w.id == job_id:
            return True
        return not limit or (w.max_runtime_s is not None and w.max_runtime_s <= limit)

    waiting = [w for w in _waiting_in(session, own.queue) if fits(w)]
    order = _rank_waiting(session, waiting, now or utcnow(), settings.aging_points_per_hour)
    ids = [r.job_id for r in order]
    own_fits = slot_gpus is None or slot_takes(*gpu_needs(own.spec), slot_gpus)
    if own.state == QUEUED and own_fits and job_id not in ids:
        ids.append(job_id)  # beyond RANK_LIMIT: its own message still runs it
    return ids


# ----------------------------------------------------------------------------- preemption


def is_preemptible(spec: dict | None, queue: str, settings: Settings) -> bool:
    """The spec's `preemptible`, else whether its queue is in TRAINYARD_PREEMPTIBLE_QUEUES."""
    chosen = (spec or {}).get("preemptible")
    if chosen is not None:
        return bool(chosen)
    defaults = {q.strip() for q in settings.preemptible_queues.split(",") if q.strip()}
    return queue in defaults


@dataclass(frozen=True)
class Preemption:
    victim: int
    preemptor: int


def free_slots(client: redis.Redis, queue: str, running_workers: Sequence[str | None]) -> int:
    """Online slots consuming `queue` (shared/worker_registry.py) not running a job."""
    from shared.worker_registry import online_slots

    busy = {w for w in running_workers if w}
    return sum(
        1 for s in online_slots(client) if queue in s.info.queues and s.info.name not in busy
    )


def preempt_once(
    settings: Settings, client: redis.Redis, now: datetime | None = None
) -> list[Preemption]:
    """One pass: for each queue whose best waiting job finds no free slot, flag at most
    one victim for it (module docstring). Raises RedisError and database errors."""
    now = now or utcnow()
    url = settings.resolved_database_url
    done: list[Preemption] = []
    with transaction(url) as session:
        queues = [
            q for (q,) in session.execute(select(Job.queue).where(Job.state == QUEUED).distinct())
        ]
    for queue in queues:
        with transaction(url) as session:
            order = queue_order(session, settings.aging_points_per_hour, queue, now)
            running = session.execute(
                select(
                    Job.id, Job.priority, Job.attempt, Job.worker, Job.spec, Job.started_at,
                    Job.preempt_requested_by, Job.preempted_at,
                ).where(Job.state == RUNNING, Job.queue == queue)
            ).all()  # fmt: skip
        if not order or not running:
            continue
        if free_slots(client, queue, [r.worker for r in running]) > 0:
            continue  # a slot is free: the waiting job starts without anyone stopping
        pending = {r.preempt_requested_by for r in running if r.preempt_requested_by}
        best = order[0]
        if best.job_id in pending:
            continue  # its victim is already on the way out
        victim = _pick_victim(running, queue, best.priority, settings, now)
        if victim is None:
            continue
        with transaction(url) as session:
            if request_preemption(session, victim.id, victim.attempt, best.job_id):
                log.info(
                    "scheduler: job %s preempts job %s",
                    best.job_id,
                    victim.id,
                    extra=job_fields(victim.id),
                )
                done.append(Preemption(victim.id, best.job_id))
    return done


def _pick_victim(running: Sequence, queue: str, priority: int, settings: Settings, now: datetime):  # type: ignore[no-untyped-def]
    min_start = now - timedelta(seconds=settings.preempt_min_runtime_seconds)
    guard = now - timedelta(seconds=settings.preempt_guard_seconds)
    eligible = [
        r
        for r in running
        if r.priority < priority
        and r.preempt_requested_by is None
        and is_preemptible(r.spec, queue, settings)
        and r.started_at is not None
        and r.started_at <= min_start
        and (r.preempted_at is None or r.preempted_at < guard)
    ]
    # The lowest priority first; among those the most recently started loses least.
    eligible.sort(key=lambda r: (r.priority, -r.started_at.timestamp()))
    return eligible[0] if eligible else None
