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
    # Per column: the sorted distinct values when there are at most MAX_CSV_CLASSES
    # (a classification target's labels), else None.
    labels: tuple[tuple[str, ...] | None, ...] = ()
    # Per column: the 0-based data row of its first empty cell, or None.
    first_missing: tuple[int | None, ...] = ()


def profile_records(header: list[str], records: Iterable[tuple[int, list[str]]]) -> CsvProfile:
    """Scan the records once, keeping only per-column counters (uploads can be large).

    Memory does not grow with the number of rows: at most MAX_CSV_CLASSES + 1 distinct
    values are kept per column, and a column's set is dropped once it has more.
    """
    width = len(header)
    numeric = [True] * width
    missing = [0] * width
    first_missing: list[int | None] = [None] * width
    distinct: list[set[str] | None] = [set() for _ in header]
    overflowed = [False] * width
    rows = 0
    for _line, values in records:
        for i, value in enumerate(values):
            if not value:
                if first_missing[i] is None:
                    first_missing[i] = rows
                missing[i] += 1
                continue
            if numeric[i] and not parses_as_number(value):
                numeric[i] = False
            seen = distinct[i]
            if seen is not None:
                seen.add(value)
                if len(seen) > MAX_CSV_CLASSES:
                    distinct[i] = None
                    overflowed[i] = True
        rows += 1
    if rows == 0:
        raise CsvProblem("the file has a header but no rows")
    counts = [MAX_CSV_CLASSES + 1 if overflowed[i] else len(distinct[i] or ()) for i in range(width)]
    columns = tuple(
        ColumnInfo(name, numeric[i], counts[i], missing[i]) for i, name in enumerate(header)
    )
    labels = tuple(None if seen is None else tuple(sorted(seen)) for seen in distinct)
    return CsvProfile(rows, columns, labels, tuple(first_missing))


def profile_lines(lines: Iterable[str]) -> CsvProfile:
    """Profile a CSV read line by line (a text file opened with newline="")."""
    header, records = read_records(lines)
    return profile_records(header, records)


def profile_csv(text: str) -> CsvProfile:
    """Profile a CSV held in memory (small files; uploads stream through profile_lines)."""
    return profile_lines(io.StringIO(text, newline=""))
