"""The worker's Celery app: `celery -A worker.celery_worker:app worker -Q cpu`
(or `trainyard worker`, which builds that command)."""

from __future__ import annotations

import logging
import os

from celery.signals import celeryd_init, worker_process_init, worker_shutting_down

from shared.celery_app import make_celery
from shared.db import dispose_inherited_engines
from shared.settings import load_settings
from worker import shutdown
from worker.tasks import register_tasks

log = logging.getLogger(__name__)

settings = load_settings()
app = make_celery(settings)
register_tasks(app, settings)

_slots = {"n": settings.worker_slots}


@celeryd_init.connect
def _init_main(sender=None, conf=None, options=None, **_kw) -> None:  # type: ignore[no-untyped-def]
    if options and options.get("concurrency"):
        _slots["n"] = int(options["concurrency"])
    # Before the pool forks, so that every child shares the shutdown flag.
    shutdown.share_with_children()


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
    import torch

    # Every prefork child would otherwise use all cores, and N children thrash
    # (design.md 5: 4.5x slower with 2 children on 2 cores).
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // _slots["n"])
    torch.set_num_threads(threads)
    log.info("worker child %s: torch threads=%s", os.getpid(), threads)
