"""The dataset/model catalogs as this server sees them: its data directory and uploads."""

from __future__ import annotations

import logging

from flask import current_app

from server.access import find_visible_upload
from shared.artifact_store import ArtifactStoreError, store_for
from shared.dataset_cache import DATASET_DIRS, RECHECK_S, DatasetCopyError, sync_dataset
from shared.dataset_catalog import CatalogContext, UploadInfo, upload_info
from shared.settings import Settings

log = logging.getLogger(__name__)


def _sync_datasets(settings: Settings) -> None:
    """With a bucket: dataset files it holds, copied into this host's data directory
    (shared/dataset_cache.py), checked against the bucket at most once a minute."""
    store = store_for(settings)
    if store.is_local:
        return
    for name in DATASET_DIRS:
        try:
            sync_dataset(store, settings.resolved_data_dir, name, recheck_s=RECHECK_S)
        except (ArtifactStoreError, DatasetCopyError, OSError):
            log.warning("dataset %s: could not copy it from %s", name, store.url, exc_info=True)


def _find_upload(upload_id: int) -> UploadInfo | None:
    # Another user's upload reads as missing: a job cannot train on data it may not see.
    upload = find_visible_upload(upload_id)
    return None if upload is None else upload_info(upload)


def catalog_context() -> CatalogContext:
    settings = current_app.config["TRAINYARD_SETTINGS"]
    _sync_datasets(settings)
    return CatalogContext(
        data_dir=settings.resolved_data_dir,
        find_upload=_find_upload,
        max_file_bytes=settings.max_dataset_file_bytes,
    )
