"""What the workers and queues are doing, for GET /api/v1/workers, /queues and /workers.

Three sources are joined here: the worker registry in Redis (shared/worker_registry.py:
which slots are online and which queues they consume), the broker's queue lists
(shared/broker.py: how many messages wait), and the jobs table (what runs where, what waits, in which order).

Members must not learn about other users' jobs: a slot running someone else's job is
only "busy", and the waiting list holds the caller's own jobs. Counts (queue depths,
jobs ahead) are shown to everyone: they say how long a wait is, not whose work it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.access import can_see, visible_jobs
from server.auth import Principal
from server.serialize import iso
from shared.broker import queue_depths, redis_client
from shared.celery_app import QUEUES
from shared.db import utcnow
from shared.fleet_health import IdleSlot, last_jobs, not_consuming, queued_jobs
from shared.orm import Job, User
from shared.scheduling import Ranked, gpu_needs, queue_order, slot_takes
from shared.state_machine import JobState
from shared.worker_nodes import NodeControl, all_controls, slot_guards
from shared.worker_registry import (
    ConsumerRestarts,
    DepartedNode,
    OnlineSlot,
    consumer_restarts,
    departed_nodes,
    online_slots,
)

log = logging.getLogger(__name__)

# The waiting list shows this many jobs, in the order workers will take them.
WAITING_SHOWN = 100
# A page must answer even when Redis does not: give up on it quickly.
REDIS_TIMEOUT_S = 2.0

QUEUED, RUNNING = JobState.QUEUED.value, JobState.RUNNING.value


# ----------------------------------------------------------------------------- why it waits


@dataclass(frozen=True)
class WaitReason:
    code: str  # no_worker | slots_busy | jobs_ahead | next_in_line | unknown
    text: str


def _jobs(n: int) -> str:
    return f"{n} job" if n == 1 else f"{n} jobs"


def wait_reason(queue: str, ahead: int, slots: int | None, busy: int) -> WaitReason:
    """Why a queued job has not started yet.

    `ahead`: queued jobs of the same queue that workers take before it; `slots`: worker
    slots consuming the queue (None when the registry could not be read); `busy`: how
    many of those run a job now.
    """
    if slots is None:
        return WaitReason("unknown", "unknown: the broker cannot be reached")
    if slots <= 0:
        return WaitReason("no_worker", f"no worker consumes the {queue} queue")
    free = max(slots - busy, 0)
    if free > ahead:
        # The free slots take the jobs ahead and this one in the same round.
        return WaitReason("next_in_line", "next in line")
    all_busy = (
        f"the only {queue} slot is busy" if slots == 1 else f"all {slots} {queue} slots are busy"
    )
    if free == 0 and ahead == 0:
        return WaitReason("slots_busy", all_busy)
    if free == 0:
        return WaitReason("jobs_ahead", f"{_jobs(ahead)} ahead of it; {all_busy}")
    return WaitReason("jobs_ahead", f"{_jobs(ahead)} ahead of it")


# ----------------------------------------------------------------------------- the broker


@dataclass(frozen=True)
class ClusterSnapshot:
    """The registry and queue lengths, read from Redis once per request."""

    slots: list[OnlineSlot] | None  # None: Redis could not be read
    messages: dict[str, int]  # queue -> messages waiting in Redis
    error: str | None = None
    # Nodes with no slot online seen within keep_lost_s: lost or stopped.
    departed: list[DepartedNode] = field(default_factory=list)
    # Online nodes that restarted their consumer by themselves (worker/consumer_watch.py).
    restarts: dict[str, ConsumerRestarts] = field(default_factory=dict)


def read_cluster(
    url: str | None, queues: Sequence[str] = QUEUES, keep_lost_s: float = 24 * 3600.0
) -> ClusterSnapshot:
    if not url:
        return ClusterSnapshot(None, {}, "TRAINYARD_REDIS_URL is not set")
    client = redis_client(url, timeout_s=REDIS_TIMEOUT_S)
    try:
        slots = online_slots(client)
        online = {s.info.node for s in slots}
        return ClusterSnapshot(
            slots,
            queue_depths(client, queues),
            departed=departed_nodes(client, online, keep_lost_s),
            restarts=consumer_restarts(client, sorted(online)),
        )
    except (redis.RedisError, OSError) as exc:
        log.warning("cluster status: cannot read Redis (%s)", exc)
        return ClusterSnapshot(None, {}, f"cannot reach Redis ({type(exc).__name__})")
    finally:
        client.close()


# ----------------------------------------------------------------------------- workers


def _unix_iso(ts: float) -> str | None:
    if ts <= 0:
        return None
    return iso(datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None))


def _running_by_worker(session: Session, names: list[str]) -> dict[str, Any]:
    if not names:
        return {}
    stmt = (
        select(
            Job.id,
            Job.name,
            Job.kind,
            Job.owner_id,
            User.username,
            Job.worker,
            Job.started_at,
            Job.progress,
        )
        .outerjoin(User, User.id == Job.owner_id)
        .where(Job.state == RUNNING, Job.worker.in_(names))
    )
    return {row.worker: row for row in session.execute(stmt)}


def _progress(progress: dict[str, Any] | None) -> float | None:
    value = (progress or {}).get("fraction")
    return float(value) if isinstance(value, (int, float)) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _slot_stats(sample: dict[str, Any] | None) -> dict[str, Any]:
    slot = (sample or {}).get("slot") or {}
    rss = _number(slot.get("rss_bytes"))
    return {
        "cpu_percent": _number(slot.get("cpu_percent")),
        "rss_bytes": None if rss is None else int(rss),
    }


_HOST_FIELDS = ("cpu_percent", "cpus", "mem_used_bytes", "mem_total_bytes")
_GPU_FIELDS = (
    "util_percent", "mem_used_bytes", "mem_total_bytes", "temp_c", "power_w",
)  # fmt: skip


def _add_telemetry(node: dict[str, Any], slot: OnlineSlot) -> None:
    """Fold a slot's latest sample (worker/telemetry.py) into its node: the host figures
    of the freshest sample, and each GPU some slot owns, by index, freshest first. The
    sample comes from Redis, so only known fields of the right type pass through."""
    sample = slot.telemetry
    if not sample:
        return
    at = _number(sample.get("at")) or 0.0
    newest = at >= node.get("_telemetry_at", -1.0)
    if newest:
        node["_telemetry_at"] = at
    host = sample.get("host")
    if isinstance(host, dict) and newest:
        node["host_stats"] = {k: _number(host.get(k)) for k in _HOST_FIELDS}
    gpus = {g["index"]: g for g in node["gpu_stats"]}
    for gpu in sample.get("gpus") or []:
        index = gpu.get("index") if isinstance(gpu, dict) else None
        if not isinstance(index, int) or (index in gpus and not newest):
            continue
        name = gpu.get("name")
        gpus[index] = {
            "index": index,
            "name": name if isinstance(name, str) else None,
            "slot": slot.name,
            **{k: _number(gpu.get(k)) for k in _GPU_FIELDS},
        }
    node["gpu_stats"] = [gpus[i] for i in sorted(gpus)]


def _slot_gpu(gpu: dict[str, Any]) -> dict[str, Any]:
    # Registry entries are written by workers of any version: keep the known fields only.
    return {k: gpu.get(k) for k in ("index", "uuid", "name", "memory_total_bytes")}


def workers_json(
    session: Session,
    cluster: ClusterSnapshot,
    user: Principal,
    stuck_after_s: float = 120.0,
) -> dict[str, Any]:
    """Online slots grouped by node, each with its current job (if the user may see it);
    whether each node still consumes; nodes lost or stopped lately (shared/fleet_health.py)."""
    slots = cluster.slots or []
    running = _running_by_worker(session, [s.name for s in slots])
    nodes: dict[str, dict[str, Any]] = {}
    for slot in slots:
        info = slot.info
        node = nodes.setdefault(
            info.node,
            {
                "node": info.node,
                "host": info.host,
                "queues": [],
                "slots": info.node_slots,
                "online_slots": 0,
                "busy_slots": 0,
                "gpus": 0,
                "gpu_names": [],
                "_gpus": {},
                "host_stats": None,
                "gpu_stats": [],
                "workers": [],
            },
        )
        _add_telemetry(node, slot)
        if info.gpus:
            for gpu in info.gpus:
                if isinstance(gpu.get("index"), int):
                    node["_gpus"][gpu["index"]] = gpu.get("name") or f"GPU {gpu['index']}"
        elif len(info.gpu_names) > len(node["gpu_names"]):
            node["gpu_names"] = list(info.gpu_names)
        node["queues"] = sorted(set(node["queues"]) | set(info.queues))
        row = running.get(slot.name)
        job = None
        if row is not None and can_see(row.owner_id, user):
            job = {
                "id": row.id,
                "name": row.name,
                "kind": row.kind,
                "owner": row.username,
                "started_at": iso(row.started_at),
                "progress": _progress(row.progress),
            }
        node["online_slots"] += 1
        node["busy_slots"] += row is not None
        node["workers"].append(
            {
                "name": slot.name,
                "pid": info.pid,
                "device": info.device,
                "slot": info.slot,
                "gpus": [_slot_gpu(g) for g in info.gpus],
                "started_at": _unix_iso(info.started_at),
                "last_heartbeat": _unix_iso(slot.last_heartbeat),
                "heartbeat_age_s": slot.heartbeat_age_s,
                "busy": row is not None,
                "job": job,
                **_slot_stats(slot.telemetry),
                "stopped": None,
                "quick_deaths": 0,
                "idle_s": slot.idle_s,
                "quiet_s": slot.quiet_s,
            }
        )
    offline = _add_control(session, nodes, user)
    _add_consuming(session, nodes, cluster.messages, stuck_after_s)
    for name, node in nodes.items():
        restarts = cluster.restarts.get(name)
        node["consumer_restarts"] = None if restarts is None else {
            "count": restarts.count,
            "last_at": _unix_iso(restarts.last_at),
            "reason": restarts.reason,
        }  # fmt: skip
    for node in nodes.values():
        node.pop("_telemetry_at", None)
        # A pinned slot lists only its own GPUs (worker/slots.py): the node has them all.
        # A slot from before pinning lists names only; the node then has the most it saw.
        by_index = node.pop("_gpus")
        if by_index:
            node["gpu_names"] = [by_index[i] for i in sorted(by_index)]
        node["gpus"] = len(node["gpu_names"])
    return {
        "nodes": list(nodes.values()),
        "offline_nodes": offline,
        "lost_nodes": _lost_nodes(session, cluster.departed, user),
        "online_slots": len(slots),
        "busy_slots": sum(n["busy_slots"] for n in nodes.values()),
        "broker_error": cluster.error,
        "checked_at": iso(utcnow()),
    }


def _add_consuming(
    session: Session, nodes: dict[str, dict[str, Any]], messages: dict[str, int], after_s: float
) -> None:
    """Each node's `not_consuming`: why it looks alive but takes no messages, or None
    (shared/fleet_health.py)."""
    waiting = None
    now = utcnow()
    for node in nodes.values():
        node["not_consuming"] = None
        slots = [
            IdleSlot(
                queues=tuple(node["queues"]),
                gpu_memory=tuple(g.get("memory_total_bytes") for g in w["gpus"]),
                busy=w["busy"],
                stopped=bool(w["stopped"]),
                idle_s=w["idle_s"],
                quiet_s=w["quiet_s"],
            )
            for w in node["workers"]
        ]
        # The cheap half first: the jobs are read only when some node looks quiet.
        if node["control"]["cordoned"] or not all(
            s.quiet_s is not None and s.quiet_s >= after_s for s in slots
        ):
            continue
        if waiting is None:
            waiting = queued_jobs(session, QUEUES, now)
        node["not_consuming"] = not_consuming(slots, False, messages, waiting, after_s)


def _lost_nodes(
    session: Session, departed: list[DepartedNode], user: Principal
) -> list[dict[str, Any]]:
    """Nodes with no slot online seen lately: "lost" (no clean shutdown) with the jobs
    their slots ran last and what became of each, or "stopped"."""
    out = []
    for node in departed:
        jobs = []
        if node.lost:
            for job in last_jobs(session, node.slot_names):
                visible = can_see(job.owner_id, user)
                jobs.append(
                    {
                        "id": job.id if visible else None,
                        "name": job.name if visible else None,
                        "attempt": job.attempt,
                        "state": job.state,
                        "fate": job.fate if visible else f"another user's job: {job.state}",
                    }
                )
        out.append(
            {
                "node": node.node,
                "host": node.host,
                "state": "lost" if node.lost else "stopped",
                "last_seen": _unix_iso(node.last_seen),
                "stopped_at": _unix_iso(node.stopped_at) if node.stopped_at else None,
                "slots": list(node.slot_names[:8]),
                "jobs": jobs,
            }
        )
    return out


def control_json(control: NodeControl, running_jobs: int, user: Principal) -> dict[str, Any]:
    """An admin's say over a node (shared/worker_nodes.py), as the API shows it."""
    return {
        "state": control.state(running_jobs),
        "cordoned": control.cordoned,
        "draining": control.draining,
        "drain_now": control.drain_now,
        # Which admin did it: for admins only, like other users' names.
        "changed_by": control.changed_by if user.is_admin else None,
        "changed_at": iso(control.changed_at),
    }


