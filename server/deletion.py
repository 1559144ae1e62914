"""Deleting what users store: an upload, and a finished job's files.

Shared by the API (DELETE /api/v1/uploads/{id}, DELETE /api/v1/jobs/{id}/artifacts),
the web pages' delete buttons and, through the API, the CLI. Another user's upload or
job reads as missing (404), exactly like one that does not exist; admins may delete
anything. Something a queued or running job still needs is refused with 409, and so
are a job's files while a registered model version pins them.
"""

from __future__ import annotations

from flask import current_app
from sqlalchemy import select

from server.access import find_visible_upload, visible_job
from server.database import get_session
from server.errors import ApiError
from shared import job_files
from shared.artifact_store import job_prefix, store_for, upload_key
from shared.job_states import FINISHED_STATES, JobState
from shared.model_registry import pinning_versions
from shared.orm import Job
from shared.settings import Settings
from shared.state_machine import mark_artifacts_deleted

UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def jobs_using_upload(upload_id: int) -> list[int]:
    """Queued or running jobs that train or evaluate on the upload (any owner's)."""
    rows = get_session().execute(
        select(Job.id, Job.spec).where(Job.state.in_(UNFINISHED), Job.dataset_name == "csv")
    )
    found = []
    for job_id, spec in rows:
        params = ((spec or {}).get("dataset") or {}).get("params") or {}
        if params.get("upload_id") == upload_id:
            found.append(job_id)
    return sorted(found)


def delete_upload(upload_id: int) -> int:
    """Delete an upload the caller may see (row and file); the bytes freed."""
    session = get_session()
    upload = find_visible_upload(upload_id)
    if upload is None:
        raise ApiError(
            404, "not_found", f"upload {upload_id} does not exist", {"upload_id": "no such upload"}
        )
    users = jobs_using_upload(upload_id)
    if users:
        listed = ", ".join(str(j) for j in users[:10])
        raise ApiError(
            409,
            "upload_in_use",
            f"upload {upload_id} is used by queued or running jobs ({listed}); "
            "cancel them or wait for them to finish",
            {"upload_id": f"in use by job(s) {listed}"},
        )
    session.delete(upload)
    session.commit()
    # The row goes first: a crash in between leaves an orphan file, never a row whose
    # file is gone.
    settings = _settings()
    freed = job_files.delete_upload_files(settings.uploads_dir, upload_id)
    store = store_for(settings)
    if not store.is_local:
        freed += sum(store.delete(upload_key(upload_id, f)) for f in job_files.UPLOAD_SUFFIXES)
    return freed


def delete_job_artifacts(job_id: int) -> tuple[Job, int]:
    """Delete a finished job's files (checkpoints, exports, log); (the job, bytes freed)."""
    session = get_session()
    job = visible_job(job_id)
    if job.state not in FINISHED_STATES:
        raise ApiError(
            409,
            "not_finished",
            f"job {job_id} is {job.state}; only a finished job's files can be deleted",
            {"state": job.state},
        )
    evaluations = session.scalars(
        select(Job.id).where(Job.source_job_id == job_id, Job.state.in_(UNFINISHED))
    ).all()
    if evaluations:
        listed = ", ".join(str(j) for j in sorted(evaluations)[:10])
        raise ApiError(
            409,
            "artifacts_in_use",
            f"job {job_id}'s checkpoint is used by queued or running evaluate jobs ({listed})",
            {"job_id": f"in use by job(s) {listed}"},
        )
    # A registered model version pins the files it hashed (shared/model_registry.py);
    # the job's row is locked first, as a promotion locks it, so the two cannot cross.
    pins = pinning_versions(session, job_id, lock=True)
    if pins:
        listed = ", ".join(f"{name} version {number}" for name, number in pins[:10])
        raise ApiError(
            409,
            "artifacts_pinned",
            f"job {job_id}'s files are pinned by registered model versions ({listed})",
            {"job_id": f"pinned by model version(s) {listed}"},
        )
    if job.artifacts_deleted_at is None:
        mark_artifacts_deleted(session, job_id)
        session.commit()
    # Deleted after the mark is committed, and again on a repeated call: a crash between
    # the two leaves the job marked and the next call removes whatever is left.
    settings = _settings()
    freed = job_files.delete_job_files(settings, job_id)
    store = store_for(settings)
    if not store.is_local:
        freed += store.delete_prefix(job_prefix(job_id))
    session.refresh(job)
    return job, freed
