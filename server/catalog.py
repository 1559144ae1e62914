"""The dataset/model catalogs as this server sees them: its data directory and uploads."""

from __future__ import annotations

from flask import current_app

from server.access import find_visible_upload
from shared.dataset_catalog import CatalogContext, ColumnInfo, UploadInfo
from shared.orm import Upload


def upload_info(upload: Upload) -> UploadInfo:
    return UploadInfo(
        id=upload.id,
        filename=upload.filename,
        rows=upload.rows,
        columns=tuple(
            ColumnInfo(c["name"], c["numeric"], c["distinct"], c.get("missing", 0))
            for c in upload.columns
        ),
    )


def _find_upload(upload_id: int) -> UploadInfo | None:
    # Another user's upload reads as missing: a job cannot train on data it may not see.
    upload = find_visible_upload(upload_id)
    return None if upload is None else upload_info(upload)


def catalog_context() -> CatalogContext:
    settings = current_app.config["TRAINYARD_SETTINGS"]
    return CatalogContext(
        data_dir=settings.resolved_data_dir,
        find_upload=_find_upload,
        max_file_bytes=settings.max_dataset_file_bytes,
    )
