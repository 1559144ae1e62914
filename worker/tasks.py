"""Celery task entry points. Each is a few lines: the runner does the work."""

from __future__ import annotations

from celery import Celery

from shared.celery_app import EVALUATE_TASK, TRAIN_TASK
from shared.settings import Settings
from worker.runner import run_job


def register_tasks(app: Celery, settings: Settings) -> None:
    @app.task(name=TRAIN_TASK, ignore_result=True, shared=False)
    def train(job_id: int) -> str:
        return run_job(int(job_id), settings)

    @app.task(name=EVALUATE_TASK, ignore_result=True, shared=False)
    def evaluate(job_id: int) -> str:
        return run_job(int(job_id), settings)
