"""Reading an upload for training: its stored columns, by the rules in
shared/csv_profile.py (the same rules the server applied when the file was uploaded).

Uploads are stored in the compact form of shared/column_store.py, so only the feature
and target columns are read, straight into float32/int arrays: memory is those arrays,
not the text. An upload stored before that form existed (storage_format "csv") is
converted to it first, streaming, into a temporary file: the same code path, the same
bounded memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shared.column_store import ColumnFile, ColumnFileError, read_column_file
from shared.csv_profile import CsvProblem, profile_lines
from shared.dataset_catalog import ColumnInfo, UploadInfo
from shared.job_files import find_upload_file, store_upload_columns
from worker.training.errors import UserError


@contextmanager
def open_upload(uploads_dir: Path, upload_id: int) -> Iterator[ColumnFile]:
    """The upload's stored columns, whichever form it was stored in."""
    found = find_upload_file(uploads_dir, upload_id)
    if found is None:
        raise UserError(f"upload {upload_id} is missing: no stored file (deleted?)")
    path, storage_format = found
    if storage_format == "columns":
        try:
            yield read_column_file(path)
        except (OSError, ColumnFileError) as exc:
            raise UserError(f"cannot read upload {upload_id}: {exc}") from None
        return
    with tempfile.TemporaryDirectory(prefix="trainyard-upload-") as tmp:
        yield convert_csv(path, Path(tmp), upload_id)


def convert_csv(path: Path, directory: Path, upload_id: int) -> ColumnFile:
    """Store a raw CSV upload in the compact form under `directory` (streaming, twice)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            profile = profile_lines(f)
        return read_column_file(store_upload_columns(directory, upload_id, path, profile))
    except FileNotFoundError:
        raise UserError(f"upload {upload_id} is missing: no stored file") from None
    except (OSError, UnicodeDecodeError, CsvProblem, ColumnFileError) as exc:
        raise UserError(f"cannot read upload {upload_id}: {exc}") from None


def upload_info(upload_id: int, table: ColumnFile) -> UploadInfo:
    """What the server stored for an upload (shared.csv_profile), from the file's header."""
    columns = tuple(ColumnInfo(c.name, c.numeric, c.distinct, c.missing) for c in table.columns)
    return UploadInfo(upload_id, table.path.name, table.rows, columns)


def _read(table: ColumnFile, offset: int, dtype: str) -> np.ndarray:
    data = np.fromfile(table.path, dtype=dtype, count=table.rows, offset=offset)
    if data.shape[0] != table.rows:
        raise UserError(f"upload file {table.path.name} is truncated")
    return data


def feature_matrix(table: ColumnFile, names: list[str]) -> np.ndarray:
    """(rows, features) float32; missing and non-finite values are NaN (filled later)."""
    out = np.empty((table.rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        column = table.column(name)
        if column.values_offset is None:
            raise UserError(f"feature column {name!r} is not numeric")
        out[:, j] = _read(table, column.values_offset, "<f4")
    out[~np.isfinite(out)] = np.nan
    return out


def target_vector(table: ColumnFile, name: str, task: str) -> np.ndarray:
    column = table.column(name)
    if column.first_missing_row is not None:
        raise UserError(
            f"target column {name!r} is empty in data row {column.first_missing_row + 1}"
        )
    if task == "classification":
        if column.codes_offset is None:
            raise UserError(f"target column {name!r} has too many distinct values to classify")
        try:
            labels = table.labels(name)
        except ColumnFileError as exc:
            raise UserError(f"cannot read upload file {table.path.name}: {exc}") from None
        # Codes count in the order values were first seen; classes are the sorted values.
        rank = np.empty(len(labels), dtype=np.int64)
        rank[sorted(range(len(labels)), key=labels.__getitem__)] = np.arange(len(labels))
        codes = _read(table, column.codes_offset, "<u2").astype(np.int64)
        if codes.size and codes.max() >= len(labels):
            raise UserError(f"upload file {table.path.name} is corrupt (column {name!r})")
        return rank[codes]
    if column.values_offset is None:
        raise UserError(f"target column {name!r} is not numeric")
    y = _read(table, column.values_offset, "<f4").astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise UserError(f"target column {name!r} is not a finite number in data row {bad[0] + 1}")
    return y


def column_means(x: np.ndarray) -> np.ndarray:
    """Each column's mean over its present (non-NaN) values; 0 for a column with none."""
    present = ~np.isnan(x)
    sums = np.where(present, x, 0).sum(axis=0, dtype=np.float64)
    counts = present.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)


def fill_missing(x: np.ndarray, means: np.ndarray) -> np.ndarray:
    """x with each NaN replaced by its column's entry in `means`."""
    missing = np.isnan(x)
    return np.where(missing, means[None, :], x) if missing.any() else x
