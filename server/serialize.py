"""Job rows -> the JSON the API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.job_errors import error_json, public_result, viewer_is_admin
from shared.metric_catalog import final_metrics, key_metric
from shared.orm import Job


def iso(ts: datetime | None) -> str | None:
    # Stored as naive UTC (shared.db.utcnow), so the zone is added here.
    return None if ts is None else ts.isoformat(timespec="milliseconds") + "Z"


def key_metric_json(job: Job) -> dict[str, Any] | None:
    found = key_metric(job.kind, final_metrics(job.result))
    return None if found is None else {"key": found[0], "value": found[1]}


def job_to_json(job: Job, admin: bool | None = None) -> dict[str, Any]:
    """`admin`: whether the viewer sees an error's detail and server paths (default:
    the request's user; server/job_errors.py)."""
    if admin is None:
        admin = viewer_is_admin()
    return {
        "id": job.id,
        "kind": job.kind,
        "name": job.name,
        "state": job.state,
        "owner": job.owner.username if job.owner is not None else None,
        "queue": job.queue,
        "priority": job.priority,
        "model": job.model_name,
        "dataset": job.dataset_name,
        "tags": job.spec.get("tags", []),
        "spec": job.spec,
        "source_job_id": job.source_job_id,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "worker": job.worker,
        "placement": job.placement,
        "cancel_requested": job.cancel_requested,
        "progress": job.progress,
        "result": public_result(job.result),
        "key_metric": key_metric_json(job),
        "error": error_json(job, admin),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "updated_at": iso(job.updated_at),
        "artifacts_deleted_at": iso(job.artifacts_deleted_at),
    }
