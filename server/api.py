"""JSON API v1 under /api/v1: the routes for jobs and the registries (README "API v1")."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any
from urllib.parse import quote

from flask import (
    Blueprint,
    Response,
    current_app,
    jsonify,
    redirect,
    request,
    send_file,
    stream_with_context,
)
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import IntegrityError

from server import api_schemas as schemas
from server import job_errors, job_query, metric_series, submission
from server.access import visible_job
from server.auth import api_user, authenticate_api_request
from server.catalog import catalog_context
from server.database import get_session
from server.errors import ApiError
from server.job_errors import viewer_is_admin
from server.job_query import JobFilters, JobListPage, PageCursor
from server.openapi import operation
from server.params import (
    JobListQuery,
    LogQuery,
    MetricsQuery,
    NoQuery,
    check_path_ids,
    json_body,
    parse_query,
)
from server.serialize import iso, job_to_json
from shared import job_files
from shared.artifact_store import LocalStore, job_prefix, log_key, store_for
from shared.dataset_catalog import DATASETS
from shared.model_catalog import MODELS
from shared.orm import Job
from shared.scheduling import queue_order
from shared.settings import Settings
from shared.spec import (
    TrainSpec,
    spec_to_json,
)
from shared.state_machine import JobState, request_cancel

bp = Blueprint("api_v1", __name__, url_prefix="/api/v1")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

IDEMPOTENCY_HEADER = "Idempotency-Key"
# Printable ASCII, as a header value can carry it unchanged through proxies.
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,200}")


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


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
    if spec_json.get("max_runtime_s") is None:
        # The stored spec got its owner's default max_runtime_s at submission; the same
        # request sent again leaves it open just the same.
        spec_json = {**spec_json, "max_runtime_s": job.spec.get("max_runtime_s")}
    if _spec_digest(job.spec) != _spec_digest(spec_json):
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"{IDEMPOTENCY_HEADER} was already used for a different job spec",
            {IDEMPOTENCY_HEADER: f"already used by job {job.id} with a different spec"},
        )
    headers = {"Location": f"/api/v1/jobs/{job.id}", "Idempotent-Replayed": "true"}
    return jsonify(job_to_json(job)), 200, headers


_JOB_CREATED_HEADERS = {"Location": {"$ref": "#/components/headers/Location"}}


@bp.post("/jobs")
@operation(
    tag="jobs",
    json=schemas.JobSpecBody,
    headers=schemas.IdempotencyHeaders,
    ok={201: schemas.JobResponse, 200: schemas.JobResponse},
    errors={
        403: "A `script` job from a user without the `can_run_code` permission "
        "(`error.fields.can_run_code` says so).",
        413: "",
        415: "",
        422: "The spec is invalid (`invalid_spec`), or over one of your account's limits "
        "(`over_limit`: parameters, estimated memory, batch_size, epochs, max_runtime_s); "
        "`error.fields` names each field. POST /api/v1/jobs/estimate says the same "
        "without submitting.",
        429: "",
    },
    validate=False,  # the body is checked by parse_spec, against the catalogs
    extra={
        "responses": {
            "201": {"description": "The job, queued", "headers": _JOB_CREATED_HEADERS},
            "200": {
                "description": "A repeat of an earlier request with the same "
                "Idempotency-Key and spec: the job it created",
                "headers": {
                    **_JOB_CREATED_HEADERS,
                    "Idempotent-Replayed": {
                        "description": "present on a replay",
                        "schema": {"type": "string", "enum": ["true"]},
                    },
                },
            },
        }
    },
)
def submit_job() -> ResponseReturnValue:
    """Submit a job.

    The job row is committed before the task is enqueued. A bad spec is a 422 naming
    every bad field by its dotted path.
    """
    parse_query(NoQuery)
    key = _idempotency_key()
    spec = submission.parse_job_spec(json_body("invalid_spec", "invalid job spec"))
    spec_json = spec_to_json(spec)
    if (
        key is not None
        and (existing := submission.job_by_idempotency_key(api_user().id, key)) is not None
    ):
        return _replay(existing, spec_json)
    job = submission.build_job(spec, api_user(), idempotency_key=key)
    try:
        submission.store_and_enqueue(job)
    except IntegrityError:
        # A concurrent POST with the same key committed first (the unique index decided):
        # answer with its job, and leave the enqueueing to it.
        get_session().rollback()
        winner = submission.job_by_idempotency_key(api_user().id, key) if key is not None else None
        if winner is None:
            raise
        return _replay(winner, spec_json)
    return _created(job)


@bp.post("/jobs/estimate")
@operation(
    tag="jobs",
    json=schemas.JobSpecBody,
    ok={200: schemas.JobEstimate},
    errors={403: "A `script` job from a user without `can_run_code`.", 413: "", 415: "", 422: ""},
    validate=False,  # the body is checked by parse_spec, against the catalogs
)
def estimate_job() -> ResponseReturnValue:
    """Estimate a job and check it against your limits.

    The spec's parameter count and memory (weights, gradients, optimizer state, one
    batch's activations, the data), your limits, and `exceeded`: each field over a
    limit with the message a submission would get (422 `over_limit`). Nothing is
    stored. A spec that is invalid in itself is a 422 as on submission.
    """
    parse_query(NoQuery)
    spec = submission.parse_job_spec(json_body("invalid_spec", "invalid job spec"))
    return jsonify(submission.estimate(spec, api_user()).to_json(spec))


def _created(job: Job) -> ResponseReturnValue:
    return jsonify(job_to_json(job)), 201, {"Location": f"/api/v1/jobs/{job.id}"}


@bp.get("/jobs")
@operation(tag="jobs", query=JobListQuery, ok={200: JobListPage})
def list_jobs() -> ResponseReturnValue:
    """List jobs: filtered, sorted, keyset-paginated.

    Newest first by default; page with `cursor` (any sort) or `before` (newest only).
    """
    query = parse_query(JobListQuery)
    if query.before is not None and (query.cursor is not None or query.sort != "newest"):
        field = "cursor" if query.cursor is not None else "sort"
        raise ApiError(
            400,
            "invalid_parameter",
            "invalid query parameters",
            {"before": f"cannot be combined with {field}; use cursor"},
        )
    cursor = None
    if query.cursor is not None:
        cursor = PageCursor.decode(query.cursor, query.sort)
    elif query.before is not None:
        # `before` is the newest-first cursor in its first form: the rows below an id.
        cursor = PageCursor("newest", True, 0, (query.before,))
    filters = JobFilters(
        state=query.state, kind=query.kind, model=query.model, dataset=query.dataset,
        tag=query.tag, owner=query.owner, q=query.q,
    )  # fmt: skip
    page = job_query.list_jobs(filters, query.sort, cursor, query.limit)
    more = page.next is not None
    return jsonify(
        {
            "jobs": [job_to_json(j) for j in page.jobs],
            "next_before": page.jobs[-1].id if more and query.sort == "newest" else None,
            "next_cursor": page.next.encode() if page.next else None,
            "prev_cursor": page.prev.encode() if page.prev else None,
        }
    )


@bp.get("/jobs/<int:job_id>")
@operation(tag="jobs", ok={200: schemas.JobResponse}, errors=(404,))
def get_job(job_id: int) -> ResponseReturnValue:
    """A job: state, progress, result, error."""
    parse_query(NoQuery)
    job = visible_job(job_id)
    body = job_to_json(job)
    if job.state == JobState.QUEUED.value:
        ranked = queue_order(get_session(), _settings().aging_points_per_hour, job.queue)
        body["queue_position"] = next((r.position for r in ranked if r.job_id == job.id), None)
    return jsonify(body)


@bp.post("/jobs/<int:job_id>/cancel")
@operation(
    tag="jobs",
    ok={200: schemas.JobResponse},
    errors={404: "", 409: "The job already succeeded or failed.", 413: ""},
)
def cancel_job(job_id: int) -> ResponseReturnValue:
    """Cancel a job.

    A queued job ends `cancelled` at once; a running one stops within a heartbeat.
    """
    parse_query(NoQuery)
    job = visible_job(job_id)
    session = get_session()
    state = request_cancel(session, job_id)
    session.commit()
    session.refresh(job)
    if state in (JobState.SUCCEEDED.value, JobState.FAILED.value):
        raise ApiError(409, "already_finished", f"job {job_id} already {state}", {"state": state})
    return jsonify(job_to_json(job))


@bp.post("/jobs/<int:job_id>/retry")
@operation(
    tag="jobs",
    ok={201: schemas.JobResponse},
    errors={
        403: "A `script` job, and the caller lacks `can_run_code`.",
        404: "",
        409: "The job has not finished yet.",
        413: "",
        422: "The spec is no longer valid (a deleted upload or bundle) or over the "
        "caller's limits; `error.fields` names each field.",
        429: "",
    },
    extra={"responses": {"201": {"description": "The new job", "headers": _JOB_CREATED_HEADERS}}},
)
def retry_job(job_id: int) -> ResponseReturnValue:
    """Retry a finished job.

    A new job with the same spec, owned by whoever asked for it.
    """
    parse_query(NoQuery)
    return _created(submission.retry(visible_job(job_id), api_user()))


@bp.get("/jobs/<int:job_id>/metrics")
@operation(tag="jobs", query=MetricsQuery, ok={200: schemas.Metrics}, errors=(404,))
def get_metrics(job_id: int) -> ResponseReturnValue:
    """A job's metric series, downsampled on the server."""
    query = parse_query(MetricsQuery)
    job = visible_job(job_id)
    keys = [k for k in (query.keys or "").split(",") if k] or None
    series = metric_series.load_series(get_session(), job.id, keys, query.max_points)
    return jsonify({"job_id": job.id, "series": {k: s.to_json() for k, s in series.items()}})


