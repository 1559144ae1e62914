"""Which jobs and uploads the request's user may see: their own, or all for an admin.

Every lookup of a job or upload by id in the API goes through here. Another user's job
answers 404, exactly like a job that does not exist, so ids do not leak what exists.
"""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select

from server.auth import Principal, api_user
from server.database import get_session
from server.errors import ApiError
from shared.orm import CodeBundle, Job, Upload

S = TypeVar("S", bound=Select)


def visible_jobs(stmt: S, user: Principal | None = None) -> S:
    """Restrict a SELECT over jobs to those the user may see."""
    user = user or api_user()
    return stmt if user.is_admin else stmt.where(Job.owner_id == user.id)


def can_see(owner_id: int | None, user: Principal | None = None) -> bool:
    user = user or api_user()
    return user.is_admin or (owner_id is not None and owner_id == user.id)


def find_visible_job(job_id: int) -> Job | None:
    job = get_session().get(Job, job_id)
    return job if job is not None and can_see(job.owner_id) else None


def visible_job(job_id: int) -> Job:
    """The job, or a 404 that reads the same whether it is missing or someone else's."""
    job = find_visible_job(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id} does not exist", {"job_id": "no such job"})
    return job


def find_visible_upload(upload_id: int) -> Upload | None:
    upload = get_session().get(Upload, upload_id)
    return upload if upload is not None and can_see(upload.owner_id) else None


def find_visible_bundle(bundle_id: int) -> CodeBundle | None:
    bundle = get_session().get(CodeBundle, bundle_id)
    return bundle if bundle is not None and can_see(bundle.owner_id) else None