def _add_control(
    session: Session, nodes: dict[str, dict[str, Any]], user: Principal
) -> list[dict[str, Any]]:
    """Each node's cordon/drain state, and each slot's crash guard (the database's).
    Returns the nodes not online that are cordoned or have stopped slots: a node
    drained for maintenance must not be forgotten while it is down."""
    controls = all_controls(session)
    guards = slot_guards(session)
    offline: list[dict[str, Any]] = []
    stopped_by_node: dict[str, set[int]] = {}
    for guard in guards.values():
        if guard.stopped:
            stopped_by_node.setdefault(guard.node, set()).add(guard.slot)
    for name in sorted((set(controls) | set(stopped_by_node)) - set(nodes)):
        control = controls.get(name, NodeControl(node=name))
        if control.cordoned or stopped_by_node.get(name):
            offline.append(
                {
                    "node": name,
                    "control": control_json(control, 0, user),
                    "stopped_slots": len(stopped_by_node.get(name, ())),
                }
            )
    for name, node in nodes.items():
        control = controls.get(name, NodeControl(node=name))
        node["control"] = control_json(control, node["busy_slots"], user)
        # By slot index: a killed child's entry lingers beside its replacement's until
        # it expires (shared/worker_registry.py), and both name the same slot.
        stopped: set[int] = set()
        for slot in node["workers"]:
            guard = guards.get((name, slot["slot"])) if slot["slot"] is not None else None
            if guard is not None:
                slot["quick_deaths"] = guard.quick_deaths
                if guard.stopped:
                    slot["stopped"] = f"stopped: {guard.stopped_reason}"
                    stopped.add(guard.slot)
        node["stopped_slots"] = len(stopped)
    return offline