@bp.get("/jobs/<int:job_id>/logs")
@operation(tag="jobs", query=LogQuery, ok={200: schemas.Logs}, errors=(404,))
def get_logs(job_id: int) -> ResponseReturnValue:
    """The last lines of a job's log."""
    query = parse_query(LogQuery)
    job = visible_job(job_id)
    source = store_for(_settings()).source(log_key(job.id))
    lines, size = job_files.read_log_tail(source, query.tail)
    # A member gets no tracebacks or server paths; an admin every line (server/job_errors.py).
    lines = job_errors.log_lines(lines, viewer_is_admin(), _settings())
    deleted = iso(job.artifacts_deleted_at)
    return jsonify(
        {"job_id": job.id, "lines": lines, "size_bytes": size, "artifacts_deleted_at": deleted}
    )


@bp.get("/jobs/<int:job_id>/artifacts")
@operation(tag="artifacts", ok={200: schemas.Artifacts}, errors=(404,))
def list_artifacts(job_id: int) -> ResponseReturnValue:
    """A job's files: checkpoints and whatever else it wrote."""
    parse_query(NoQuery)
    job = visible_job(job_id)
    files = store_for(_settings()).list(job_prefix(job.id))
    deleted = iso(job.artifacts_deleted_at)
    return jsonify({"job_id": job.id, "artifacts": files, "artifacts_deleted_at": deleted})


