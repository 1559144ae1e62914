"""Celery task entry points. Each is a few lines: the runner does the work."""

from __future__ import annotations

from celery import Celery
from celery.exceptions import Reject

from shared.celery_app import EVALUATE_TASK, TRAIN_TASK
from shared.settings import Settings
from worker.runner import run_job
from worker.shutdown import shutdown_requested, sigterm_hands_back_job


def register_tasks(app: Celery, settings: Settings) -> None:
    def run(job_id: int) -> str:
        if shutdown_requested():
            # This worker is going away: put the message back untouched for another one
            # rather than claim the job only to hand it back.
            raise Reject("worker shutting down", requeue=True)
        with sigterm_hands_back_job():
            return run_job(int(job_id), settings, celery=app)

    @app.task(name=TRAIN_TASK, ignore_result=True, shared=False)
    def train(job_id: int) -> str:
        return run(job_id)

    @app.task(name=EVALUATE_TASK, ignore_result=True, shared=False)
    def evaluate(job_id: int) -> str:
        return run(job_id)
