"""Reading an uploaded CSV file for training, by the rules in shared/csv_profile.py
(the same rules the server applied when the file was uploaded)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.csv_profile import CsvProblem, parses_as_number, read_records
from shared.dataset_catalog import MAX_CSV_CLASSES, ColumnInfo, UploadInfo
from worker.training.errors import UserError


@dataclass(frozen=True)
class CsvTable:
    header: tuple[str, ...]
    columns: tuple[tuple[str, ...], ...]  # column-major: columns[j][i] is row i, column j

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def index(self, name: str) -> int:
        return self.header.index(name)  # the first column of that name, like UploadInfo.column


def read_csv_table(path: Path) -> CsvTable:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            header, records = read_records(f)
            rows = [values for _line, values in records]
    except FileNotFoundError:
        raise UserError(f"the uploaded file {path} is missing") from None
    except (OSError, UnicodeDecodeError, CsvProblem) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    columns = (
        tuple(tuple(col) for col in zip(*rows, strict=True)) if rows else tuple(() for _ in header)
    )
    return CsvTable(tuple(header), columns)


def upload_info(upload_id: int, filename: str, table: CsvTable) -> UploadInfo:
    """What the server stored for an upload (shared.csv_profile), recomputed from the file."""
    columns = []
    for name, values in zip(table.header, table.columns, strict=True):
        present = [v for v in values if v]
        distinct: set[str] = set()
        for v in present:
            distinct.add(v)
            if len(distinct) > MAX_CSV_CLASSES:
                break
        numeric = all(parses_as_number(v) for v in present)
        columns.append(ColumnInfo(name, numeric, len(distinct), len(values) - len(present)))
    return UploadInfo(upload_id, filename, table.rows, tuple(columns))


def feature_matrix(table: CsvTable, names: list[str]) -> np.ndarray:
    """(rows, features) float32; missing and non-finite values are NaN (filled later)."""
    out = np.empty((table.rows, len(names)), dtype=np.float32)
    for j, name in enumerate(names):
        values = [float(v) if v else math.nan for v in table.columns[table.index(name)]]
        out[:, j] = values
    out[~np.isfinite(out)] = np.nan
    return out


def target_vector(table: CsvTable, name: str, task: str) -> np.ndarray:
    values = table.columns[table.index(name)]
    empty = next((i for i, v in enumerate(values) if not v), None)
    if empty is not None:
        raise UserError(f"target column {name!r} is empty in data row {empty + 1}")
    if task == "classification":
        classes = {label: i for i, label in enumerate(sorted(set(values)))}
        return np.array([classes[v] for v in values], dtype=np.int64)
    y = np.array([float(v) for v in values], dtype=np.float32)
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
