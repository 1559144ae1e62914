"""The Submit page: a form built from the registries (server/web/spec_form.py).

GET /submit shows it with the defaults (a CNN on digits, ready to submit) or, with
?clone=<job id>, filled from that job's spec. POST /submit turns the inputs into a spec
and hands it to server/submission.py, the path every job takes; its ApiErrors come back
as messages next to the inputs they name. A CSV chosen in the form without JS arrives in
the same multipart POST and is stored by the upload API's own view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import current_app, flash, g, jsonify, redirect, render_template, request
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from pydantic import ValidationError
from sqlalchemy import select
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import RequestEntityTooLarge

from server import submission, uploads_api
from server.access import find_visible_job, find_visible_upload
from server.catalog import catalog_context
from server.database import get_session
from server.errors import ApiError, error_response
from server.params import MAX_ID
from server.web import bp
from server.web.spec_form import (
    Field,
    JobForm,
    Values,
    active_file_field,
    default_values,
    is_active,
    job_form,
    place_errors,
    section_has,
    spec_from_values,
    values_from_form,
    values_from_spec,
)
from shared.dataset_catalog import DATASETS
from shared.metric_catalog import final_metrics, key_metric
from shared.orm import Job
from shared.schema_base import CatalogError
from shared.settings import Settings
from shared.state_machine import JobState

# The evaluate form lists this many of the user's newest succeeded train jobs.
SOURCE_JOB_CHOICES = 200


class SubmitCsrf(FlaskForm):
    """Only the CSRF token: the inputs come from the schema, not from WTForms fields."""


# A target column select lists at most this many columns; a wider upload gets a search
# box instead (10,000 columns rendered as options made a 40 MB page).
COLUMN_OPTIONS_LIMIT = 200


@dataclass(frozen=True)
class UploadView:
    """What the page shows about an upload next to its id: the file and its columns."""

    id: int
    filename: str
    rows: int
    columns: list[dict[str, Any]]


@dataclass
class PageState:
    values: Values
    errors: dict[str, str]
    message: str | None = None  # shown above the form (limits, an expired form)
    clone_of: Job | None = None
    uploaded: dict[str, str] | None = None  # file field id -> "stored as upload N" note


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def _use_session_user() -> None:
    # server/access.py reads the request's user from g.user, as the API sets it.
    if "user" not in g:
        g.user = current_user._get_current_object()


def _parse_job_id(text: str | None) -> int | None:
    if text is None or not text.isdigit() or not 0 < int(text) <= MAX_ID:
        return None
    return int(text)


@bp.get("/submit")
@login_required
def submit_page() -> ResponseReturnValue:
    _use_session_user()
    form = job_form()
    clone = request.args.get("clone")
    if clone is None:
        return _render(form, PageState(default_values(form), {}))
    job_id = _parse_job_id(clone)
    job = find_visible_job(job_id) if job_id is not None else None
    if job is None:
        # Someone else's job reads exactly like one that does not exist.
        state = PageState(default_values(form), {}, message=f"Job {clone} does not exist.")
        return _render(form, state, status=404)
    return _render(form, PageState(values_from_spec(form, job.spec), {}, clone_of=job))


@bp.post("/submit")
@login_required
def submit_form() -> ResponseReturnValue:
    _use_session_user()
    form = job_form()
    if request.mimetype == "multipart/form-data":
        # A CSV may ride along (the no-JS upload): the upload limit, not the JSON body's.
        request.max_content_length = _settings().max_upload_bytes
    try:
        data = request.form
    except RequestEntityTooLarge:
        limit = f"{_settings().max_upload_bytes:,}"
        message = f"The form with its file is larger than {limit} bytes, the upload limit."
        return _render(form, PageState(default_values(form), {}, message=message), status=413)
    values = values_from_form(form, data)
    if not SubmitCsrf().validate_on_submit():
        message = "The form expired or was not sent from this page; check it and submit again."
        return _render(form, PageState(values, {}, message=message), status=400)

    state = PageState(values, {})
    _store_uploaded_csv(form, state)
    spec, errors = spec_from_values(form, values)
    errors = {**state.errors, **errors}
    if errors:
        # Check the rest too, so every problem shows at once, not one round at a time.
        try:
            submission.parse_job_spec(spec)
        except ApiError as exc:
            errors = {**exc.fields, **errors}
        return _render(form, PageState(values, errors, uploaded=state.uploaded), status=422)
    try:
        job = submission.submit(submission.parse_job_spec(spec), g.user)
    except ApiError as exc:
        # Limits (429) name no field: their message goes above the form.
        message = None if exc.fields else exc.message[:1].upper() + exc.message[1:] + "."
        state = PageState(values, exc.fields, message=message, uploaded=state.uploaded)
        return _render(form, state, status=exc.status, headers=exc.headers)
    flash(f"Job {job.id} submitted.", "info")
    return redirect(f"/jobs/{job.id}")


@bp.post("/submit/estimate")
@login_required
def submit_estimate() -> ResponseReturnValue:
    """The form's live estimate (static/js/submit.js): the form's fields in, the answer
    of POST /api/v1/jobs/estimate out, so the page needs no spec-building of its own."""
    _use_session_user()
    if not SubmitCsrf().validate_on_submit():
        return error_response(
            400, "csrf_failed", "the form expired; reload the page", {"csrf_token": "expired"}
        )
    form = job_form()
    spec, errors = spec_from_values(form, values_from_form(form, request.form))
    if errors:
        return error_response(422, "invalid_spec", "invalid job spec", errors)
    try:
        parsed = submission.parse_job_spec(spec)
        return jsonify(submission.estimate(parsed, g.user).to_json(parsed))
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.fields)


def _store_uploaded_csv(form: JobForm, state: PageState) -> None:
    """A file sent with the form (no JS): store it as an upload and fill in its id."""
    target = active_file_field(form, state.values)
    if target is None or target.upload_field is None:
        return
    sent = request.files.getlist("file")
    if len(sent) == len(form.file_siblings):
        file: FileStorage | None = sent[form.file_siblings.index(target.id)]
    else:
        file = sent[0] if len(sent) == 1 else None
    if file is None or not file.filename:
        return
    try:
        # The API's own view: one place for the CSV rules, the size limit and storage.
        # It reads this request's multipart `file` field, which is this file.
        response = uploads_api.create_upload()
    except ApiError as exc:
        state.errors["file"] = exc.fields.get("file") or exc.message
        return
    body = response[0].get_json()  # type: ignore[index]
    state.values[target.upload_field] = str(body["id"])
    state.uploaded = {
        target.id: f"Stored {body['filename']} as upload {body['id']} ({body['rows']:,} rows)."
    }


# ---------------------------------------------------------------- rendering


def _source_jobs(values: Values, form: JobForm) -> list[tuple[str, str]]:
    """(value, label) for the evaluate form's source job select."""
    stmt = (
        select(Job)
        .where(
            Job.owner_id == g.user.id,
            Job.kind == "train",
            Job.state == JobState.SUCCEEDED.value,
            Job.checkpoint_path.is_not(None),
        )
        .order_by(Job.id.desc())
        .limit(SOURCE_JOB_CHOICES)
    )
    rows = get_session().scalars(stmt).all()
    options = [(str(j.id), _job_label(j)) for j in rows]
    chosen = next((values[f.id] for f in form.fields if f.source_jobs), "")
    if isinstance(chosen, str) and chosen and chosen not in {v for v, _ in options}:
        # A clone (an admin's, of another user's evaluation) or a typed-in id: keep it.
        job_id = _parse_job_id(chosen)
        job = find_visible_job(job_id) if job_id is not None else None
        options.insert(0, (chosen, _job_label(job) if job else f"#{chosen}"))
    return options


