"""Datasets as fixed train/val/test splits of tensors already on the device.

The splits do not depend on the job's seed: every job on a dataset is scored on the
same test samples, and two jobs with the same val_fraction validate on the same
samples, so their metrics are comparable. mnist, fashion_mnist and cifar10 keep their
official test split; the others hold out TEST_FRACTION (stratified for classification),
exactly the size the catalog reports at submission.

Loading and splitting happen once per process (per dataset, params and val_fraction):
the raw arrays are cached, later jobs only copy them to the device and normalize.
Files: MNIST-like IDX and CIFAR-10 batches under DataPaths.data_dir, uploaded CSV files
under DataPaths.uploads_dir (the compact column form of shared/column_store.py, or a raw
CSV stored before it). A CSV column is numeric when every non-empty value (whitespace
stripped) parses with Python's float(); the server's upload scan uses the same rule;
shared/csv_profile.py states all of them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel
from sklearn.model_selection import train_test_split

from shared.dataset_catalog import (
    DATASETS,
    DEFAULT_MAX_DATASET_FILE_BYTES,
    CatalogContext,
    CsvParams,
    DatasetInfo,
    resolve_dataset,
)
from shared.job_files import find_upload_file
from shared.schema_base import CatalogError
from worker.training.data import csv_table, readers, synthetic
from worker.training.data.augment import augment_batch  # re-exported: the data API in one place
from worker.training.data.preprocess import apply_stats, check_stats, compute_stats
from worker.training.errors import DatasetError, UserError

__all__ = ["DataPaths", "Split", "Splits", "augment_batch", "clear_cache", "load_dataset"]

log = logging.getLogger(__name__)

# Fixed seeds for the splits; changing either changes every stored metric's meaning.
TEST_SPLIT_SEED = 20261128
VAL_SPLIT_SEED = 1128

SPLIT_NAMES = ("train", "val", "test")
NORMALIZE_METHODS = ("none", "scale", "standardize")

FILE_DATASETS = frozenset({"mnist", "fashion_mnist", "cifar10", "csv"})
# Raw pixel range of each image dataset (stored as uint8 0..PIXEL_MAX): "scale" divides by it.
PIXEL_MAX = {"digits": 16.0, "mnist": 255.0, "fashion_mnist": 255.0, "cifar10": 255.0,
             "synthetic_images": 255.0}  # fmt: skip


@dataclass(frozen=True)
class DataPaths:
    data_dir: Path  # TRAINYARD_DATA_DIR: mnist/, fashion_mnist/, cifar-10-batches-py/
    uploads_dir: Path  # uploads as <upload_id>.cols (or .csv when stored before 0008)
    # TRAINYARD_MAX_DATASET_FILE_BYTES: no dataset file is read past this.
    max_file_bytes: int = DEFAULT_MAX_DATASET_FILE_BYTES

    def catalog_context(self) -> CatalogContext:
        return CatalogContext(data_dir=self.data_dir, max_file_bytes=self.max_file_bytes)


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # float32 (N, *input_shape), or int64 tokens (N, seq_len)
    y: torch.Tensor  # int64 class indices, or float32 targets for regression; (N,)

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class Splits:
    info: DatasetInfo  # as resolve_dataset gives it, with the sizes filled in
    train: Split
    val: Split
    test: Split
    # The normalization applied to all three splits (see data/preprocess.py); CPU
    # tensors for a checkpoint, so evaluation can apply the same transform. Empty: none.
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)


# ---------------------------------------------------------------- raw data

# A dataset's samples before any split: (x, y) or, with an official test split,
# (train_x, train_y, test_x, test_y).
Raw = tuple[np.ndarray, ...]


def _sklearn(loader_name: str) -> Callable[[BaseModel, DataPaths | None], Raw]:
    def load(_params: BaseModel, _paths: DataPaths | None) -> Raw:
        import sklearn.datasets

        x, y = getattr(sklearn.datasets, loader_name)(return_X_y=True)
        return x.astype(np.float32), y.astype(np.int64)

    return load


def _digits(_params: BaseModel, _paths: DataPaths | None) -> Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixels are counts 0..16: exact as uint8, a quarter of the bytes to move to the device.
    return bunch.images.astype(np.uint8).reshape(-1, 1, 8, 8), bunch.target.astype(np.int64)


def _need(paths: DataPaths | None, name: str) -> DataPaths:
    if paths is None:
        raise UserError(f"dataset {name!r} is read from files, but no data paths were given")
    return paths


def _idx(name: str) -> Callable[[BaseModel, DataPaths | None], Raw]:
    def load(_params: BaseModel, paths: DataPaths | None) -> Raw:
        found = _need(paths, name)
        return readers.load_idx_dataset(found.data_dir / name, found.max_file_bytes)

    return load


def _cifar10(_params: BaseModel, paths: DataPaths | None) -> Raw:
    found = _need(paths, "cifar10")
    return readers.load_cifar10(found.data_dir, found.max_file_bytes)


_LOADERS: dict[str, Callable[[Any, DataPaths | None], Raw]] = {
    "digits": _digits,
    "iris": _sklearn("load_iris"),
    "wine": _sklearn("load_wine"),
    "breast_cancer": _sklearn("load_breast_cancer"),
    "synthetic_images": lambda p, _paths: synthetic.synthetic_images(p),
    "synthetic_regression": lambda p, _paths: synthetic.synthetic_regression(p),
    "synthetic_sequences": lambda p, _paths: synthetic.synthetic_sequences(p),
    "mnist": _idx("mnist"),
    "fashion_mnist": _idx("fashion_mnist"),
    "cifar10": _cifar10,
    # csv is loaded by _load_csv: its info comes from the file itself.
}


def _upload_path(params: CsvParams, paths: DataPaths) -> Path:
    found = find_upload_file(paths.uploads_dir, params.upload_id)
    return found[0] if found else paths.uploads_dir / f"{params.upload_id}.csv"


def _files(name: str, params: BaseModel, paths: DataPaths | None) -> list[Path]:
    """The files a dataset is read from, for the cache key."""
    if paths is None or name not in FILE_DATASETS:
        return []
    if name in ("mnist", "fashion_mnist"):
        directory = paths.data_dir / name
        return sorted(directory.glob("*-ubyte*")) if directory.is_dir() else []
    if name == "cifar10":
        return readers.cifar_files(paths.data_dir)
    if name == "csv":
        return [_upload_path(params, paths)]  # type: ignore[arg-type]
    return []


def _fingerprint(files: list[Path]) -> tuple[tuple[str, int, int], ...]:
    # Replaced files (another download, a test's new tmp dir) must not hit a stale cache.
    out = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _resolve(name: str, params: BaseModel, ctx: CatalogContext) -> DatasetInfo:
    try:
        return resolve_dataset(name, params, ctx)
    except CatalogError as exc:
        # The server checked this at submission; this worker sees other files.
        error = DatasetError if exc.field == "dataset.name" else UserError
        raise error(f"{exc.field}: {exc.message}") from None


# ---------------------------------------------------------------- splitting


def _can_stratify(y: np.ndarray, test_size: int) -> bool:
    """Whether sklearn can stratify: every class twice, room for each class on both sides."""
    counts = np.bincount(y)
    classes = int((counts > 0).sum())
    return int(counts[counts > 0].min()) >= 2 and classes <= test_size <= len(y) - classes


def _split(
    y: np.ndarray, test_size: int, classification: bool, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (keep, held_out) row indices; `test_size` rows held out."""
    index = np.arange(len(y))
    stratify = y if classification and _can_stratify(y, test_size) else None
    keep, held = train_test_split(index, test_size=test_size, stratify=stratify, random_state=seed)
    return np.sort(keep), np.sort(held)


