"""The sweep pages: the list (/sweeps), the form (/sweeps/new), one sweep (/sweeps/<id>)
with its cancel and resume buttons.

The form takes the same spec as `POST /api/v1/sweeps` and `trainyard sweep create`, in
YAML or JSON, and creates through the API's own code (server/sweeps_api.py), so a bad
space is refused naming the parameter exactly as the API would. A sweep's page is
server-rendered from the API's JSON (sweep_json), which static/js/sweep.js polls while
the sweep runs to redraw the counts, the table and the charts. Another user's sweep and
a missing one get the same 404 page.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import yaml
from flask import flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import login_required
from flask_wtf import FlaskForm
from sqlalchemy import select

from server.access import can_see, find_visible_job
from server.database import get_session
from server.errors import ApiError
from server.params import MAX_ID
from server.sweeps_api import create_sweep_from, sweep_json
from server.web import bp
from shared.dataset_catalog import DATASETS
from shared.orm import Job, Sweep
from shared.sweep_controller import cancel_sweep, resume_sweep
from shared.sweep_space import axes, format_value, parse_space

LIST_LIMIT = 100
# The form's spec text: far more than any hand-written sweep, far less than a request's cap.
MAX_SPEC_CHARS = 100_000

EXAMPLE = """\
name: digits-mlp
method: random          # grid, random or tpe
metric: val_accuracy
direction: max
max_trials: 8
parallelism: 2
seed: 1
early_stopping: {rule: median, min_epochs: 2, min_trials: 3}
base:
  kind: train
  dataset: {name: digits}
  model: {name: mlp}
  optimizer: {name: adam}
  epochs: 6
space:
  optimizer.lr: loguniform(1e-4, 1e-1)
  model.params.hidden: int(16, 256, log)
  model.params.activation: choice([relu, gelu, tanh, sigmoid])
"""

# A job to start a sweep from: the metric its kind reports per epoch and a first space.
FROM_JOB_SPACE = {
    "train": {"optimizer.lr": "loguniform(1e-4, 1e-1)"},
    "script": {},
}


class SweepActionForm(FlaskForm):
    """The form and the cancel/resume buttons carry only the CSRF token as a field."""


@dataclass
class FormPage:
    text: str
    errors: dict[str, str] = field(default_factory=dict)  # spec field -> message
    message: str | None = None


def _find_sweep(sweep_id: int) -> Sweep | None:
    sweep = get_session().get(Sweep, sweep_id)
    return sweep if sweep is not None and can_see(sweep.owner_id) else None


def _not_found(sweep_id: int) -> ResponseReturnValue:
    return render_template("sweep_not_found.html", sweep_id=sweep_id), 404


# ---------------------------------------------------------------- the list


@bp.get("/sweeps")
@login_required
def sweeps_list() -> ResponseReturnValue:
    """The user's sweeps, newest first (an admin's page lists everyone's)."""
    stmt = select(Sweep).order_by(Sweep.id.desc()).limit(LIST_LIMIT)
    if not g.user.is_admin:
        stmt = stmt.where(Sweep.owner_id == g.user.id)
    sweeps = [sweep_json(s) for s in get_session().scalars(stmt)]
    return render_template("sweeps.html", sweeps=sweeps, is_admin=g.user.is_admin)


# ---------------------------------------------------------------- the form


def _from_job(job: Job) -> str:
    """A starting spec around a job of the user's: its spec as the base, a first space."""
    base = {k: v for k, v in (job.spec or {}).items() if k not in ("name", "tags")}
    if job.kind == "train" and not isinstance(base.get("optimizer"), dict):
        base["optimizer"] = {"name": "adam"}  # optimizer.lr needs the object to set into
    spec: dict[str, Any] = {
        "name": f"{job.name or f'job-{job.id}'}-sweep"[:200],
        "method": "random",
        "metric": "val_accuracy" if job.kind == "train" else "CHANGE-ME",
        "max_trials": 8,
        "parallelism": 2,
        "base": base,
        "space": FROM_JOB_SPACE.get(job.kind, {}),
    }
    if job.kind == "train" and job.dataset_name and _is_regression(job):
        spec["metric"] = "val_r2"
    return yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)


def _is_regression(job: Job) -> bool:
    entry = DATASETS.get(job.dataset_name or "")
    return entry is not None and entry.tasks == ("regression",)


def _render_form(page: FormPage, status: int = 200) -> ResponseReturnValue:
    return render_template("sweep_new.html", page=page, max_chars=MAX_SPEC_CHARS), status


