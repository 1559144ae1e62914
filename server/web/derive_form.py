"""The job page's "Compress or export…" form: POST /jobs/<id>/derive queues a prune,
quantize or export job of a succeeded train or prune job, through server/submission.py
like every job; problems come back as a message on the page it was sent from."""

from __future__ import annotations

from typing import Any

from flask import flash, g, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import login_required

from server import submission
from server.errors import ApiError
from server.web import bp
from server.web.job_page import ActionForm, find_page_job, job_not_found


def _spec(job_id: int) -> dict[str, Any]:
    """The spec the form's inputs describe; the spec's own checks name bad values."""
    kind = request.form.get("kind", "")
    spec: dict[str, Any] = {"kind": kind, "source_job_id": job_id}
    if kind == "prune":
        spec["sparsity"] = _number(request.form.get("sparsity", ""))
        spec["scope"] = request.form.get("scope", "global")
        spec["structured"] = request.form.get("structured") == "true"
        spec["fine_tune_epochs"] = _number(request.form.get("fine_tune_epochs", "0") or "0")
    return spec


def _number(text: str) -> Any:
    """A number from an input, or the text itself for the spec to refuse by name."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


@bp.post("/jobs/<int:job_id>/derive")
@login_required
def job_derive(job_id: int) -> ResponseReturnValue:
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    back = redirect(url_for("web.job_detail", job_id=job.id), 303)
    if not ActionForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
        return back
    try:
        new = submission.submit(submission.parse_job_spec(_spec(job.id)), g.user)
    except ApiError as exc:
        detail = "".join(f" {field}: {text}." for field, text in exc.fields.items())
        flash(f"Could not queue it: {exc.message}.{detail}", "error")
        return back
    flash(f"{new.kind.capitalize()} of job #{job.id} queued as job #{new.id}.", "info")
    return redirect(url_for("web.job_detail", job_id=new.id), 303)
