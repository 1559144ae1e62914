"""Hand a committed job to Celery. The server never imports worker code: it sends by name."""

from __future__ import annotations

import logging

from celery import Celery
from flask import Flask, current_app

from shared.celery_app import make_celery, publish_job
from shared.log_setup import job_fields
from shared.orm import Job
from shared.settings import Settings

log = logging.getLogger(__name__)


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["trainyard_celery"] = make_celery(settings) if settings.redis_url else None


def enqueue_job(job: Job) -> bool:
    """Publish the job's task. Call only after the job row is committed.

    A broker failure is logged, not raised: the job is safe in the database as
    `queued`, and the reconciler re-enqueues queued jobs nobody claimed.
    """
    celery: Celery | None = current_app.extensions.get("trainyard_celery")
    if celery is None:
        log.warning(
            "job %s stored but not enqueued: TRAINYARD_REDIS_URL is not set",
            job.id,
            extra=job_fields(job.id),
        )
        return False
    try:
        publish_job(celery, job.id, job.kind, job.queue, job.spec.get("max_runtime_s"))
    except Exception:
        log.exception(
            "job %s stored but enqueue failed; the reconciler will retry",
            job.id,
            extra=job_fields(job.id),
        )
        return False
    return True
