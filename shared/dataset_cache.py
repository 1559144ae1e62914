"""Standard-format dataset files from the artifact store, cached once per host.

With a bucket as the artifact store (shared/artifact_store.py), the files TRAINYARD_DATA_DIR
would hold can live in the bucket instead, under `datasets/` with the same layout:

    datasets/mnist/train-images-idx3-ubyte.gz ...
    datasets/fashion_mnist/...
    datasets/cifar-10-batches-py/data_batch_1 ...

`sync_dataset` copies a dataset's files into this host's TRAINYARD_DATA_DIR the first
time they are needed (the worker before loading, the web before validating a spec that
names the dataset), and again only when an object changed: each copy is checked against
the object's size and, for objects uploaded in one part, the MD5 the store reports as its
ETag, and what was copied is remembered in a small manifest beside the files. A dataset
the bucket does not hold is read from TRAINYARD_DATA_DIR as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from shared.artifact_store import ArtifactStore
from shared.dataset_catalog import CIFAR10_DIR

log = logging.getLogger(__name__)

PREFIX = "datasets"
# Which folder of TRAINYARD_DATA_DIR (and of the bucket's datasets/) each dataset reads.
DATASET_DIRS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": CIFAR10_DIR}
MANIFEST = ".trainyard-sync.json"
# The web checks the bucket at most this often per dataset (a LIST request), not on
# every submission.
RECHECK_S = 60.0

_checked: dict[tuple[str, str], float] = {}
_lock = threading.Lock()


class DatasetCopyError(Exception):
    """A copied file does not match the object it came from."""


def sync_dataset(store: ArtifactStore, data_dir: Path, name: str, recheck_s: float = 0.0) -> int:
    """Bring dataset `name`'s files from the bucket into `data_dir`; how many were copied.
    Nothing to do for a local store, a dataset without files, or one the bucket lacks.
    `recheck_s`: skip the bucket if this process checked it that recently."""
    folder = DATASET_DIRS.get(name)
    if folder is None or store.is_local:
        return 0
    key = (store.url, folder)
    with _lock:
        if recheck_s and time.monotonic() - _checked.get(key, -recheck_s) < recheck_s:
            return 0
        _checked[key] = time.monotonic()
    objects = store.list(f"{PREFIX}/{folder}", etags=True)
    if not objects:
        return 0
    local_dir = Path(data_dir) / folder
    manifest = _read_manifest(local_dir)
    copied = 0
    for item in objects:
        if "/" in item["path"]:
            continue  # the readers look at one folder level only
        local = local_dir / item["path"]
        version = {"size": item["size_bytes"], "etag": item.get("etag", "")}
        if manifest.get(item["path"]) == version and _size(local) == item["size_bytes"]:
            continue
        store.get_file(f"{PREFIX}/{folder}/{item['path']}", local)
        _check_copy(local, version)
        manifest[item["path"]] = version
        _write_manifest(local_dir, manifest)
        copied += 1
    if copied:
        log.info("dataset %s: copied %d file(s) from %s", name, copied, store.url)
    return copied


def _check_copy(local: Path, version: dict[str, object]) -> None:
    if _size(local) != version["size"]:
        local.unlink(missing_ok=True)
        raise DatasetCopyError(
            f"{local.name}: copied {_size(local)} bytes, expected {version['size']}"
        )
    etag = str(version["etag"])
    if etag and "-" not in etag and len(etag) == 32:
        digest = hashlib.md5(usedforsecurity=False)
        with open(local, "rb") as f:
            while data := f.read(1 << 20):
                digest.update(data)
        if digest.hexdigest() != etag:
            local.unlink(missing_ok=True)
            raise DatasetCopyError(f"{local.name}: copy does not match the object's MD5")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _read_manifest(directory: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((directory / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_manifest(directory: Path, manifest: dict[str, dict[str, object]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(manifest, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
