"""CSV uploads for the `csv` dataset: POST /api/v1/uploads, GET /api/v1/uploads/{id}."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from server.access import find_visible_upload
from server.auth import api_user, authenticate_api_request
from server.database import get_session
from server.errors import ApiError
from server.serialize import iso
from shared.csv_profile import CsvProblem, profile_csv
from shared.models import Upload
from shared.settings import Settings

bp = Blueprint("uploads_v1", __name__, url_prefix="/api/v1/uploads")
bp.before_request(authenticate_api_request)


def upload_to_json(upload: Upload) -> dict[str, Any]:
    return {
        "id": upload.id,
        "filename": upload.filename,
        "size_bytes": upload.size_bytes,
        "rows": upload.rows,
        "columns": upload.columns,
        "created_at": iso(upload.created_at),
    }


def _read_upload() -> tuple[str, bytes]:
    """(filename, bytes) from a multipart `file` field or a raw text/csv body."""
    if request.mimetype == "multipart/form-data":
        file = request.files.get("file")
        if file is None:
            raise ApiError(
                400,
                "missing_file",
                "no file in the request",
                {"file": "send the CSV as the form field 'file'"},
            )
        return file.filename or "upload.csv", file.read()
    if request.mimetype in ("text/csv", "text/plain", "application/octet-stream"):
        return request.args.get("filename", "upload.csv"), request.get_data()
    raise ApiError(
        415, "unsupported_media_type", "send multipart/form-data with a 'file' field, or a text/csv body",
        {"file": f"unsupported content type {request.mimetype or 'none'!r}"},
    )  # fmt: skip


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@bp.post("")
def create_upload() -> ResponseReturnValue:
    settings: Settings = current_app.config["TRAINYARD_SETTINGS"]
    request.max_content_length = settings.max_upload_bytes
    filename, data = _read_upload()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError(
            422, "invalid_csv", "the file is not UTF-8 text", {"file": "must be UTF-8 encoded CSV"}
        ) from None
    try:
        profile = profile_csv(text)
    except CsvProblem as exc:
        raise ApiError(
            422, "invalid_csv", f"not a usable CSV file: {exc}", {"file": str(exc)}
        ) from None

    session = get_session()
    upload = Upload(
        owner_id=api_user().id,
        filename=os.path.basename(filename)[:255] or "upload.csv",
        size_bytes=len(data),
        rows=profile.rows,
        columns=[
            {"name": c.name, "numeric": c.numeric, "distinct": c.distinct} for c in profile.columns
        ],
    )
    session.add(upload)
    session.flush()  # the id names the file
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    path = settings.uploads_dir / f"{upload.id}.csv"
    try:
        _write_atomically(path, data)
        session.commit()
    except BaseException:
        session.rollback()
        path.unlink(missing_ok=True)
        raise
    return jsonify(upload_to_json(upload)), 201, {"Location": f"/api/v1/uploads/{upload.id}"}


@bp.get("/<int:upload_id>")
def get_upload(upload_id: int) -> ResponseReturnValue:
    upload = find_visible_upload(upload_id)
    if upload is None:
        raise ApiError(
            404, "not_found", f"upload {upload_id} does not exist", {"upload_id": "no such upload"}
        )
    return jsonify(upload_to_json(upload))
