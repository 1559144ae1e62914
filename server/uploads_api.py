"""CSV uploads for the `csv` dataset: POST /api/v1/uploads, GET /api/v1/uploads/{id}."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, BinaryIO

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from server import api_schemas as schemas
from server import deletion, quotas
from server.access import find_visible_upload
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.openapi import operation
from server.params import (
    NoQuery,
    UploadColumnsQuery,
    UploadListQuery,
    UploadQuery,
    check_path_ids,
    parse_query,
)
from server.serialize import iso
from shared import job_files
from shared.artifact_store import store_for, upload_key
from shared.csv_profile import CsvProblem, CsvProfile, profile_lines
from shared.invisible_chars import first_invisible, strip_invisible
from shared.orm import Upload
from shared.settings import Settings

bp = Blueprint("uploads_v1", __name__, url_prefix="/api/v1/uploads")
bp.before_request(authenticate_api_request)
bp.before_request(check_path_ids)

# The raw-body content types taken besides multipart/form-data.
CSV_BODY_TYPES = ("text/csv", "text/plain", "application/octet-stream")
# Control characters (NUL above all: PostgreSQL refuses it in text) have no place in
# a filename that is stored and shown.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def upload_to_json(upload: Upload) -> dict[str, Any]:
    return {
        "id": upload.id,
        "filename": upload.filename,
        "size_bytes": upload.size_bytes,
        "rows": upload.rows,
        "columns": upload.columns,
        "created_at": iso(upload.created_at),
    }


def request_file(
    filename: str | None, body_types: tuple[str, ...], what: str
) -> tuple[str | None, BinaryIO]:
    """(filename, a stream of the file) from a multipart `file` field, or from a raw body
    of one of `body_types` (named by the query's `filename`). `what` names the file in
    errors ("the CSV"). Shared with code bundles (server/bundles_api.py).

    Neither is read into memory here: werkzeug spools a multipart file to disk, and a
    raw body is read from the socket as it is copied.
    """
    if request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        if file is None:
            raise ApiError(
                400,
                "missing_file",
                "no file in the request",
                {"file": f"send {what} as the form field 'file'"},
            )
        return file.filename, file.stream
    if request.mimetype in body_types:
        return filename, request.stream
    raw = " or ".join(t for t in body_types if t != "application/octet-stream")
    raise ApiError(
        415, "unsupported_media_type", f"send multipart/form-data with a 'file' field, or a {raw} body",
        {"Content-Type": f"unsupported content type {request.mimetype or 'none'!r}; "
                         f"use multipart/form-data or {raw}"},
    )  # fmt: skip


def clean_filename(filename: str | None, default: str) -> str:
    """A sent file's name as stored and shown (`default` when nothing is left of it)."""
    # Invisible formatting characters (bidi overrides, zero-width ones) would let the
    # shown name disguise the file: the stored display name goes without them.
    name = strip_invisible(_CONTROL_CHARS.sub("", os.path.basename(filename or "")))
    # Unpaired surrogates (from a percent-encoded multipart header) cannot be stored.
    name = name.encode("utf-8", "replace").decode("utf-8")
    return name[:255] or default


_CSV_SCHEMA = {"type": "string", "format": "binary", "description": "the CSV file (UTF-8)"}


@bp.post("")
@operation(
    tag="uploads",
    query=UploadQuery,
    form=schemas.UploadForm,
    ok={201: schemas.UploadResponse},
    errors={
        400: "An invalid query parameter, or a multipart form without its `file` field.",
        409: "The caller already keeps TRAINYARD_MAX_UPLOADS_PER_USER uploads.",
        413: "Larger than TRAINYARD_MAX_UPLOAD_BYTES, or past the caller's "
        "TRAINYARD_MAX_UPLOAD_BYTES_PER_USER quota.",
        415: "",
        422: "The file is not a usable UTF-8 CSV.",
        429: "More uploads than TRAINYARD_UPLOAD_RATE_LIMIT allows.",
    },
    validate=False,  # multipart or a raw body: read by the view
    extra={
        "requestBody": {"content": {t: {"schema": _CSV_SCHEMA} for t in CSV_BODY_TYPES}},
        "responses": {
            "201": {
                "description": "The upload: its columns and row count",
                "headers": {"Location": {"$ref": "#/components/headers/Location"}},
            }
        },
    },
)
def create_upload() -> ResponseReturnValue:
    """Upload a CSV for the `csv` dataset.

    As the multipart form field `file`, or as a raw `text/csv` body (with `filename`).
    The size limit is TRAINYARD_MAX_UPLOAD_BYTES; the file is parsed as it streams in
    and kept in a compact typed form (shared/column_store.py), not as text.
    """
    query = parse_query(UploadQuery)
    settings: Settings = current_app.config["TRAINYARD_SETTINGS"]
    user = api_user()
    raw_body = request.mimetype in CSV_BODY_TYPES
    quotas.check_upload_allowed(user, request.content_length if raw_body else None)
    request.max_content_length = settings.max_upload_bytes
    filename, stream = request_file(query.filename, CSV_BODY_TYPES, "the CSV")
    uploads_dir = settings.uploads_dir
    try:
        incoming, size = job_files.receive_upload(stream, uploads_dir, settings.max_upload_bytes)
    except job_files.UploadTooLarge:
        raise RequestEntityTooLarge() from None
    try:
        quotas.check_upload_bytes(user, size)
        profile = _profile(incoming)
        session = get_session()
        upload = Upload(
            owner_id=user.id,
            filename=clean_filename(filename, "upload.csv"),
            size_bytes=size,
            rows=profile.rows,
            columns=[
                {"name": c.name, "numeric": c.numeric, "distinct": c.distinct}
                for c in profile.columns
            ],
            storage_format="columns",
        )
        session.add(upload)
        session.flush()  # the id names the file
        try:
            stored = job_files.store_upload_columns(uploads_dir, upload.id, incoming, profile)
            store = store_for(settings)
            if not store.is_local:
                # In the bucket before the row commits: a row never names a missing file.
                store.put_file(stored, upload_key(upload.id, "columns"))
                stored.unlink()
            session.commit()
        except BaseException:
            session.rollback()
            job_files.delete_upload_files(uploads_dir, upload.id)
            raise
    finally:
        incoming.unlink(missing_ok=True)
    return jsonify(upload_to_json(upload)), 201, {"Location": f"/api/v1/uploads/{upload.id}"}


def _profile(path: Path) -> CsvProfile:
    """The CSV rules applied to the received file, streaming; 422 naming `file` when it fails."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            profile = profile_lines(f)
    except UnicodeDecodeError:
        raise ApiError(
            422, "invalid_csv", "the file is not UTF-8 text", {"file": "must be UTF-8 encoded CSV"}
        ) from None
    except CsvProblem as exc:
        raise ApiError(
            422, "invalid_csv", f"not a usable CSV file: {exc}", {"file": str(exc)}
        ) from None
    # Column names end up in specs, the form and the job page: refused like job names
    # and tags (shared/spec.py), not silently renamed under a spec that names them.
    for number, column in enumerate(profile.columns, start=1):
        if (char := first_invisible(column.name)) is not None:
            problem = f"column {number}'s name contains the invisible character {char}"
            raise ApiError(
                422, "invalid_csv", f"not a usable CSV file: {problem}", {"file": problem}
            )
    return profile


@bp.get("/<int:upload_id>")
@operation(tag="uploads", ok={200: schemas.UploadResponse}, errors=(404,))
def get_upload(upload_id: int) -> ResponseReturnValue:
    """An upload: its columns and row count."""
    parse_query(NoQuery)
    upload = find_visible_upload(upload_id)
    if upload is None:
        raise ApiError(
            404, "not_found", f"upload {upload_id} does not exist", {"upload_id": "no such upload"}
        )
    return jsonify(upload_to_json(upload))


@bp.get("")
@operation(
    tag="uploads",
    query=UploadListQuery,
    ok={200: schemas.Uploads},
    errors={403: "`all=true` is for admins."},
)
def list_uploads() -> ResponseReturnValue:
    """The caller's uploads, newest first (every user's with `all=true`, admins only)."""
    query = parse_query(UploadListQuery)
    user = api_user()
    if query.all and not user.is_admin:
        raise ApiError(
            403, "forbidden", "only admins can list every user's uploads", {"all": "admins only"}
        )
    stmt = select(Upload).order_by(Upload.id.desc())
    if not query.all:
        stmt = stmt.where(Upload.owner_id == user.id)
    uploads = get_session().scalars(stmt.limit(query.limit)).all()
    return jsonify({"uploads": [upload_to_json(u) for u in uploads]})


@bp.delete("/<int:upload_id>")
@operation(
    tag="uploads",
    ok={200: schemas.UploadDeleted},
    errors={404: "", 409: "A queued or running job uses the upload.", 413: ""},
)
def delete_upload(upload_id: int) -> ResponseReturnValue:
    """Delete an upload: its row and its stored file (admins: anyone's).

    Refused (409) while a queued or running job trains or evaluates on it; finished
    jobs keep their results, and retrying one then fails at submission.
    """
    parse_query(NoQuery)
    freed = deletion.delete_upload(upload_id)
    return jsonify({"id": upload_id, "deleted": True, "freed_bytes": freed})


def search_columns(
    columns: list[dict[str, Any]], q: str, limit: int
) -> tuple[int, list[dict[str, Any]]]:
    """(how many match, the first `limit`): exact name, then prefix, then substring."""
    needle = q.casefold()
    ranked = []
    for index, column in enumerate(columns):
        name = str(column["name"]).casefold()
        if needle not in name:
            continue
        rank = 0 if name == needle else 1 if name.startswith(needle) else 2
        ranked.append((rank, index, column))
    ranked.sort(key=lambda item: item[:2])
    return len(ranked), [column for _rank, _index, column in ranked[:limit]]


@bp.get("/<int:upload_id>/columns")
@operation(tag="uploads", query=UploadColumnsQuery, ok={200: schemas.UploadColumns}, errors=(404,))
def search_upload_columns(upload_id: int) -> ResponseReturnValue:
    """Search an upload's columns by name (the submit form's search-as-you-type).

    An upload may have 10,000 columns: pages show a few and look the rest up here.
    """
    query = parse_query(UploadColumnsQuery)
    upload = find_visible_upload(upload_id)
    if upload is None:
        raise ApiError(
            404, "not_found", f"upload {upload_id} does not exist", {"upload_id": "no such upload"}
        )
    total, found = search_columns(list(upload.columns), query.q, query.limit)
    columns = [{k: c[k] for k in ("name", "numeric", "distinct")} for c in found]
    return jsonify({"upload_id": upload.id, "total": total, "columns": columns})
