"""A pool child killed mid-job: recognised by the worker's main process, not retried blindly.

When the kernel's OOM killer (or a cgroup's, or an operator's `kill -9`) kills the pool
child running a job, the child writes nothing, and without this the job would sit
`running` until its lease ran out, be requeued by the reconciler, and be killed again
on the next worker, up to TRAINYARD_MAX_ATTEMPTS times, each taking a host to the brink.

Celery's main process outlives its child and learns how it died (billiard's
WorkerLostError, "Worker exited prematurely: signal 9 (SIGKILL)"). For SIGKILL it ends
the job `failed` as KilledBySignal through `fail_killed_attempt` (shared/state_machine.py),
matched on the dead child's host:pid, so an attempt that already finished, or that
another worker took over, is left alone. Why no retry: docs/architecture.md,
"Reliability" R10. Other deaths (a crash in native code, an exit code) and a whole
worker dying keep the ordinary path: the lease runs out and the reconciler requeues
the job while attempts remain.

This runs in the main process's event loop, so the write gets a few seconds in a thread;
if the database does not answer in time, Celery's own handling applies (the message
goes back and the lease path takes over).
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from typing import Any

from celery.worker import state as worker_state
from sqlalchemy import select

from shared.artifact_store import store_for
from shared.db import transaction
from shared.job_files import log_path
from shared.job_states import JobState
from shared.orm import Job
from shared.settings import Settings
from shared.state_machine import fail_killed_attempt
from worker.artifact_sync import StoreUnavailable, upload_log
from worker.job_log import JobLog
from worker.runner import worker_name
from worker.shutdown import shutdown_requested

log = logging.getLogger(__name__)

_SIGNAL = re.compile(r"\bsignal (\d+)")
WRITE_TIMEOUT_S = 10.0


def killed_by_sigkill(message: str) -> bool:
    match = _SIGNAL.search(message)
    return match is not None and int(match.group(1)) == signal.SIGKILL


def kill_reason() -> str:
    return (
        "the job's process was killed by signal 9 (SIGKILL), likely out of memory (the "
        "kernel's OOM killer); not retried"
    )


def _stopping(*flags: Any) -> bool:
    # Celery sets these to an exit code, and 0 (a clean exit) means stop too.
    return any(flag is not None and flag is not False for flag in flags)


def record_killed_child(settings: Settings, args: Any, pid: int | None, message: str) -> bool:
    """Fail the job whose pool child `pid` was killed by SIGKILL; True if recorded.

    False (and Celery's own handling) when the child died otherwise, while the worker is
    shutting down (it kills its children itself), or when the write did not happen."""
    if not pid or not killed_by_sigkill(message):
        return False
    if shutdown_requested() or _stopping(worker_state.should_stop, worker_state.should_terminate):
        return False
    try:
        job_id = int(args[0])
    except (TypeError, ValueError, IndexError):
        return False
    done: list[bool] = []
    thread = threading.Thread(
        target=lambda: done.append(_record(settings, job_id, worker_name(pid))),
        name=f"killed-child-{job_id}",
        daemon=True,
    )
    thread.start()
    thread.join(WRITE_TIMEOUT_S)
    return bool(done and done[0])


def _record(settings: Settings, job_id: int, worker: str) -> bool:
    reason = kill_reason()
    try:
        with transaction(settings.resolved_database_url) as session:
            # The message's job is not always the one its child ran: a message runs the
            # best-ranked waiting job of its queue (shared/scheduling.py). The job the
            # child held is the running one carrying its host:pid.
            held = session.execute(
                select(Job.id).where(Job.worker == worker, Job.state == JobState.RUNNING.value)
            ).scalar()
            job_id = held if held is not None else job_id
            settled = fail_killed_attempt(session, job_id, worker, reason)
            attempt = session.get(Job, job_id).attempt if settled is not None else 0
    except Exception:  # noqa: BLE001 - the lease and the reconciler take over
        log.warning("job %s: could not record its killed process", job_id, exc_info=True)
        return False
    if settled is None:
        log.info("job %s: %s was killed but no longer held it", job_id, worker)
        return False
    log.error("job %s attempt %s on %s: %s", job_id, attempt, worker, settled.message)
    with JobLog(log_path(settings, job_id), job_id, attempt) as job_log:
        job_log.event(f"{settled.action}: {settled.message}")
    try:
        upload_log(store_for(settings), settings, job_id)
    except StoreUnavailable:
        log.warning("job %s: could not upload its log", job_id, exc_info=True)
    return True
