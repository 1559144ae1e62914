"""The uploads page (/uploads) and the delete buttons: an upload's, and a finished job's
files (on the job page). Both go through server/deletion.py, as the API does."""

from __future__ import annotations

from flask import flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from sqlalchemy import select

from server import deletion
from server.access import find_visible_job, find_visible_upload
from server.database import get_session
from server.errors import ApiError
from server.params import MAX_ID
from server.quotas import upload_usage, user_limit
from server.web import bp, job_view
from server.web.job_page import ActionForm
from shared.orm import Upload, User

PAGE_LIMIT = 500


@bp.get("/uploads")
@login_required
def uploads() -> ResponseReturnValue:
    user = current_user._get_current_object()
    stmt = (
        select(Upload, User.username)
        .outerjoin(User, User.id == Upload.owner_id)
        .order_by(Upload.id.desc())
        .limit(PAGE_LIMIT)
    )
    if not user.is_admin:
        stmt = stmt.where(Upload.owner_id == user.id)
    rows = [
        {"upload": u, "owner": owner, "size": job_view.file_size(u.size_bytes)}
        for u, owner in get_session().execute(stmt)
    ]
    count, used = upload_usage(user.id)
    quota = {
        "count": count,
        "max_count": user_limit(user, "max_uploads_per_user"),
        "used": job_view.file_size(used),
        "max_bytes": job_view.file_size(user_limit(user, "max_upload_bytes_per_user")),
    }
    return render_template("uploads.html", rows=rows, quota=quota, limit=PAGE_LIMIT)


def _upload_not_found(upload_id: int) -> ResponseReturnValue:
    # The same page for a missing upload and another user's.
    return render_template("upload_not_found.html", upload_id=upload_id), 404


@bp.post("/uploads/<int:upload_id>/delete")
@login_required
def upload_delete(upload_id: int) -> ResponseReturnValue:
    if upload_id > MAX_ID or find_visible_upload(upload_id) is None:
        return _upload_not_found(upload_id)
    if not ActionForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
        return redirect(url_for("web.uploads"), 303)
    try:
        deletion.delete_upload(upload_id)
    except ApiError as exc:
        flash(f"Could not delete upload {upload_id}: {exc.message}.", "error")
    else:
        flash(f"Upload {upload_id} deleted.", "info")
    return redirect(url_for("web.uploads"), 303)


@bp.post("/jobs/<int:job_id>/artifacts/delete")
@login_required
def job_artifacts_delete(job_id: int) -> ResponseReturnValue:
    job = find_visible_job(job_id) if job_id <= MAX_ID else None
    if job is None:
        return render_template("job_not_found.html", job_id=job_id), 404
    back = redirect(url_for("web.job_detail", job_id=job_id), 303)
    if not ActionForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
        return back
    try:
        _job, freed = deletion.delete_job_artifacts(job_id)
    except ApiError as exc:
        flash(f"Could not delete the files of job #{job_id}: {exc.message}.", "error")
    else:
        flash(f"Deleted the files of job #{job_id} ({job_view.file_size(freed)}).", "info")
    return back