def _job_label(job: Job) -> str:
    name = f" {job.name}" if job.name else ""
    found = key_metric(job.kind, final_metrics(job.result))
    score = f", {found[0]} {found[1]:.4g}" if found is not None else ""
    return f"#{job.id}{name} · {job.model_name} on {job.dataset_name}{score}"


def _dataset_problems() -> dict[str, str]:
    """Datasets this server cannot use (files missing, corrupt or oversized), with the
    reason: the form shows them but does not offer them."""
    ctx = catalog_context()
    problems: dict[str, str] = {}
    for name, entry in DATASETS.items():
        try:
            defaults = entry.params()
        except ValidationError:
            continue  # needs params (csv): nothing to check without them
        try:
            entry.resolve(defaults, ctx)
        except CatalogError as exc:
            problems[name] = exc.message
    return problems


def _uploads(form: JobForm, values: Values) -> dict[str, UploadView]:
    """The upload each upload-id input names, for its target column select."""
    found: dict[str, UploadView] = {}
    for f in form.fields:
        if f.widget != "column" or f.upload_field is None:
            continue
        upload_id = _parse_job_id(str(values.get(f.upload_field, "")).strip())
        upload = find_visible_upload(upload_id) if upload_id is not None else None
        if upload is not None:
            found[f.upload_field] = UploadView(
                upload.id, upload.filename, upload.rows, list(upload.columns)
            )
    return found


def _image_dataset(values: Values, selector: str | None) -> bool:
    name = values.get(selector or "", "")
    return isinstance(name, str) and name in DATASETS and DATASETS[name].kind == "image"


def _differs(f: Field, values: Values) -> bool:
    return f.widget != "file" and is_active(f.when, values) and values.get(f.id) != f.default


def _render(
    form: JobForm,
    state: PageState,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> ResponseReturnValue:
    inline, summary = place_errors(form, state.values, state.errors)
    changed = {f.id: True for f in form.fields if _differs(f, state.values)}
    open_sections = {
        s.id for s in form.sections if s.collapsed and (section_has(s, inline) or section_has(s, changed))
    }  # fmt: skip
    html = render_template(
        "submit.html",
        form=form,
        values=state.values,
        inline=inline,
        summary=summary,
        message=state.message,
        clone_of=state.clone_of,
        source_jobs=_source_jobs(state.values, form),
        dataset_problems=_dataset_problems(),
        uploads=_uploads(form, state.values),
        column_options_limit=COLUMN_OPTIONS_LIMIT,
        uploaded=state.uploaded or {},
        open_sections=open_sections,
        is_active=is_active,
        image_dataset=lambda selector: _image_dataset(state.values, selector),
        max_upload_bytes=_settings().max_upload_bytes,
        # What an empty max_runtime_s becomes at submission (shared/limits.py).
        default_runtime_s=int(submission.user_limits(g.user)["default_runtime_s"]),
    )
    return html, status, headers or {}
