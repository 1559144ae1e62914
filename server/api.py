"""JSON API v1 under /api/v1 (design.md section 3)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from server.catalog import catalog_context
from server.database import get_session
from server.enqueue import enqueue_job
from server.errors import ApiError
from server.serialize import job_to_json
from shared.dataset_catalog import DATASETS, resolve_dataset
from shared.model_catalog import MODELS
from shared.models import Job, MetricPoint
from shared.schema_base import CatalogError
from shared.settings import Settings
from shared.spec import (
    EvaluateSpec,
    SpecError,
    TrainSpec,
    eval_dataset_params,
    load_stored_spec,
    parse_spec,
    resolve_train_dataset,
    spec_to_json,
)
from shared.state_machine import ALL_STATES, JobState, request_cancel

bp = Blueprint("api_v1", __name__, url_prefix="/api/v1")

MAX_PAGE = 200
DEFAULT_MAX_POINTS = 2000
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Printable ASCII, as a header value can carry it unchanged through proxies.
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,200}")


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def _json_body() -> Any:
    # force=True: a client that forgets the Content-Type header still gets its JSON read.
    data = request.get_json(force=True, silent=True)
    if data is None:
        raise ApiError(
            400,
            "invalid_json",
            "request body is not valid JSON",
            {"body": "expected a JSON object"},
        )
    return data


def _int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(
            400, "invalid_parameter", f"{name} must be an integer", {name: "must be an integer"}
        ) from None
    if not lo <= value <= hi:
        raise ApiError(
            400,
            "invalid_parameter",
            f"{name} out of range",
            {name: f"must be between {lo} and {hi}"},
        )
    return value


def _get_job(job_id: int) -> Job:
    job = get_session().get(Job, job_id)
    if job is None:
        raise ApiError(404, "not_found", f"job {job_id} does not exist")
    return job


def _invalid(fields: dict[str, str]) -> ApiError:
    return ApiError(422, "invalid_spec", "invalid job spec", fields)


def _check_evaluate_source(spec: EvaluateSpec) -> Job:
    """An evaluate job must name a succeeded train job, and a dataset its model can take."""
    field = "source_job_id"
    source = get_session().get(Job, spec.source_job_id)
    if source is None:
        raise _invalid({field: f"job {spec.source_job_id} does not exist"})
    if source.kind != "train":
        raise _invalid({field: f"job {source.id} is an {source.kind} job, not a train job"})
    if source.state != JobState.SUCCEEDED.value or not source.checkpoint_path:
        raise _invalid(
            {
                field: f"job {source.id} is {source.state}; only succeeded train jobs can be evaluated"
            }
        )
    source_spec = load_stored_spec(source.spec)
    assert isinstance(source_spec, TrainSpec)
    ctx = catalog_context()
    try:
        trained_on = resolve_train_dataset(source_spec, ctx)
        name, params = eval_dataset_params(spec, source_spec)
        scored_on = resolve_dataset(name, params, ctx)
    except CatalogError as exc:
        raise _invalid({exc.field: exc.message}) from None
    except SpecError as exc:
        raise _invalid(exc.fields) from None
    problem = scored_on.compatible_with(trained_on)
    if problem:
        raise _invalid({"dataset.name": f"{problem} (job {source.id})"})
    return source


def _idempotency_key() -> str | None:
    if IDEMPOTENCY_HEADER not in request.headers:
        return None
    key = request.headers[IDEMPOTENCY_HEADER]
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            400,
            "invalid_header",
            f"invalid {IDEMPOTENCY_HEADER} header",
            {IDEMPOTENCY_HEADER: "must be 1 to 200 printable ASCII characters"},
        )
    return key


def _spec_digest(spec_json: dict[str, Any]) -> str:
    # Canonical JSON, so a retry whose body differs only in key order or spelling of the
    # same values (1e-3 vs 0.001) still counts as the same request.
    canonical = json.dumps(spec_json, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(job: Job, spec_json: dict[str, Any]) -> ResponseReturnValue:
    """The answer to a repeated Idempotency-Key: the job it created, never a second one."""
    if _spec_digest(job.spec) != _spec_digest(spec_json):
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"{IDEMPOTENCY_HEADER} was already used for a different job spec",
            {IDEMPOTENCY_HEADER: f"already used by job {job.id} with a different spec"},
        )
    headers = {"Location": f"/api/v1/jobs/{job.id}", "Idempotent-Replayed": "true"}
    return jsonify(job_to_json(job)), 200, headers


def _job_by_key(key: str) -> Job | None:
    return get_session().scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()


@bp.post("/jobs")
def submit_job() -> ResponseReturnValue:
    key = _idempotency_key()
    try:
        spec = parse_spec(_json_body(), catalog_context())
    except SpecError as exc:
        raise _invalid(exc.fields) from None
    spec_json = spec_to_json(spec)
    if key is not None and (existing := _job_by_key(key)) is not None:
        return _replay(existing, spec_json)

    source = _check_evaluate_source(spec) if isinstance(spec, EvaluateSpec) else None
    if isinstance(spec, TrainSpec):
        model_name, dataset_name = spec.model.name, spec.dataset.name
    else:
        model_name = source.model_name if source else None
        dataset_name = spec.dataset.name or (source.dataset_name if source else None)
    job = Job(
        kind=spec.kind,
        name=spec.name,
        state=JobState.QUEUED.value,
        queue=spec.queue,
        priority=spec.priority,
        spec=spec_json,
        model_name=model_name,
        dataset_name=dataset_name,
        source_job_id=source.id if source else None,
        max_attempts=_settings().max_attempts,
        idempotency_key=key,
    )
    session = get_session()
    session.add(job)
    try:
        # Commit before enqueue: a worker that picks the task up at once must find the row.
        session.commit()
    except IntegrityError:
        # A concurrent POST with the same key committed first (the unique index decided):
        # answer with its job, and leave the enqueueing to it.
        session.rollback()
        winner = _job_by_key(key) if key is not None else None
        if winner is None:
            raise
        return _replay(winner, spec_json)
    enqueue_job(job)
    return jsonify(job_to_json(job)), 201, {"Location": f"/api/v1/jobs/{job.id}"}


@bp.get("/jobs")
def list_jobs() -> ResponseReturnValue:
    stmt = select(Job).order_by(Job.id.desc())
    state = request.args.get("state")
    if state:
        if state not in ALL_STATES:
            raise ApiError(
                400,
                "invalid_parameter",
                "unknown state",
                {"state": f"one of: {', '.join(ALL_STATES)}"},
            )
        stmt = stmt.where(Job.state == state)
    kind = request.args.get("kind")
    if kind:
        if kind not in ("train", "evaluate"):
            raise ApiError(
                400, "invalid_parameter", "unknown kind", {"kind": "one of: train, evaluate"}
            )
        stmt = stmt.where(Job.kind == kind)
    limit = _int_arg("limit", 50, 1, MAX_PAGE)
    before = _int_arg("before", None, 1, 2**62)
    if before is not None:
        # Keyset pagination: stable under inserts and as fast on page 1000 as on page 1.
        stmt = stmt.where(Job.id < before)
    jobs = get_session().scalars(stmt.limit(limit + 1)).all()
    page = jobs[:limit]
    next_before = page[-1].id if len(jobs) > limit else None
    return jsonify({"jobs": [job_to_json(j) for j in page], "next_before": next_before})


@bp.get("/jobs/<int:job_id>")
def get_job(job_id: int) -> ResponseReturnValue:
    return jsonify(job_to_json(_get_job(job_id)))


@bp.post("/jobs/<int:job_id>/cancel")
def cancel_job(job_id: int) -> ResponseReturnValue:
    session = get_session()
    state = request_cancel(session, job_id)
    session.commit()
    if state is None:
        raise ApiError(404, "not_found", f"job {job_id} does not exist")
    job = _get_job(job_id)
    session.refresh(job)
    if state in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        raise ApiError(409, "already_finished", f"job {job_id} already {state}", {"state": state})
    return jsonify(job_to_json(job))


def _downsample(
    rows: list[tuple[int, int | None, float]], max_points: int
) -> list[tuple[int, int | None, float]]:
    # Even stride keeps the shape of a curve; the last point is always kept so the
    # final value shown matches the result.
    if len(rows) <= max_points:
        return rows
    stride = -(-len(rows) // max_points)
    picked = rows[::stride]
    if picked[-1] is not rows[-1]:
        picked[-1] = rows[-1]
    return picked


@bp.get("/jobs/<int:job_id>/metrics")
def get_metrics(job_id: int) -> ResponseReturnValue:
    job = _get_job(job_id)
    max_points = _int_arg("max_points", DEFAULT_MAX_POINTS, 2, 100_000) or DEFAULT_MAX_POINTS
    stmt = (
        select(MetricPoint.key, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
        .where(MetricPoint.job_id == job.id)
        .order_by(MetricPoint.key, MetricPoint.step, MetricPoint.id)
    )
    keys = [k for k in request.args.get("keys", "").split(",") if k]
    if keys:
        stmt = stmt.where(MetricPoint.key.in_(keys))
    by_key: dict[str, list[tuple[int, int | None, float]]] = {}
    for key, step, epoch, value in get_session().execute(stmt):
        by_key.setdefault(key, []).append((step, epoch, value))
    series = {}
    for key, rows in by_key.items():
        rows = _downsample(rows, max_points)
        series[key] = {
            "step": [r[0] for r in rows],
            "epoch": [r[1] for r in rows],
            "value": [r[2] for r in rows],
        }
    return jsonify({"job_id": job.id, "series": series})


@bp.get("/models")
def list_models() -> ResponseReturnValue:
    return jsonify(
        {
            "models": [m.to_json() for m in MODELS.values()],
            # The recipe parts (optimizers, schedules, losses, ...) with their ranges.
            "train_spec_schema": TrainSpec.model_json_schema(),
        }
    )


@bp.get("/datasets")
def list_datasets() -> ResponseReturnValue:
    ctx = catalog_context()
    return jsonify({"datasets": [d.to_json(ctx) for d in DATASETS.values()]})
