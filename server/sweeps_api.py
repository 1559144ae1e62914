"""Sweeps: POST/GET /api/v1/sweeps, GET /api/v1/sweeps/{id}, POST .../cancel and
.../resume.

Creating one checks its spec (shared/sweep_spec.py) and every point of its space
against the catalogue as a job would be, and each checked trial against the owner's
limits, before anything runs; the trials themselves are created by the controller
(shared/sweep_controller.py) in the reconciler's loop. Owned like jobs: someone else's
sweep reads as missing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from server import api_schemas as schemas
from server import submission
from server.access import can_see, find_visible_bundle
from server.auth import api_user, authenticate_api_request
from server.catalog import catalog_context
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import NoQuery, UploadListQuery, check_path_ids, json_body, parse_query
from server.serialize import iso
from shared.metric_catalog import finite_number
from shared.orm import Job, Sweep, SweepTrial
from shared.spec import ScriptSpec, SpecError, parse_spec
from shared.sweep_controller import cancel_sweep, resume_sweep
from shared.sweep_spec import (
    SweepSpec,
    SweepSpecError,
    apply,
    load_sweep_spec,
    parse_sweep_spec,
    points_to_check,
    sweep_to_json,
    validate,
)

bp = Blueprint("sweeps_v1", __name__, url_prefix="/api/v1/sweeps")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

TRIAL_STATES = ("queued", "running", "succeeded", "pruned", "failed", "cancelled")


def _invalid(fields: dict[str, str]) -> ApiError:
    return ApiError(422, "invalid_sweep", "invalid sweep spec", fields)


def _check_limits(spec: SweepSpec) -> None:
    """Every checked trial within the owner's limits (the controller creates them
    without a request, so this is where they are held to them)."""
    user = api_user()
    ctx = catalog_context()
    for point in points_to_check(spec):
        try:
            trial = parse_spec(apply(spec.base, point), ctx)
        except SpecError:
            continue  # validate() reported it
        if isinstance(trial, ScriptSpec):
            submission.check_script(trial, user)
        over = submission.admit(trial, user, None).over
        if over:
            where = ", ".join(f"{p}={v}" for p, v in point.items()) or "the base"
            raise ApiError(
                422,
                "over_limit",
                f"a trial exceeds the limits of your account (when the space sets {where})",
                {f"base.{field}": message for field, message in over.items()},
            )


@bp.post("")
@operation(
    tag="sweeps",
    json=schemas.SweepSpecBody,
    ok={201: schemas.SweepDetail},
    errors={
        403: "A sweep of script jobs without `can_run_code`.",
        413: "",
        415: "",
        422: "The spec is invalid, or a point of its space makes an invalid job "
        "(`space.<path>` names the parameter), or a trial exceeds your limits.",
    },
    validate=False,  # checked by parse_sweep_spec, against the catalogues
)
def create_sweep() -> ResponseReturnValue:
    """Create a sweep; its trials start within a reconciler pass."""
    parse_query(NoQuery)
    sweep = create_sweep_from(json_body("invalid_sweep", "invalid sweep spec"))
    return jsonify(sweep_json(sweep, detail=True)), 201, {"Location": f"/api/v1/sweeps/{sweep.id}"}


def create_sweep_from(body: Any) -> Sweep:
    """Check a sweep spec (already parsed from JSON or YAML) for api_user() and store it;
    ApiError (422 naming the field, 403, 429) when it cannot run. The sweep form page
    (server/web/sweep_pages.py) creates through here too."""
    settings = current_app.config["TRAINYARD_SETTINGS"]
    try:
        spec = parse_sweep_spec(body, max_trials_cap=settings.sweep_max_trials)
        validate(
            spec, catalog_context(), find_bundle=find_visible_bundle,
            max_points=settings.sweep_max_points_checked,
        )  # fmt: skip
    except SweepSpecError as exc:
        raise _invalid(exc.fields) from None
    _check_limits(spec)
    submission.submit_limits().check(api_user())
    sweep = Sweep(owner_id=api_user().id, name=spec.name, spec=sweep_to_json(spec), state="running")
    session = get_session()
    session.add(sweep)
    session.commit()
    return sweep


@bp.get("")
@operation(
    tag="sweeps",
    query=UploadListQuery,
    ok={200: schemas.Sweeps},
    errors={403: "`all=true` from a caller who is not an admin."},
)
def list_sweeps() -> ResponseReturnValue:
    """Your sweeps, newest first (`all=true`: everyone's, admins)."""
    query = parse_query(UploadListQuery)
    user = api_user()
    if query.all and not user.is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's sweeps", {"all": "admins only"}
        )
    stmt = select(Sweep).order_by(Sweep.id.desc()).limit(query.limit)
    if not query.all:
        stmt = stmt.where(Sweep.owner_id == user.id)
    return jsonify({"sweeps": [sweep_json(s) for s in get_session().scalars(stmt)]})


