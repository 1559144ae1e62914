"""The job page (/jobs/<id>): spec, timeline, live progress, charts, log, artifacts, and
the actions cancel, retry and evaluate; plus its live stream (/jobs/<id>/stream).

Another user's job and a missing one get the same 404 page. Actions are forms with a
CSRF token, go through the same code as the API (server/submission.py,
shared/state_machine.request_cancel) and redirect with a flash message; their errors
(409 not finished, 429 limits, 422 an evaluation that cannot work) come back as a
message on the page, the evaluate form keeping the user's choices.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from flask import (
    Response,
    current_app,
    flash,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import SelectField
from wtforms.fields.choices import SelectChoice

from server import job_errors, submission
from server.access import can_see, find_visible_job
from server.database import get_session
from server.errors import ApiError
from server.job_errors import viewer_is_admin
from server.job_stream import POLL_SECONDS, STREAM_SECONDS, StreamCursor, stream_steps
from server.params import MAX_ID
from server.stream_hub import ENVIRON_KEY, HandOff
from server.stream_slots import Refusal, StreamSlots
from server.web import bp, job_view
from shared import job_files
from shared.artifact_store import ArtifactStoreError, job_prefix, log_key, store_for
from shared.dataset_catalog import DATASETS
from shared.job_events import job_events
from shared.lineage import derived_from
from shared.metric_catalog import final_metrics, key_metric
from shared.orm import Job, Sweep, SweepTrial
from shared.settings import Settings
from shared.state_machine import JobState, request_cancel

LOG_TAIL_LINES = 200
SPLITS = [SelectChoice("test", "Test"), SelectChoice("val", "Validation"),
          SelectChoice("train", "Training")]  # fmt: skip
CHECKPOINTS = [
    SelectChoice("best", "Best epoch (the monitored metric)"),
    SelectChoice("last", "Last epoch"),
]

log = logging.getLogger(__name__)


class ActionForm(FlaskForm):
    """Cancel and retry take nothing but the CSRF token."""


class EvaluateForm(FlaskForm):
    # Ids carry the form's name (the page has other controls); names stay plain.
    split = SelectField("Split", choices=SPLITS, default="test", id="evaluate-split")
    checkpoint = SelectField(
        "Checkpoint", choices=CHECKPOINTS, default="best", id="evaluate-checkpoint"
    )
    dataset = SelectField("Dataset", default="", id="evaluate-dataset")


# Where a submission error's dotted field lands in the evaluate form.
EVALUATE_FIELDS = {"dataset.split": "split", "checkpoint": "checkpoint"}


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def find_page_job(job_id: int) -> Job | None:
    # Past 64 bits an id cannot exist, and PostgreSQL would refuse the parameter.
    return find_visible_job(job_id) if job_id <= MAX_ID else None


def job_not_found(job_id: int) -> ResponseReturnValue:
    # The same page for a missing job and another user's: ids do not reveal what exists.
    return render_template("job_not_found.html", job_id=job_id), 404


def trial_of(job_id: int) -> tuple[int, int, str | None] | None:
    """(sweep id, trial number, sweep name) when the job is a trial of a sweep."""
    row = get_session().execute(
        select(SweepTrial.sweep_id, SweepTrial.number, Sweep.name)
        .join(Sweep, Sweep.id == SweepTrial.sweep_id)
        .where(SweepTrial.job_id == job_id)
    ).first()  # fmt: skip
    return (row[0], row[1], row[2]) if row is not None else None


def _evaluate_form(job: Job) -> EvaluateForm:
    form = EvaluateForm()
    trained_on = DATASETS.get(job.dataset_name or "")
    # Same kind of data as the training set (an image model scores images); csv needs
    # an upload, which the submit page handles.
    others = [
        name for name, entry in DATASETS.items()
        if trained_on is not None and entry.kind == trained_on.kind
        and name not in (job.dataset_name, "csv")
    ]  # fmt: skip
    form.dataset.choices = [SelectChoice("", f"Same as training ({job.dataset_name or '?'})")]
    form.dataset.choices += [SelectChoice(name, name) for name in others]
    return form


def _page(
    job: Job,
    *,
    evaluate_form: EvaluateForm | None = None,
    evaluate_error: str | None = None,
    evaluate_open: bool = False,
    action_error: str | None = None,
    status: int = 200,
) -> ResponseReturnValue:
    settings = _settings()
    session = get_session()
    events = job_events(session, job.id)
    store = store_for(settings)
    try:
        log_lines, log_offset = job_files.read_log_tail(
            store.source(log_key(job.id)), LOG_TAIL_LINES
        )
        artifacts = store.list(job_prefix(job.id))
    except ArtifactStoreError:
        # The page still shows the job; its files come back with the store.
        log.warning("job %s: artifact store unavailable", job.id, exc_info=True)
        (log_lines, log_offset), artifacts = ([], 0), []
    # A member sees no tracebacks or server paths; an admin all (server/job_errors.py).
    admin = viewer_is_admin()
    log_lines = job_errors.log_lines(log_lines, admin, settings)
    timeline = job_view.timeline(job, events)
    if not admin:
        timeline = [
            replace(e, message=job_errors.shown_message(e.message, settings)) for e in timeline
        ]
    error = job_errors.error_json(job, admin, settings)
    source = find_visible_job(job.source_job_id) if job.source_job_id else None
    can_evaluate = (
        job.kind == "train" and job.state == JobState.SUCCEEDED.value and bool(job.checkpoint_path)
    )
    if evaluate_form is None and can_evaluate:
        evaluate_form = _evaluate_form(job)
    # The stream starts where this page ends: after its last event and log byte. The
    # chart cursor is filled in by the script once it has the initial series.
    cursor = StreamCursor(log=log_offset, event=events[-1].id if events else 0)
    context: dict[str, Any] = {
        "job": job,
        "final": job_view.is_final(job),
        "progress": job_view.progress_of(job),
        "timeline": timeline,
        "error": error,
        "log_lines": log_lines,
        "log_name": job_files.LOG_NAME,
        "artifacts": [{**a, "size": job_view.file_size(a["size_bytes"])} for a in artifacts],
        "results": job_view.results(job),
        # The number the job list shows for this job, so the two pages agree.
        "key_metric": key_metric(job.kind, final_metrics(job.result)),
        "spec_json": job_view.spec_json(job.spec or {}),
        "spec_summary": job_view.spec_summary(job),
        "source": source,
        "sweep_trial": trial_of(job.id),
        "derived": [d for d in derived_from(session, job.id) if can_see(d.owner_id)],
        "can_derive": job.kind in ("train", "prune")
        and job.state == JobState.SUCCEEDED.value
        and bool(job.checkpoint_path)
        and job.artifacts_deleted_at is None,
        "can_cancel": job.state in ("queued", "running") and not job.cancel_requested,
        "can_retry": job_view.is_final(job),
        "can_evaluate": can_evaluate,
        "evaluate_form": evaluate_form,
        "evaluate_error": evaluate_error,
        "evaluate_open": evaluate_open,
        "action_error": action_error,
        "stream_cursor": cursor.token(),
    }
    return render_template("job.html", **context), status


@bp.get("/jobs/<int:job_id>")
@login_required
def job_detail(job_id: int) -> ResponseReturnValue:
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    return _page(job)


def _expired(job: Job) -> ResponseReturnValue:
    return _page(
        job, action_error="The form had expired (no valid security token); try again.", status=400
    )


def _back(job: Job) -> ResponseReturnValue:
    return redirect(url_for("web.job_detail", job_id=job.id), 303)


@bp.post("/jobs/<int:job_id>/cancel")
@login_required
def job_cancel(job_id: int) -> ResponseReturnValue:
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    if not ActionForm().validate_on_submit():
        return _expired(job)
    before = job.state
    session = get_session()
    state = request_cancel(session, job.id)
    session.commit()
    if state in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        flash(f"Job #{job.id} already {state}; there is nothing to cancel.", "error")
    elif state == JobState.CANCELLED.value and before == JobState.CANCELLED.value:
        flash(f"Job #{job.id} was already cancelled.", "info")
    elif state == JobState.CANCELLED.value:
        flash(f"Job #{job.id} cancelled.", "info")
    else:
        flash(f"Cancel requested: job #{job.id} stops within a few seconds.", "info")
    return _back(job)


@bp.post("/jobs/<int:job_id>/retry")
@login_required
def job_retry(job_id: int) -> ResponseReturnValue:
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    if not ActionForm().validate_on_submit():
        return _expired(job)
    try:
        new = submission.retry(job, g.user)
    except ApiError as exc:
        # 409 (still running), 429 (rate limits) or 422 (over the account's limits, each
        # field said): on the page it was asked from.
        detail = "".join(f" {field}: {text}." for field, text in exc.fields.items())
        flash(f"Could not retry job #{job.id}: {exc.message}.{detail}", "error")
        return _back(job)
    flash(f"Retry of job #{job.id} queued as job #{new.id}.", "info")
    return redirect(url_for("web.job_detail", job_id=new.id), 303)


@bp.post("/jobs/<int:job_id>/evaluate")
@login_required
def job_evaluate(job_id: int) -> ResponseReturnValue:
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    form = _evaluate_form(job)
    if not form.validate_on_submit():
        # No csrf_token field at all when CSRF is switched off (WTF_CSRF_ENABLED=False).
        if "csrf_token" in form.errors:
            return _expired(job)
        return _page(job, evaluate_form=form, evaluate_open=True, status=422)
    dataset: dict[str, Any] = {"split": form.split.data}
    if form.dataset.data:
        dataset["name"] = form.dataset.data
    spec = {
        "kind": "evaluate",
        "source_job_id": job.id,
        "checkpoint": form.checkpoint.data,
        "dataset": dataset,
    }
    try:
        new = submission.submit(submission.parse_job_spec(spec), g.user)
    except ApiError as exc:
        general = []
        for name, message in exc.fields.items():
            target = EVALUATE_FIELDS.get(name) or (
                "dataset" if name.startswith("dataset") else None
            )
            if target is not None:
                getattr(form, target).errors = [*getattr(form, target).errors, message]
            else:
                general.append(message)
        error = "; ".join(general) or (None if exc.fields else exc.message)
        return _page(
            job, evaluate_form=form, evaluate_error=error, evaluate_open=True, status=exc.status
        )
    flash(f"Evaluation of job #{job.id} queued as job #{new.id}.", "info")
    return redirect(url_for("web.job_detail", job_id=new.id), 303)


@bp.get("/jobs/<int:job_id>/stream")
@login_required
def job_stream(job_id: int) -> ResponseReturnValue:
    """Live updates for the job page as Server-Sent Events (server/job_stream.py)."""
    job = find_page_job(job_id)
    if job is None:
        return job_not_found(job_id)
    # A reconnecting browser sends the id of the last message it got: resume there.
    cursor = StreamCursor.parse(request.headers.get("Last-Event-ID"))
    if cursor is None and "cursor" in request.args:
        cursor = StreamCursor.parse(request.args["cursor"])
        if cursor is None:
            return Response("invalid cursor\n", 400, mimetype="text/plain")
    config = current_app.config
    stream_seconds = float(config.get("JOB_STREAM_SECONDS", STREAM_SECONDS))
    slots = current_app.extensions.get("trainyard_stream_slots")
    if slots is None:
        slots = current_app.extensions["trainyard_stream_slots"] = StreamSlots(
            _settings(), stream_seconds
        )
    slot = slots.acquire(int(current_user.id))
    if isinstance(slot, Refusal):
        # The page's script waits and tries again (the page works without live updates).
        return Response(
            slot.message + "\n",
            429,
            mimetype="text/plain",
            headers={"Retry-After": str(slot.retry_after), "Cache-Control": "no-store"},
        )
    steps = stream_steps(
        current_app.config["DATABASE_URL"],
        _settings(),
        job.id,
        cursor or StreamCursor(),
        duration=stream_seconds,
        poll_seconds=float(config.get("JOB_STREAM_POLL_SECONDS", POLL_SECONDS)),
        admin=viewer_is_admin(),
    )
    handoff = HandOff(steps, slot.release)
    # Under gunicorn, Trainyard's worker class takes the stream from here without a
    # request thread (server/gunicorn_worker.py); any other server iterates the body.
    request.environ[ENVIRON_KEY] = handoff

    def body() -> Iterator[str]:
        handoff.taken = True
        try:
            for step in steps:
                if isinstance(step, str):
                    yield step
                else:
                    time.sleep(step)
        finally:
            slot.release()

    # The request's own session is closed at teardown, before the body is sent: the
    # stream opens short sessions of its own.
    response = Response(
        body(),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
    # A body closed before it started (a client gone at once) still frees its slot.
    response.call_on_close(lambda: None if handoff.taken else slot.release())
    return response