@functools.lru_cache(maxsize=4)
def _numpy_splits(
    name: str, params_json: str, val_fraction: float, paths: DataPaths | None, _fingerprint: Any
) -> tuple[DatasetInfo, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Load and split once per process: later jobs on the same data skip both.

    Arrays are kept raw (uint8 pixels, compact tokens) and read-only; jobs copy them.
    """
    started = time.perf_counter()
    params = DATASETS[name].params.model_validate_json(params_json)
    if name == "csv":
        info, x, y = _load_csv(params, _need(paths, name))  # type: ignore[arg-type]
        raw: Raw = (x, y)
    else:
        # Bundled and generated datasets never look at files: any directory will do.
        ctx = (
            _need(paths, name).catalog_context()
            if name in FILE_DATASETS
            else CatalogContext(data_dir=Path())
        )
        info = _resolve(name, params, ctx)
        raw = _LOADERS[name](params, paths)
    classification = info.task == "classification"

    if len(raw) == 4:  # official test split
        rest_x, rest_y, test_x, test_y = raw
        info = replace(info, train_size=len(rest_y), test_size=len(test_y))
    else:
        x, y = raw
        if (
            info.test_size is None
            or info.train_size is None
            or len(y) != info.train_size + info.test_size
        ):
            raise RuntimeError(f"dataset {name!r}: {len(y)} samples, the catalog says {info}")
        rest, test = _split(y, info.test_size, classification, TEST_SPLIT_SEED)
        rest_x, rest_y, test_x, test_y = x[rest], y[rest], x[test], y[test]

    n_val = int(np.ceil(val_fraction * len(rest_y)))
    if not 0 < n_val < len(rest_y):
        raise UserError(f"val_fraction {val_fraction} leaves no training or no validation data")
    train, val = _split(rest_y, n_val, classification, VAL_SPLIT_SEED)
    if name == "csv":
        # Missing values are filled from the training rows only, like normalization.
        means = csv_table.column_means(rest_x[train])
        rest_x, test_x = (
            csv_table.fill_missing(rest_x, means),
            csv_table.fill_missing(test_x, means),
        )
    splits = {
        "train": (rest_x[train], rest_y[train]),
        "val": (rest_x[val], rest_y[val]),
        "test": (test_x, test_y),
    }
    for arrays in splits.values():
        for a in arrays:
            a.setflags(write=False)  # shared by every job in this process
    if tuple(splits["test"][0].shape[1:]) != info.input_shape:
        raise RuntimeError(
            f"dataset {name!r}: samples are {splits['test'][0].shape[1:]}, the catalog says {info.input_shape}"
        )
    sizes = {k: len(v[1]) for k, v in splits.items()}
    log.info("loaded %s in %.2fs: %s", name, time.perf_counter() - started, sizes)
    return info, splits


def _load_csv(params: CsvParams, paths: DataPaths) -> tuple[DatasetInfo, np.ndarray, np.ndarray]:
    with csv_table.open_upload(paths.uploads_dir, params.upload_id) as table:
        upload = csv_table.upload_info(params.upload_id, table)
        ctx = CatalogContext(data_dir=paths.data_dir, find_upload=lambda _id: upload)
        info = _resolve("csv", params, ctx)  # the server's checks, against the file as it is
        names = params.features or [
            c.name for c in upload.columns if c.numeric and c.name != params.target
        ]
        x = csv_table.feature_matrix(table, names)
        y = csv_table.target_vector(table, params.target, params.task)
    return info, x, y


# ---------------------------------------------------------------- public


def clear_cache() -> None:
    """Forget every loaded dataset (tests; a worker that wants its memory back)."""
    _numpy_splits.cache_clear()


def load_dataset(
    name: str,
    params: BaseModel | None,
    val_fraction: float,
    normalize: str,
    device: torch.device,
    stats: dict[str, torch.Tensor] | None = None,
    *,
    paths: DataPaths | None = None,
) -> Splits:
    """The dataset's fixed splits on `device`, normalized.

    `normalize` is "none", "scale" or "standardize" (the spec's resolved choice); its
    statistics come from the training split. Given `stats` (a source checkpoint's,
    possibly empty), those are applied instead and `normalize` is ignored.
    Problems with the data (missing or corrupt files, a bad upload) raise UserError.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    entry = DATASETS[name]
    params = entry.params() if params is None else params
    if normalize == "auto":  # same default as the spec's resolved_normalize
        normalize = {"image": "scale", "tabular": "standardize"}.get(entry.kind, "none")
    if normalize not in NORMALIZE_METHODS:
        raise ValueError(
            f"unknown normalization {normalize!r}; choose one of: {', '.join(NORMALIZE_METHODS)}"
        )
    # Only datasets read from files depend on the paths (and on the files' versions).
    key_paths = paths if name in FILE_DATASETS else None
    key_files = _fingerprint(_files(name, params, paths))
    info, arrays = _numpy_splits(
        name, params.model_dump_json(), float(val_fraction), key_paths, key_files
    )

    parts = {}
    for split, (x, y) in arrays.items():
        # torch.tensor copies (jobs never write into the cache) and sends the compact
        # raw dtype; widening to float32/int64 happens on the device.
        x_t = torch.tensor(x, device=device)
        y_t = torch.tensor(y, device=device)
        parts[split] = (x_t.long() if info.kind == "sequence" else x_t.float(), y_t)
    if stats is None:
        stats = compute_stats(parts["train"][0], info.kind, normalize, PIXEL_MAX.get(name))
    else:
        check_stats(stats, info.kind, info.input_shape)
    splits = {
        split: Split(x if info.kind == "sequence" else apply_stats(x, stats), y)
        for split, (x, y) in parts.items()
    }
    return Splits(info=info, stats=dict(stats), **splits)