# ----------------------------------------------------------------------------- queues


def _job_counts(session: Session) -> dict[tuple[str, str], int]:
    stmt = (
        select(Job.queue, Job.state, func.count())
        .where(Job.state.in_((QUEUED, RUNNING)))
        .group_by(Job.queue, Job.state)
    )
    return {(queue, state): n for queue, state, n in session.execute(stmt)}


def busy_slot_names(session: Session, names: list[str]) -> set[str]:
    if not names:
        return set()
    stmt = select(Job.worker).where(Job.state == RUNNING, Job.worker.in_(names))
    return {w for (w,) in session.execute(stmt)}


def _waiting_jobs(
    session: Session, user: Principal, aging_points_per_hour: float
) -> tuple[list[Any], int]:
    """The user's queued jobs (an admin's: everyone's) in the order workers take them
    (shared/scheduling.py: effective priority, then owners' turns), each with its
    position in its queue, and how many there are."""
    now = utcnow()
    ranked: list[Ranked] = []
    for queue in QUEUES:
        ranked.extend(queue_order(session, aging_points_per_hour, queue, now))
    by_id = {r.job_id: r for r in ranked}
    visible = [r.job_id for r in ranked]
    if not user.is_admin:
        # Other users' jobs still count as ahead of this user's, they are only not listed.
        mine = set(session.scalars(
            select(Job.id).where(Job.state == QUEUED, Job.owner_id == user.id)
        ))  # fmt: skip
        visible = [i for i in visible if i in mine]
    visible.sort(key=lambda i: (by_id[i].position, i))
    shown = visible[:WAITING_SHOWN]
    rows = session.execute(
        select(
            Job.id, Job.name, Job.kind, Job.queue, Job.priority, Job.model_name,
            Job.dataset_name, Job.attempt, Job.updated_at, Job.owner_id, User.username,
            Job.spec,
        )
        .outerjoin(User, User.id == Job.owner_id)
        .where(Job.id.in_(shown))
    ).all()  # fmt: skip
    order = {job_id: i for i, job_id in enumerate(shown)}
    rows.sort(key=lambda r: order[r.id])
    total_stmt = select(func.count()).select_from(Job).where(Job.state == QUEUED)
    total = session.scalar(visible_jobs(total_stmt, user)) or 0
    return [(row, by_id[row.id]) for row in rows], total


