"""The worker's Celery app: `celery -A worker.celery_worker:app worker -Q cpu`
(or `trainyard worker`, which builds that command)."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
from typing import Any, NoReturn

# Building any torch optimizer imports torch._dynamo, about 3 s of CPU. Imported here, in
# the parent before the pool forks, no child (nor a child restarted after a crash) makes
# its first job wait for it. It starts no thread and does not initialize CUDA.
import torch._dynamo  # noqa: F401
from celery.signals import (
    celeryd_init,
    setup_logging,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

from shared.broker import redis_client
from shared.celery_app import make_celery
from shared.db import dispose_inherited_engines
from shared.log_setup import configure_logging
from shared.settings import load_settings
from shared.worker_registry import SlotHeartbeat, SlotInfo, mark_stopped, remove_node
from worker import memory_limit, node_control, shutdown, slots, telemetry
from worker.runner import worker_name
from worker.tasks import register_tasks, set_heartbeat

log = logging.getLogger(__name__)

settings = load_settings()
app = make_celery(settings)
register_tasks(app, settings)
# Stops consuming while an admin has this node cordoned (worker/node_control.py).
app.steps["consumer"].add(node_control.NodeControlStep)

if settings.log_format == "json":
    # Connected, this signal replaces Celery's own logging set-up: every line of the
    # worker and its slots, Celery's included, is then a JSON object with the job's id
    # and attempt while one runs (shared/log_setup.py).
    @setup_logging.connect
    def _json_logging(loglevel: int | str | None = None, **_: Any) -> None:
        configure_logging("json", "worker", loglevel or logging.INFO)


def _refuse(message: str) -> NoReturn:
    # SystemExit, not an exception: Celery logs and ignores a signal handler's errors.
    print(f"trainyard worker: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# The slot layout (worker/slots.py), decided here in the main process before the pool
# forks: GPUs through NVML only, so this process never initializes CUDA. A GPU worker runs
# one job per slot: without -c, its concurrency is the number of slots.
try:
    _layout = slots.configure(settings)
except slots.SlotError as exc:
    _refuse(str(exc))
if _layout.gpu:
    app.conf.worker_concurrency = len(_layout.slots)
else:
    app.conf.worker_concurrency = settings.worker_slots
_slots = {"n": app.conf.worker_concurrency}
# The Celery node name (-n), known in the main process and inherited by each child.
_node = {"name": f"celery@{socket.gethostname()}"}
# This child's registry heartbeat (shared/worker_registry.py), once started.
_registry: dict[str, SlotHeartbeat] = {}


@celeryd_init.connect
def _init_main(sender=None, conf=None, options=None, **_kw) -> None:  # type: ignore[no-untyped-def]
    if options and options.get("concurrency"):
        _slots["n"] = int(options["concurrency"])
    if _layout.gpu and _slots["n"] > len(_layout.slots):
        _refuse(
            f"--concurrency {_slots['n']} is more than the {len(_layout.slots)} GPU slot(s) "
            f"of --gpus {settings.worker_gpus} --gpus-per-slot {settings.gpus_per_slot}: "
            "two jobs would share a GPU"
        )
    slots.with_cpu_slots(_layout, _slots["n"])
    if sender:
        _node["name"] = str(sender)
    # Inherited by every child: cordon, drain and the crash guard are keyed by it.
    node_control.set_node(_node["name"])
    node_control.install_switch(settings, _node["name"], _slots["n"])
    # Before the pool forks, so that every child shares the shutdown flag.
    shutdown.share_with_children()


@worker_ready.connect
def _log_layout(**_kw: Any) -> None:
    # Here rather than at import: Celery has set up logging by now.
    layout = slots.layout()
    if layout is not None:
        log.info(
            "worker: %d %s slot(s): %s", len(layout.slots), "GPU" if layout.gpu else "CPU",
            "; ".join(slot.describe() for slot in layout.slots),
        )  # fmt: skip


@worker_shutting_down.connect
def _hand_back_running_jobs(sig=None, how=None, **_kw) -> None:  # type: ignore[no-untyped-def]
    # Runs in the main process's signal handler. Celery stops consuming and then waits
    # for running tasks; this makes each running job checkpoint and requeue itself
    # within a training step instead of running to the end (worker/shutdown.py).
    shutdown.request_shutdown()


@worker_process_init.connect
def _init_child(**_kw) -> None:  # type: ignore[no-untyped-def]
    # Engines (and their sockets) inherited from the parent must not be used here.
    dispose_inherited_engines()
    # Before anything in this process touches CUDA: the slot's GPUs become cuda:0..K-1.
    slot = slots.take_slot()
    if slot is None:
        log.warning("worker child %s: no free slot yet; its first job waits for one", os.getpid())
    import torch

    # Every prefork child would otherwise use all cores, and N children thrash
    # (docs/architecture.md, "Performance targets": 4.5x slower with 2 children on 2 cores).
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // _slots["n"])
    torch.set_num_threads(threads)
    budget = memory_limit.configure(settings, _slots["n"])
    limit = "none" if budget.limit_bytes is None else memory_limit.format_bytes(budget.limit_bytes)
    log.info(
        "worker child %s: %s, torch threads=%s, memory limit per job=%s (%s)",
        os.getpid(), "no slot" if slot is None else slot.describe(), threads, limit,
        budget.source,
    )  # fmt: skip
    _start_registry()


def _consumed_queues() -> tuple[str, ...]:
    # -Q is applied to app.amqp.queues.consume_from in the main process before the pool
    # forks, so a child sees it too; without -Q a worker consumes every declared queue.
    chosen = app.amqp.queues.consume_from or app.amqp.queues
    return tuple(sorted(chosen))


def _start_registry() -> None:
    """Announce this slot in the worker registry (the /workers page and API) and keep
    it there with a heartbeat thread. Failing here must never stop the worker."""
    try:
        slot = slots.current_slot()
        gpus = () if slot is None else slot.gpus
        info = SlotInfo(
            name=worker_name(),
            node=_node["name"],
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=_consumed_queues(),
            node_slots=_slots["n"],
            gpu_names=tuple(gpu.name or f"GPU {gpu.index}" for gpu in gpus),
            # What pick_device() picks in a pinned slot: the first of its GPUs.
            device="cuda:0" if gpus else "cpu",
            slot=None if slot is None else slot.index,
            gpus=tuple(gpu.to_json() for gpu in gpus),
        )
        heartbeat = SlotHeartbeat(
            settings.require_redis_url(), info, telemetry=telemetry.SlotTelemetry()
        )
        heartbeat.start()
        _registry["heartbeat"] = heartbeat
        set_heartbeat(heartbeat)
    except Exception:  # noqa: BLE001
        log.exception("worker registry: not registering this slot")


@worker_process_shutdown.connect
def _leave_registry(**_kw: Any) -> None:
    heartbeat = _registry.pop("heartbeat", None)
    set_heartbeat(None)
    if heartbeat is not None:
        heartbeat.stop()
    slots.release_slot()


@worker_shutdown.connect
def _forget_node(**_kw: Any) -> None:
    # In the main process, after the pool stopped: children killed before they could
    # unregister would otherwise stay listed until their entries expire. A clean
    # shutdown: the node shows as "stopped", not "lost" (shared/worker_registry.py).
    try:
        client = redis_client(settings.require_redis_url())
        try:
            remove_node(client, _node["name"])
            mark_stopped(client, _node["name"])
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - the entries expire on their own
        log.info("worker registry: could not remove node %s (%s)", _node["name"], exc)


# Everything imported so far (torch, sklearn, celery) lives as long as the process: out
# of the collector's sight, forked children do not copy those pages by touching them, and
# the interpreter does not spend seconds walking them again at exit.
gc.freeze()