@bp.get("/sweeps/new")
@login_required
def sweep_new() -> ResponseReturnValue:
    raw = request.args.get("from_job", "")
    if not raw:
        return _render_form(FormPage(text=EXAMPLE))
    job = find_visible_job(int(raw)) if raw.isdigit() and 0 < int(raw) <= MAX_ID else None
    if job is None or job.kind not in FROM_JOB_SPACE:
        page = FormPage(text=EXAMPLE, message=f"Job {raw} is not a train or script job of yours.")
        return _render_form(page, status=404)
    message = f"The base is job {job.id}'s spec; add the parameters to search under space."
    return _render_form(FormPage(text=_from_job(job), message=message))


def parse_spec_text(text: str) -> Any:
    """The form's text as YAML (JSON is YAML too); ApiError 422 naming `spec` with the
    line of a syntax error."""
    if len(text) > MAX_SPEC_CHARS:
        raise ApiError(422, "invalid_sweep", "invalid sweep spec",
                       {"spec": f"at most {MAX_SPEC_CHARS:,} characters"})  # fmt: skip
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML or JSON"
        raise ApiError(422, "invalid_sweep", "invalid sweep spec",
                       {"spec": f"{where}{problem}"}) from None  # fmt: skip
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_sweep", "invalid sweep spec",
                       {"spec": "must be a mapping with base, space, method, metric, ..."})  # fmt: skip
    return data


@bp.post("/sweeps/new")
@login_required
def sweep_create() -> ResponseReturnValue:
    page = FormPage(text=request.form.get("spec", ""))
    if not SweepActionForm().validate_on_submit():
        page.message = "The form expired or was not sent from this page; check it and submit again."
        return _render_form(page, status=400)
    try:
        sweep = create_sweep_from(parse_spec_text(page.text))
    except ApiError as exc:
        page.errors = dict(exc.fields)
        page.message = exc.message
        return _render_form(page, status=exc.status)
    flash(f"Sweep #{sweep.id} created; its first trials start within a few seconds.", "info")
    return redirect(url_for("web.sweep_detail", sweep_id=sweep.id), 303)


# ---------------------------------------------------------------- one sweep


def ranked(trials: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    """Trials with a value first, best first (ties to the earlier trial), then the rest
    by number."""
    sign = -1 if direction == "max" else 1
    scored = [t for t in trials if t["value"] is not None]
    scored.sort(key=lambda t: (sign * t["value"], t["number"]))
    rest = sorted((t for t in trials if t["value"] is None), key=lambda t: t["number"])
    return scored + rest


def param_text(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return format_value(value) if value is not None else "—"


def rate(value: float | None) -> str:
    """Samples/s: whole numbers with separators (12,346), small rates to 3 digits."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


@bp.get("/sweeps/<int:sweep_id>")
@login_required
def sweep_detail(sweep_id: int) -> ResponseReturnValue:
    sweep = _find_sweep(sweep_id)
    if sweep is None:
        return _not_found(sweep_id)
    data = sweep_json(sweep, detail=True)
    chart_axes = axes(parse_space(data["spec"]["space"]))
    return render_template(
        "sweep.html",
        sweep=data,
        trials=ranked(data["trials"], data["direction"]),
        axes=chart_axes,
        param_text=param_text,
        rate=rate,
        action_form=SweepActionForm(),
        page_data={"sweep": data, "axes": chart_axes},
    )


def _change(sweep_id: int, action: str) -> ResponseReturnValue:
    sweep = _find_sweep(sweep_id)
    if sweep is None:
        return _not_found(sweep_id)
    if not SweepActionForm().validate_on_submit():
        flash("The form had expired (no valid security token); try again.", "error")
    else:
        session = get_session()
        change = cancel_sweep if action == "cancel" else resume_sweep
        if change(session, sweep.id):
            session.commit()
            done = "cancelled: no new trials, its running trials stop" if action == "cancel" else \
                "resumed: it continues where it stopped"  # fmt: skip
            flash(f"Sweep #{sweep.id} {done}.", "info")
        else:
            what = "cancelled" if action == "cancel" else "resumed (only a cancelled sweep is)"
            flash(f"Sweep #{sweep.id} is {sweep.state}; it cannot be {what}.", "error")
    return redirect(url_for("web.sweep_detail", sweep_id=sweep_id), 303)


@bp.post("/sweeps/<int:sweep_id>/cancel")
@login_required
def sweep_cancel(sweep_id: int) -> ResponseReturnValue:
    return _change(sweep_id, "cancel")


@bp.post("/sweeps/<int:sweep_id>/resume")
@login_required
def sweep_resume(sweep_id: int) -> ResponseReturnValue:
    return _change(sweep_id, "resume")
