"""The Celery app factory, queue names and task names.

The server only ever calls `send_task(TASK_NAMES[kind], [job_id])`, so it needs the
names and the broker settings but none of the worker's code (or torch).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared.broker import celery_ssl_options
from shared.settings import Settings
from shared.spec import CPU_QUEUE, GPU_QUEUE

QUEUES = (GPU_QUEUE, CPU_QUEUE)
TRAIN_TASK = "trainyard.train"
EVALUATE_TASK = "trainyard.evaluate"
SCRIPT_TASK = "trainyard.script"
DERIVE_TASK = "trainyard.derive"  # prune, quantize, export: a model made from another job's
TASK_NAMES = {"train": TRAIN_TASK, "evaluate": EVALUATE_TASK, "script": SCRIPT_TASK,
              "prune": DERIVE_TASK, "quantize": DERIVE_TASK, "export": DERIVE_TASK}  # fmt: skip


def task_id_for(job_id: int) -> str:
    """Derived from the job, so every enqueue of one job carries the same id."""
    return f"trainyard-job-{job_id}"


def job_id_from_task_id(task_id: str) -> int | None:
    """The job a task id of `task_id_for` names; None for anything else."""
    prefix, _, number = task_id.rpartition("-")
    return int(number) if prefix == "trainyard-job" and number.isdigit() else None


def make_celery(settings: Settings) -> Celery:
    broker = settings.require_redis_url()
    app = Celery("trainyard", broker=broker, set_as_current=False)
    app.conf.update(
        # The database is the source of truth for results; a Redis result backend
        # would only be a second, weaker copy.
        result_backend=None,
        task_ignore_result=True,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue=CPU_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        # Ack after the job ran, so a worker that dies mid-job does not lose it.
        task_acks_late=True,
        # ...and a child killed by the OOM killer or SIGKILL puts it back too.
        task_reject_on_worker_lost=True,
        # One job at a time per slot: a prefetched job would wait behind a long one.
        worker_prefetch_multiplier=1,
        # Jobs are long; without this Redis redelivers any message unacked after an
        # hour (celery#5935). Duplicates are also stopped by the claim (docs/architecture.md, "Reliability" R2).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        # rediss://: the TLS options come from the URL, read as every other client reads
        # them (shared/broker.py), and certificates are verified unless it says otherwise.
        broker_use_ssl=celery_ssl_options(broker),
        # Fail fast on a dead broker at submit time; the job row is already committed.
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        broker_heartbeat=0,
    )
    return app


# Celery's hard time limit is only a backstop behind the job's own soft limit
# (max_runtime_s, enforced by the runner): give the runner time to checkpoint first.
HARD_LIMIT_GRACE_S = 120


def publish_job(
    celery: Celery, job_id: int, kind: str, queue: str, max_runtime_s: int | None = None
) -> None:
    """Send a job's task. Every publish of a job carries the same task id; a second
    delivery is harmless because the worker's claim is a compare-and-set."""
    options: dict[str, object] = {}
    if max_runtime_s:
        options["time_limit"] = max_runtime_s + HARD_LIMIT_GRACE_S
    celery.send_task(
        TASK_NAMES[kind], args=[job_id], task_id=task_id_for(job_id), queue=queue, **options
    )
