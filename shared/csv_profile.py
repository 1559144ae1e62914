"""The rules for reading an uploaded CSV, shared by the server and the worker.

The server profiles a file once at upload (to check a `csv` dataset spec at
submission) and the worker's loader (worker/training/data/csv_table.py) reads it by
the same rules, so both agree on which columns are features and how many classes a
target has:

- UTF-8 (a byte-order mark is ignored), read by Python's `csv` module (Excel
  dialect); the first record is the header: non-empty, unique column names.
- Blank lines are skipped and not counted. Every value and name is stripped of
  surrounding whitespace. A record shorter than the header has empty values for its
  missing trailing columns; a longer one is an error.
- A column is numeric when every non-empty value parses with `float()`.
- `distinct` counts distinct non-empty values (capped at MAX_CSV_CLASSES + 1);
  `missing` counts empty values. A target column must have none missing.
- Training (worker): a missing or non-finite feature value is filled with the
  column's mean over the training split; class labels are the sorted distinct
  target strings, numbered 0..K-1.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from shared.dataset_catalog import MAX_CSV_CLASSES, ColumnInfo

MAX_COLUMNS = 10_000


class CsvProblem(ValueError):
    pass


def parses_as_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_records(lines: Iterable[str]) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header, and (line number, stripped and padded values) for each data record."""
    reader = csv.reader(lines)
    try:
        header = next((r for r in reader if r), None)
    except csv.Error as exc:
        raise CsvProblem(f"not a CSV file: {exc}") from None
    if header is None:
        raise CsvProblem("the file is empty")
    header = [name.strip() for name in header]
    if len(header) > MAX_COLUMNS:
        raise CsvProblem(f"{len(header)} columns; at most {MAX_COLUMNS}")
    if any(not name for name in header):
        raise CsvProblem("every column in the header needs a name")
    if len(set(header)) != len(header):
        raise CsvProblem("column names in the header must be unique")
    width = len(header)

    def records() -> Iterator[tuple[int, list[str]]]:
        try:
            for record in reader:
                if not record:
                    continue
                if len(record) > width:
                    raise CsvProblem(
                        f"line {reader.line_num} has {len(record)} values, the header {width}"
                    )
                yield reader.line_num, [v.strip() for v in record] + [""] * (width - len(record))
        except csv.Error as exc:
            raise CsvProblem(f"line {reader.line_num}: {exc}") from None

    return header, records()


@dataclass(frozen=True)
class CsvProfile:
    rows: int
    columns: tuple[ColumnInfo, ...]


def profile_csv(text: str) -> CsvProfile:
    """Scan a file once, keeping only per-column counters (uploads can be large)."""
    header, records = read_records(io.StringIO(text, newline=""))
    numeric = [True] * len(header)
    missing = [0] * len(header)
    distinct: list[set[str]] = [set() for _ in header]
    rows = 0
    for _line, values in records:
        rows += 1
        for i, value in enumerate(values):
            if not value:
                missing[i] += 1
                continue
            if numeric[i] and not parses_as_number(value):
                numeric[i] = False
            if len(distinct[i]) <= MAX_CSV_CLASSES:
                distinct[i].add(value)
    if rows == 0:
        raise CsvProblem("the file has a header but no rows")
    columns = tuple(
        ColumnInfo(name, numeric[i], len(distinct[i]), missing[i]) for i, name in enumerate(header)
    )
    return CsvProfile(rows=rows, columns=columns)