def visible_sweep(sweep_id: int) -> Sweep:
    sweep = get_session().get(Sweep, sweep_id)
    if sweep is None or not can_see(sweep.owner_id):
        raise ApiError(404, "not_found", f"sweep {sweep_id} does not exist",
                       {"sweep_id": "no such sweep"})  # fmt: skip
    return sweep


@bp.get("/<int:sweep_id>")
@operation(tag="sweeps", ok={200: schemas.SweepDetail}, errors=(404,))
def get_sweep(sweep_id: int) -> ResponseReturnValue:
    """A sweep with its trials (by number) and its best trial."""
    parse_query(NoQuery)
    return jsonify(sweep_json(visible_sweep(sweep_id), detail=True))


@bp.post("/<int:sweep_id>/cancel")
@operation(
    tag="sweeps", ok={200: schemas.SweepDetail}, errors={404: "", 409: "Not running.", 413: ""}
)
def cancel(sweep_id: int) -> ResponseReturnValue:
    """Cancel a sweep: no new trials, queued ones cancelled, running ones stop."""
    return _change(sweep_id, cancel_sweep, "not_running", "")


@bp.post("/<int:sweep_id>/resume")
@operation(
    tag="sweeps", ok={200: schemas.SweepDetail}, errors={404: "", 409: "Not cancelled.", 413: ""}
)
def resume(sweep_id: int) -> ResponseReturnValue:
    """Resume a cancelled sweep where it stopped (finished trials are not run again)."""
    return _change(sweep_id, resume_sweep, "not_cancelled", "; only a cancelled sweep resumes")


def _change(
    sweep_id: int, change: Callable[[Session, int], bool], code: str, hint: str
) -> ResponseReturnValue:
    """Cancel or resume (shared/sweep_controller.py); 409 when the state does not allow it."""
    parse_query(NoQuery)
    sweep = visible_sweep(sweep_id)
    session = get_session()
    if not change(session, sweep.id):
        raise ApiError(
            409, code, f"sweep {sweep.id} is {sweep.state}{hint}", {"state": sweep.state}
        )
    session.commit()
    session.refresh(sweep)
    return jsonify(sweep_json(sweep, detail=True))


# ---------------------------------------------------------------- serializing


def _whole(value: float | None) -> int | float | None:
    """A count as an integer (9034, not 9034.0: the metric sink stores floats)."""
    return int(value) if value is not None and value.is_integer() else value


def _trial_json(trial: SweepTrial, job: Job, metric: str) -> dict[str, Any]:
    metrics = (job.result or {}).get("metrics") or {}
    state = "pruned" if trial.pruned_at_epoch is not None else job.state
    return {
        "number": trial.number,
        "job_id": job.id,
        "state": state,
        "params": trial.params,
        "value": finite_number(metrics.get(metric)),
        "pruned_at_epoch": trial.pruned_at_epoch,
        "prune_reason": trial.prune_reason,
        "num_parameters": _whole(finite_number(metrics.get("num_parameters"))),
        "samples_per_s": finite_number(metrics.get("samples_per_s")),
        "finished_at": iso(job.finished_at),
    }


def sweep_json(sweep: Sweep, detail: bool = False) -> dict[str, Any]:
    spec = load_sweep_spec(sweep.spec)
    rows = get_session().execute(
        select(SweepTrial, Job).join(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep.id).order_by(SweepTrial.number)
    ).all()  # fmt: skip
    trials = [_trial_json(t, j, spec.metric) for t, j in rows]
    counts = {state: 0 for state in TRIAL_STATES}
    for trial in trials:
        counts[trial["state"]] = counts.get(trial["state"], 0) + 1
    scored = [t for t in trials if t["state"] == "succeeded" and t["value"] is not None]
    pick = max if spec.direction == "max" else min
    best = pick(scored, key=lambda t: t["value"]) if scored else None
    out: dict[str, Any] = {
        "id": sweep.id,
        "name": sweep.name,
        "owner": sweep.owner.username if sweep.owner else None,
        "state": sweep.state,
        "error": sweep.error_message,
        "method": spec.method,
        "metric": spec.metric,
        "direction": spec.direction,
        "max_trials": spec.max_trials,
        "parallelism": spec.parallelism,
        "counts": counts,
        "best": best,
        "created_at": iso(sweep.created_at),
        "finished_at": iso(sweep.finished_at),
    }
    if detail:
        out["spec"] = sweep_to_json(spec)
        out["trials"] = trials
    return out