@bp.get("/jobs/<int:job_id>/artifacts/<path:name>")
@operation(
    tag="artifacts",
    ok={200: None},
    errors={404: "", 410: "The job's files were deleted (DELETE /api/v1/jobs/{id}/artifacts)."},
    validate=False,  # a file streams; spectree would read it whole into memory
    extra={
        "responses": {
            "200": {
                "description": "The file",
                "headers": {
                    "Content-Disposition": {
                        "description": "attachment; filename=...",
                        "schema": {"type": "string"},
                    }
                },
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        }
    },
)
def download_artifact(job_id: int, name: str) -> ResponseReturnValue:
    """Download one of a job's files."""
    parse_query(NoQuery)
    job = visible_job(job_id)
    if job.artifacts_deleted_at is not None:
        raise ApiError(
            410,
            "artifacts_deleted",
            f"job {job_id}'s files were deleted at {iso(job.artifacts_deleted_at)}",
            {"name": "the job's files were deleted"},
        )
    settings = _settings()
    store = store_for(settings)
    # `find` refuses anything that is not a plain listed file under the job's prefix
    # ("..", absolute paths, symlinks out), so a name cannot reach another job's files.
    key = store.find(job_prefix(job.id), name)
    if key is None:
        raise ApiError(
            404, "not_found", f"job {job_id} has no artifact {name!r}", {"name": "no such file"}
        )
    filename = name.rsplit("/", 1)[-1]
    if isinstance(store, LocalStore):
        # Always octet-stream: a type guessed from the name would be whatever the job
        # wrote (`.pt` reads as a SNES page table, `.html` as a page from this origin).
        return send_file(
            store.path(key), mimetype="application/octet-stream", as_attachment=True,
            download_name=filename, max_age=0,
        )  # fmt: skip
    if settings.s3_presign_seconds:
        url = store.presigned_url(key, filename, settings.s3_presign_seconds)
        if url:
            return redirect(url, 302)
    opened = store.open(key)
    if opened is None:  # deleted between the listing and now
        raise ApiError(
            404, "not_found", f"job {job_id} has no artifact {name!r}", {"name": "no such file"}
        )
    return Response(
        stream_with_context(opened.chunks),
        mimetype="application/octet-stream",
        headers={
            "Content-Disposition": _attachment(filename),
            "Content-Length": str(opened.size),
            "Cache-Control": "no-cache",
        },
    )


def _attachment(filename: str) -> str:
    """Content-Disposition for a download, as send_file writes it: an ASCII fallback
    without quotes or control characters, and the exact name in RFC 5987 form."""
    plain = "".join(c for c in filename if 32 <= ord(c) < 127 and c not in '"\\')
    return f"attachment; filename=\"{plain or 'download'}\"; filename*=UTF-8''{quote(filename)}"


@bp.get("/models")
@operation(tag="registry", ok={200: schemas.Models})
def list_models() -> ResponseReturnValue:
    """The model registry: each model's parameter schema, and the recipe schema."""
    parse_query(NoQuery)
    return jsonify(
        {
            "models": [m.to_json() for m in MODELS.values()],
            # The recipe parts (optimizers, schedules, losses, ...) with their ranges.
            "train_spec_schema": TrainSpec.model_json_schema(),
        }
    )


@bp.get("/datasets")
@operation(tag="registry", ok={200: schemas.Datasets})
def list_datasets() -> ResponseReturnValue:
    """The dataset registry: shapes, classes, split sizes, whether files are present."""
    parse_query(NoQuery)
    ctx = catalog_context()
    return jsonify({"datasets": [d.to_json(ctx) for d in DATASETS.values()]})
