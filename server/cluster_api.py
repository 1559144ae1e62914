"""Who is online and what waits: GET /api/v1/workers and GET /api/v1/queues; and, for
admins, POST /api/v1/workers/<node>/cordon|drain|uncordon|clear (shared/worker_nodes.py).

The answers are built in server/cluster_status.py (shared with the /workers page); the
models below describe them for the OpenAPI document.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import Field
from spectree import Tag

from server import openapi
from server.api_schemas import ResponseModel
from server.auth import api_user, authenticate_api_request
from server.cluster_status import (
    WAITING_SHOWN,
    busy_slot_names,
    control_json,
    queues_json,
    read_cluster,
    workers_json,
)
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, QueryModel, parse_query
from shared.spec import JobKindName
from shared.worker_nodes import (
    Action,
    check_node_name,
    clear_guard,
    node_control,
    set_control,
    slot_guards,
)

bp = Blueprint("cluster_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)

openapi.TAGS.setdefault(
    "cluster",
    Tag(name="cluster", description="Worker slots online, queue depths, why jobs wait"),
)

_BROKER_ERROR = "why Redis could not be read (the registry and depths are then unknown)"


# ---------------------------------------------------------------- response models


class SlotJob(ResponseModel):
    id: int
    name: str | None
    kind: JobKindName
    owner: str | None
    started_at: datetime | None
    progress: float | None = Field(description="fraction of its steps done, 0 to 1")


class SlotGpu(ResponseModel):
    index: int | None = Field(description="the GPU's index on its host, as nvidia-smi numbers it")
    uuid: str | None
    name: str | None
    memory_total_bytes: int | None = Field(
        description="what routing by resources.gpu_memory_gb compares against"
    )


class WorkerSlot(ResponseModel):
    name: str = Field(description="host:pid, as a job's `worker` names it")
    pid: int
    device: str = Field(description='the torch device its jobs run on: "cpu", "cuda:0"')
    slot: int | None = Field(description="the worker slot this pool child owns")
    gpus: list[SlotGpu] = Field(
        description="the GPUs the slot owns (its jobs see them as cuda:0, cuda:1, ...); "
        "empty on a CPU slot"
    )
    started_at: datetime | None
    last_heartbeat: datetime | None = Field(description="by the worker's clock")
    heartbeat_age_s: float = Field(description="seconds since its last heartbeat")
    busy: bool = Field(description="whether it runs a job now")
    job: SlotJob | None = Field(
        description="the job it runs; null when idle, or when the job is another user's "
        "(members see only that the slot is busy)"
    )
    cpu_percent: float | None = Field(
        description="CPU use of the slot's process and its children at its last sample, "
        "in % of one core (200: two cores); null before the first sample"
    )
    rss_bytes: int | None = Field(description="their resident memory at that sample")
    stopped: str | None = Field(
        description='why the crash guard stopped this slot taking jobs, e.g. "stopped: 3 '
        'jobs died within 10 s in a row: ..."; null while it takes jobs'
    )
    quick_deaths: int = Field(description="its jobs that died within seconds, in a row")
    idle_s: float | None = Field(
        description="seconds since its last task ended (0 while one runs); null from a "
        "worker that does not say"
    )
    quiet_s: float | None = Field(
        description="seconds since a message last reached it (or since it started)"
    )


class HostStats(ResponseModel):
    cpu_percent: float | None = Field(description="the host's CPU use, % of all its cores")
    cpus: float | None = Field(description="logical CPUs")
    mem_used_bytes: float | None
    mem_total_bytes: float | None


class GpuStats(ResponseModel):
    index: int = Field(description="the GPU's NVML index, as nvidia-smi numbers it")
    name: str | None
    slot: str = Field(description="the slot that sampled it (host:pid)")
    util_percent: float | None = Field(description="share of time a kernel ran")
    mem_used_bytes: float | None
    mem_total_bytes: float | None
    temp_c: float | None
    power_w: float | None


class NodeControlState(ResponseModel):
    state: Literal["active", "cordoned", "draining", "drained"] = Field(
        description="draining: cordoned, its running jobs finish; drained: and none runs"
    )
    cordoned: bool = Field(description="it takes no new jobs")
    draining: bool
    drain_now: bool = Field(description="its running jobs are handed back with a checkpoint")
    changed_by: str | None = Field(description="who changed it last (shown to admins)")
    changed_at: datetime | None


class ConsumerRestarts(ResponseModel):
    count: int
    last_at: datetime | None = Field(description="the last one, by the worker's clock")
    reason: str = Field(description="what the node found then, as `not_consuming` says it")


class WorkerNode(ResponseModel):
    node: str = Field(description="the Celery node name, e.g. trainyard-1234@gpu-01")
    host: str
    queues: list[str] = Field(description="queues its slots take jobs from")
    slots: int = Field(description="slots the node runs (its concurrency)")
    online_slots: int = Field(description="slots heard from within the registry's TTL")
    busy_slots: int
    gpus: int = Field(description="GPUs the worker can see; 0: CPU only")
    gpu_names: list[str]
    host_stats: HostStats | None = Field(
        description="the host's latest sample from any of its slots (every few seconds); "
        "null before the first"
    )
    gpu_stats: list[GpuStats] = Field(
        description="the latest sample of each GPU the node's slots own; empty on a "
        "host without NVIDIA GPUs"
    )
    workers: list[WorkerSlot]
    control: NodeControlState
    stopped_slots: int = Field(description="slots the crash guard stopped")
    not_consuming: str | None = Field(
        description='why the node looks alive but takes no messages, e.g. "not consuming: '
        '3 jobs it could take have waited 4 min, ..." (TRAINYARD_STUCK_CONSUMER_SECONDS); '
        "null while it consumes. Remedy: restart the worker (README)"
    )
    consumer_restarts: ConsumerRestarts | None = Field(
        description="the times the node restarted its queue consumer by itself "
        "(TRAINYARD_STUCK_CONSUMER_RESTART); null: never"
    )


class OfflineNode(ResponseModel):
    node: str
    control: NodeControlState
    stopped_slots: int


class LostJob(ResponseModel):
    id: int | None = Field(description="null for another user's job (members)")
    name: str | None
    attempt: int = Field(description="the attempt the node ran")
    state: str = Field(description="the job's state now")
    fate: str = Field(
        description='what became of it, e.g. "requeued, resumed on host-b:123 (attempt 2), '
        'succeeded" or "failed: ..."'
    )


class LostNode(ResponseModel):
    node: str
    host: str
    state: Literal["lost", "stopped"] = Field(
        description="lost: its slots vanished without a clean shutdown (SIGKILL, a lost "
        "host); stopped: shut down cleanly"
    )
    last_seen: datetime | None = Field(description="its last heartbeat, by its clock")
    stopped_at: datetime | None
    slots: list[str] = Field(description="the slots (host:pid) it ran, newest first")
    jobs: list[LostJob] = Field(description="a lost node's last jobs, newest claim first")


class Workers(ResponseModel):
    nodes: list[WorkerNode]
    offline_nodes: list[OfflineNode] = Field(
        description="nodes not online that are cordoned or have slots stopped by the "
        "crash guard (the state waits for their restart)"
    )
    lost_nodes: list[LostNode] = Field(
        description="nodes with no slot online seen within TRAINYARD_LOST_WORKER_HOURS, "
        "newest first"
    )
    online_slots: int
    busy_slots: int
    broker_error: str | None = Field(description=_BROKER_ERROR)
    checked_at: datetime


class QueueStatus(ResponseModel):
    name: str
    messages: int | None = Field(description="messages waiting in Redis; null if unknown")
    queued_jobs: int = Field(description="jobs in state `queued` (everyone's)")
    running_jobs: int
    slots: int | None = Field(description="online slots consuming it; null if unknown")
    busy_slots: int
    nodes: int = Field(description="worker nodes consuming it")


class WaitingJob(ResponseModel):
    id: int
    name: str | None
    kind: JobKindName
    owner: str | None
    queue: str
    priority: int
    model: str | None
    dataset: str | None
    attempt: int = Field(description="claims so far; above 0 for a job handed back")
    queued_since: datetime = Field(description="when it last entered the queue")
    waiting_s: float
    ahead: int = Field(description="queued jobs of its queue that workers take first")
    position: int = Field(description="1: the next job a free slot of its queue runs")
    effective_priority: float = Field(
        description="priority plus aging (TRAINYARD_AGING_POINTS_PER_HOUR per hour waited)"
    )
    reason_code: Literal["no_worker", "slots_busy", "jobs_ahead", "next_in_line", "unknown"]
    reason: str = Field(description='why it waits, e.g. "all 2 gpu slots are busy"')


class Queues(ResponseModel):
    queues: list[QueueStatus]
    waiting: list[WaitingJob] = Field(
        description=f"the caller's queued jobs (an admin's: everyone's), the first "
        f"{WAITING_SHOWN} in the order workers take them"
    )
    waiting_total: int = Field(description="how many queued jobs the caller may see")
    broker_error: str | None = Field(description=_BROKER_ERROR)
    checked_at: datetime


# ---------------------------------------------------------------- routes


def _broker_url() -> str | None:
    return current_app.config["TRAINYARD_SETTINGS"].redis_url


@bp.get("/workers")
@operation(tag="cluster", ok={200: Workers})
def list_workers() -> ResponseReturnValue:
    """Worker slots online, grouped by node, with the job each one runs.

    A slot shows up within a few seconds of starting and disappears when it stops (or
    within 20 s if it dies). Members see a slot running another user's job as busy only.
    A node alive but not consuming says why in `not_consuming`; nodes whose slots all
    vanished are under `lost_nodes` ("lost", with their last jobs' fate, or "stopped").
    """
    parse_query(NoQuery)
    settings = current_app.config["TRAINYARD_SETTINGS"]
    cluster = read_cluster(_broker_url(), keep_lost_s=settings.lost_worker_hours * 3600)
    return jsonify(
        workers_json(get_session(), cluster, api_user(), settings.stuck_consumer_seconds)
    )


@bp.get("/queues")
@operation(tag="cluster", ok={200: Queues})
def list_queues() -> ResponseReturnValue:
    """Queue depths and capacity, and why each of the caller's queued jobs waits."""
    parse_query(NoQuery)
    settings = current_app.config["TRAINYARD_SETTINGS"]
    return jsonify(
        queues_json(
            get_session(), read_cluster(_broker_url()), api_user(), settings.aging_points_per_hour
        )
    )


# ---------------------------------------------------------------- node control (admins)


class NodeStatus(ResponseModel):
    node: str = Field(description="the Celery node name")
    control: NodeControlState
    stopped_slots: int = Field(description="slots the crash guard has stopped now")


class DrainQuery(QueryModel):
    now: bool = Field(
        default=False,
        description="hand running jobs back with a checkpoint instead of letting them finish",
    )


def _admin_node(node: str) -> str:
    if not api_user().is_admin:
        raise ApiError(403, "forbidden", "only admins can cordon, drain or clear workers", {})
    try:
        return check_node_name(node)
    except ValueError as exc:
        # No node can have that name: nothing at this path, like an unknown job id.
        raise ApiError(404, "not_found", "not a worker node name", {"node": str(exc)}) from None


def _node_status(node: str) -> ResponseReturnValue:
    session = get_session()
    running = 0
    cluster = read_cluster(_broker_url())
    names = [s.name for s in cluster.slots or [] if s.info.node == node]
    if names:
        running = len(busy_slot_names(session, names))
    stopped = sum(g.stopped for g in slot_guards(session, node).values())
    control = control_json(node_control(session, node), running, api_user())
    return jsonify({"node": node, "control": control, "stopped_slots": stopped})


def _act(node: str, action: Action) -> ResponseReturnValue:
    node = _admin_node(node)
    session = get_session()
    set_control(session, node, action, api_user().username)
    session.commit()
    return _node_status(node)


@bp.post("/workers/<node>/cordon")
@operation(tag="cluster", ok={200: NodeStatus}, errors=(403, 404, 413))
def cordon_node(node: str) -> ResponseReturnValue:
    """Stop a worker node taking new jobs (admins only); the jobs it runs go on.

    `node` is the Celery node name the workers list shows. The state is kept in the
    database, so it holds across the worker's restarts under the same name.
    """
    parse_query(NoQuery)
    return _act(node, "cordon")


@bp.post("/workers/<node>/drain")
@operation(tag="cluster", ok={200: NodeStatus}, errors=(403, 404, 413), query=DrainQuery)
def drain_node(node: str) -> ResponseReturnValue:
    """Cordon a worker node and let its running jobs finish (admins only).

    With `?now=true` its running jobs checkpoint and go back to the queue within a
    heartbeat, and resume on another worker.
    """
    query = parse_query(DrainQuery)
    return _act(node, "drain_now" if query.now else "drain")


@bp.post("/workers/<node>/uncordon")
@operation(tag="cluster", ok={200: NodeStatus}, errors=(403, 404, 413))
def uncordon_node(node: str) -> ResponseReturnValue:
    """Undo cordon and drain: the node takes jobs again (admins only)."""
    parse_query(NoQuery)
    return _act(node, "uncordon")


@bp.post("/workers/<node>/clear")
@operation(tag="cluster", ok={200: NodeStatus}, errors=(403, 404, 413))
def clear_node(node: str) -> ResponseReturnValue:
    """Clear a node's crash guard: its stopped slots take jobs again (admins only)."""
    parse_query(NoQuery)
    node = _admin_node(node)
    session = get_session()
    clear_guard(session, node)
    session.commit()
    return _node_status(node)
