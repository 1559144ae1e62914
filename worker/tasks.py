"""Celery task entry points. Each is a few lines: the runner does the work.

`JobRequest` runs in the worker's main process and handles the one outcome the runner
cannot record itself: its pool child killed mid-job (worker/child_death.py).
"""

from __future__ import annotations

from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.exceptions import Reject
from celery.worker.request import Request

from shared.celery_app import DERIVE_TASK, EVALUATE_TASK, SCRIPT_TASK, TRAIN_TASK
from shared.settings import Settings
from shared.worker_registry import SlotHeartbeat
from worker import node_control
from worker.child_death import record_killed_child
from worker.runner import run_job
from worker.shutdown import shutdown_requested, sigterm_hands_back_job
from worker.slots import current_slot, layout, take_slot

# How long a pool child without a slot waits for one before it puts a job back.
SLOT_WAIT_S = 30.0

# This pool child's registry heartbeat (worker/celery_worker.py sets it): each message
# that reaches the child is noted on it, which is how a reader tells a node that takes
# messages from one that stopped consuming (shared/fleet_health.py).
_heartbeat: dict[str, SlotHeartbeat] = {}


def set_heartbeat(heartbeat: SlotHeartbeat | None) -> None:
    if heartbeat is None:
        _heartbeat.clear()
    else:
        _heartbeat["slot"] = heartbeat


def job_request_class(settings: Settings) -> type[Request]:
    class JobRequest(Request):
        def on_failure(
            self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
        ) -> None:
            exc = getattr(exc_info, "exception", None)
            exc = getattr(exc, "exc", exc)  # billiard wraps it in an ExceptionWithTraceback
            if isinstance(exc, WorkerLostError):
                # Any death of a pool child mid-job, for the crash guard.
                node_control.record_killed_child(settings, self.worker_pid, str(exc))
            if isinstance(exc, WorkerLostError) and record_killed_child(
                settings, self.args, self.worker_pid, str(exc)
            ):
                # Recorded as failed: acknowledged, so Celery's reject-on-worker-lost
                # does not put the message back for a delivery that would only find the
                # job finished.
                self.acknowledge()
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    return JobRequest


def register_tasks(app: Celery, settings: Settings) -> None:
    request_class = job_request_class(settings)

    def run(job_id: int) -> str:
        heartbeat = _heartbeat.get("slot")
        if heartbeat is not None:
            heartbeat.task_started()
        try:
            return run_message(job_id)
        finally:
            if heartbeat is not None:
                heartbeat.task_ended()

    def run_message(job_id: int) -> str:
        if shutdown_requested():
            # This worker is going away: put the message back untouched for another one
            # rather than claim the job only to hand it back.
            raise Reject("worker shutting down", requeue=True)
        refused = node_control.refusal(settings)
        if refused is not None:
            # Cordoned, draining, or this slot stopped by the crash guard: the message goes
            # back for another worker (worker/node_control.py), the job stays queued.
            node_control.pause_before_refusing()
            raise Reject(refused, requeue=True)
        planned = layout()
        if planned and planned.slots and current_slot() is None and take_slot(SLOT_WAIT_S) is None:
            # Every slot is held (a replaced child's DataLoader workers still dying, say):
            # running without one could put this job on another job's GPU.
            raise Reject("no free worker slot", requeue=True)
        with sigterm_hands_back_job():
            return run_job(int(job_id), settings, celery=app, schedule=True)

    @app.task(name=TRAIN_TASK, ignore_result=True, shared=False, Request=request_class)
    def train(job_id: int) -> str:
        return run(job_id)

    @app.task(name=EVALUATE_TASK, ignore_result=True, shared=False, Request=request_class)
    def evaluate(job_id: int) -> str:
        return run(job_id)

    @app.task(name=SCRIPT_TASK, ignore_result=True, shared=False, Request=request_class)
    def script(job_id: int) -> str:
        return run(job_id)

    @app.task(name=DERIVE_TASK, ignore_result=True, shared=False, Request=request_class)
    def derive(job_id: int) -> str:
        return run(job_id)
