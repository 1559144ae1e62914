"""Code bundles for script jobs: POST/GET /api/v1/bundles, GET/DELETE /api/v1/bundles/{id}.

A bundle is a `.tar.gz` or `.zip` of a team's folder (shared/code_bundle.py checks it).
The archive is stored once per content, under its SHA-256 (shared/artifact_store.py,
bundle_key), in the artifact store every worker reads; each owner who uploaded it has a
CodeBundle row, so bundles are owned, listed and deleted like CSV uploads
(server/uploads_api.py), and a second upload of the same bytes by the same owner
answers with the row it already has. Uploading code is part of running code: only users
who may run code (Principal.may_run_code) may.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from werkzeug.exceptions import RequestEntityTooLarge

from server import api_schemas as schemas
from server import quotas
from server.access import find_visible_bundle
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.deletion import UNFINISHED
from server.errors import ApiError
from server.openapi import operation
from server.params import BundleListQuery, BundleQuery, NoQuery, check_path_ids, parse_query
from server.serialize import iso
from server.submission import forbidden_code
from server.uploads_api import clean_filename, request_file
from shared import job_files
from shared.artifact_store import bundle_key, store_for
from shared.code_bundle import (
    BundleError,
    BundleLimits,
    BundleManifest,
    inspect_bundle,
    sha256_file,
)
from shared.orm import CodeBundle, Job
from shared.settings import Settings

bp = Blueprint("bundles_v1", __name__, url_prefix="/api/v1/bundles")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

# The raw-body content types taken besides multipart/form-data; the format is read from
# the bytes, never from the type or the name.
BUNDLE_BODY_TYPES = ("application/gzip", "application/zip", "application/octet-stream")
# A multipart body carries the file plus its part headers and boundaries.
MULTIPART_SLACK = 64 * 1024


def bundle_to_json(bundle: CodeBundle, detail: bool = True) -> dict[str, Any]:
    body = {
        "id": bundle.id,
        "sha256": bundle.sha256,
        "archive_format": bundle.archive_format,
        "filename": bundle.filename,
        "size_bytes": bundle.size_bytes,
        "unpacked_bytes": bundle.unpacked_bytes,
        "file_count": bundle.file_count,
        "has_requirements": bool(bundle.has_requirements),
        "created_at": iso(bundle.created_at),
    }
    if detail:
        body["python_files"] = list(bundle.python_files or [])
    return body


def _not_found(bundle_id: int) -> ApiError:
    return ApiError(
        404, "not_found", f"bundle {bundle_id} does not exist", {"bundle_id": "no such bundle"}
    )


def _inspect(path: Path, limits: BundleLimits) -> BundleManifest:
    try:
        return inspect_bundle(path, limits)
    except BundleError as exc:
        raise ApiError(
            422, "invalid_bundle", f"not a usable code bundle: {exc.message}", {"file": exc.message}
        ) from None


def _store_once(settings: Settings, path: Path, sha256: str, archive_format: str) -> None:
    """Put the archive in the store unless the content is there already. Also run for a
    repeated upload: it puts back an object a racing delete removed."""
    store = store_for(settings)
    key = bundle_key(sha256, archive_format)
    if store.size(key) is None:
        store.put_file(path, key)


def _owned(owner_id: int, sha256: str) -> CodeBundle | None:
    return (
        get_session()
        .scalars(
            select(CodeBundle).where(CodeBundle.owner_id == owner_id, CodeBundle.sha256 == sha256)
        )
        .first()
    )


_ARCHIVE_SCHEMA = {"type": "string", "format": "binary", "description": "a .tar.gz or .zip"}


@bp.post("")
@operation(
    tag="bundles",
    query=BundleQuery,
    form=schemas.BundleForm,
    ok={200: schemas.BundleDetail, 201: schemas.BundleDetail},
    errors={
        400: "An invalid query parameter, or a multipart form without its `file` field.",
        403: "The caller may not run code (`can_run_code`).",
        409: "The caller already keeps TRAINYARD_MAX_BUNDLES_PER_USER bundles.",
        413: "Larger than TRAINYARD_MAX_BUNDLE_BYTES.",
        415: "",
        422: "Not a usable bundle: `error.fields.file` says which rule it breaks (an "
        "absolute or `..` path, a link out of the tree, a device file, too many files, "
        "too large unpacked, not a .tar.gz or .zip).",
        429: "More uploads than TRAINYARD_UPLOAD_RATE_LIMIT allows.",
    },
    validate=False,  # multipart or a raw body: read by the view
    extra={
        "requestBody": {"content": {t: {"schema": _ARCHIVE_SCHEMA} for t in BUNDLE_BODY_TYPES}},
        "responses": {
            "200": {"description": "The caller already has a bundle with these bytes: that one"},
            "201": {
                "description": "The new bundle",
                "headers": {"Location": {"$ref": "#/components/headers/Location"}},
            },
        },
    },
)
def create_bundle() -> ResponseReturnValue:
    """Upload a code bundle for script jobs.

    As the multipart form field `file`, or as a raw body (`application/gzip`,
    `application/zip` or `application/octet-stream`, with `filename`). The archive is
    checked (shared/code_bundle.py) and stored once per content; uploading the same
    bytes again answers 200 with the bundle the caller already has.
    """
    query = parse_query(BundleQuery)
    settings: Settings = current_app.config["TRAINYARD_SETTINGS"]
    user = api_user()
    if not user.may_run_code:  # the same answer as submitting a script job
        raise forbidden_code(user)
    limits = BundleLimits.from_settings(settings)
    raw_body = request.mimetype in BUNDLE_BODY_TYPES
    if raw_body and (request.content_length or 0) > limits.max_archive_bytes:
        raise _too_large(limits)
    quotas.check_bundle_rate(user)
    request.max_content_length = limits.max_archive_bytes + (0 if raw_body else MULTIPART_SLACK)
    try:
        filename, stream = request_file(query.filename, BUNDLE_BODY_TYPES, "the archive")
        incoming, _size = job_files.receive_upload(
            stream, settings.uploads_dir, limits.max_archive_bytes
        )
    except (job_files.UploadTooLarge, RequestEntityTooLarge):
        raise _too_large(limits) from None
    try:
        sha256 = sha256_file(incoming)
        existing = _owned(user.id, sha256)
        if existing is not None:
            _store_once(settings, incoming, sha256, existing.archive_format)
            return jsonify(bundle_to_json(existing)), 200
        quotas.check_bundle_count(user)
        manifest = _inspect(incoming, limits)
        _store_once(settings, incoming, sha256, manifest.archive_format)
        bundle = CodeBundle(
            owner_id=user.id,
            sha256=sha256,
            archive_format=manifest.archive_format,
            filename=clean_filename(filename, f"bundle.{manifest.archive_format}"),
            size_bytes=incoming.stat().st_size,
            unpacked_bytes=manifest.unpacked_bytes,
            file_count=manifest.file_count,
            python_files=manifest.python_files,
            has_requirements=manifest.has_requirements,
        )
        session = get_session()
        session.add(bundle)
        try:
            session.commit()
        except IntegrityError:
            # The same owner sent the same bytes twice at once: the other request won.
            session.rollback()
            existing = _owned(user.id, sha256)
            if existing is None:
                raise
            return jsonify(bundle_to_json(existing)), 200
    finally:
        incoming.unlink(missing_ok=True)
    return jsonify(bundle_to_json(bundle)), 201, {"Location": f"/api/v1/bundles/{bundle.id}"}


def _too_large(limits: BundleLimits) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"the bundle is larger than {limits.max_archive_bytes:,} bytes",
        {"file": f"at most {limits.max_archive_bytes:,} bytes (TRAINYARD_MAX_BUNDLE_BYTES)"},
    )


@bp.get("")
@operation(
    tag="bundles",
    query=BundleListQuery,
    ok={200: schemas.Bundles},
    errors={403: "`all=true` is for admins."},
)
def list_bundles() -> ResponseReturnValue:
    """The caller's bundles, newest first (every user's with `all=true`, admins only).

    `sha256` finds the caller's bundle with that content, if any: the CLI asks before
    uploading a packed folder, so an unchanged folder is never sent twice.
    """
    query = parse_query(BundleListQuery)
    user = api_user()
    if query.all and not user.is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's bundles", {"all": "admins only"}
        )
    stmt = select(CodeBundle).order_by(CodeBundle.id.desc())
    if not query.all:
        stmt = stmt.where(CodeBundle.owner_id == user.id)
    if query.sha256 is not None:
        stmt = stmt.where(CodeBundle.sha256 == query.sha256)
    bundles = get_session().scalars(stmt.limit(query.limit)).all()
    return jsonify({"bundles": [bundle_to_json(b, detail=False) for b in bundles]})


@bp.get("/<int:bundle_id>")
@operation(tag="bundles", ok={200: schemas.BundleDetail}, errors=(404,))
def get_bundle(bundle_id: int) -> ResponseReturnValue:
    """A bundle, with its Python files (what a script job's `entry` may name)."""
    parse_query(NoQuery)
    bundle = find_visible_bundle(bundle_id)
    if bundle is None:
        raise _not_found(bundle_id)
    return jsonify(bundle_to_json(bundle))


def jobs_using_bundle(bundle_id: int) -> list[int]:
    """Queued or running script jobs that run the bundle (any owner's)."""
    rows = get_session().execute(
        select(Job.id, Job.spec).where(Job.state.in_(UNFINISHED), Job.kind == "script")
    )
    return sorted(job_id for job_id, spec in rows if (spec or {}).get("bundle_id") == bundle_id)


@bp.delete("/<int:bundle_id>")
@operation(
    tag="bundles",
    ok={200: schemas.BundleDeleted},
    errors={404: "", 409: "A queued or running job runs the bundle.", 413: ""},
)
def delete_bundle(bundle_id: int) -> ResponseReturnValue:
    """Delete a bundle (admins: anyone's). The stored archive goes with the last bundle
    that has its content.

    Refused (409) while a queued or running job runs it; finished jobs keep their
    results, and retrying one then fails at submission.
    """
    parse_query(NoQuery)
    session = get_session()
    bundle = find_visible_bundle(bundle_id)
    if bundle is None:
        raise _not_found(bundle_id)
    users = jobs_using_bundle(bundle_id)
    if users:
        listed = ", ".join(str(j) for j in users[:10])
        raise ApiError(
            409,
            "bundle_in_use",
            f"bundle {bundle_id} is run by queued or running jobs ({listed}); "
            "cancel them or wait for them to finish",
            {"bundle_id": f"in use by job(s) {listed}"},
        )
    sha256, archive_format = bundle.sha256, bundle.archive_format
    session.delete(bundle)
    session.commit()
    # The row goes first: a crash in between leaves an orphan object, never a row whose
    # archive is gone. Another owner's row with the same content keeps the object.
    others = session.scalar(
        select(func.count()).select_from(CodeBundle).where(CodeBundle.sha256 == sha256)
    )
    freed = 0
    if not others:
        freed = store_for(current_app.config["TRAINYARD_SETTINGS"]).delete(
            bundle_key(sha256, archive_format)
        )
    return jsonify({"id": bundle_id, "deleted": True, "freed_bytes": freed})