def queues_json(
    session: Session,
    cluster: ClusterSnapshot,
    user: Principal,
    aging_points_per_hour: float = 1.0,
) -> dict[str, Any]:
    """Depth and capacity per queue, and the user's waiting jobs with why each waits."""
    slots = cluster.slots
    names = [s.name for s in slots or []]
    busy_names = busy_slot_names(session, names)
    counts = _job_counts(session)
    capacity: dict[str, tuple[int | None, int]] = {}
    offered: dict[str, list[list[int | None]]] = {}  # per queue: each slot's GPU memory
    queues = []
    for queue in QUEUES:
        consuming = [s for s in slots or [] if queue in s.info.queues]
        total = None if slots is None else len(consuming)
        busy = sum(s.name in busy_names for s in consuming)
        capacity[queue] = (total, busy)
        offered[queue] = [[g.get("memory_total_bytes") for g in s.info.gpus] for s in consuming]
        queues.append(
            {
                "name": queue,
                "messages": cluster.messages.get(queue),
                "queued_jobs": counts.get((queue, QUEUED), 0),
                "running_jobs": counts.get((queue, RUNNING), 0),
                "slots": total,
                "busy_slots": busy,
                "nodes": len({s.info.node for s in consuming}),
            }
        )
    rows, total_waiting = _waiting_jobs(session, user, aging_points_per_hour)
    now = utcnow()
    waiting = []
    for row, rank in rows:
        total_slots, busy = capacity.get(row.queue, (0, 0) if slots is not None else (None, 0))
        ahead = rank.position - 1
        reason = wait_reason(row.queue, ahead, total_slots, busy)
        gpus, memory_gb = gpu_needs(row.spec)
        # Slots only take jobs that fit their GPUs (shared/scheduling.py): until a worker
        # offers them, nothing ever runs this job.
        needs_more = (gpus > 1 or memory_gb) and total_slots
        if needs_more and not any(slot_takes(gpus, memory_gb, s) for s in offered[row.queue]):
            wanted = f"{gpus} GPUs on one host" if gpus > 1 else "a GPU"
            if memory_gb:
                wanted += f" with {memory_gb:g} GB" + (" each" if gpus > 1 else "")
            reason = WaitReason("no_worker", f"no worker offers {wanted}")
        waiting.append(
            {
                "id": row.id,
                "name": row.name,
                "kind": row.kind,
                "owner": row.username,
                "queue": row.queue,
                "priority": row.priority,
                "model": row.model_name,
                "dataset": row.dataset_name,
                "attempt": row.attempt,
                "queued_since": iso(row.updated_at),
                "waiting_s": round(max((now - row.updated_at).total_seconds(), 0.0), 1),
                "ahead": ahead,
                "position": rank.position,
                "effective_priority": rank.effective_priority,
                "reason_code": reason.code,
                "reason": reason.text,
            }
        )
    return {
        "queues": queues,
        "waiting": waiting,
        "waiting_total": total_waiting,
        "broker_error": cluster.error,
        "checked_at": iso(now),
    }
