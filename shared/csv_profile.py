"""Reading an uploaded CSV's shape: header, row count and which columns are numeric.

The server profiles a file once at upload (to check a `csv` dataset spec at
submission); the worker's loader applies the same rules, so both agree on which
columns are features and how many classes a target has:

- the first row is the header: non-empty, unique column names;
- every row has as many fields as the header;
- a column is numeric when every value in it parses as a finite float
  (a blank cell makes a column non-numeric: there is no silent imputation);
- class labels are the distinct raw strings of the target column.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

from shared.dataset_catalog import MAX_CSV_CLASSES, ColumnInfo

MAX_COLUMNS = 10_000


class CsvProblem(ValueError):
    pass


def parse_float(value: str) -> float | None:
    """The float in a cell, or None when the cell is not a finite number."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class CsvProfile:
    rows: int
    columns: tuple[ColumnInfo, ...]


def read_rows(lines: Iterable[str]) -> tuple[list[str], Iterable[list[str]]]:
    """Header and an iterator over the data rows; raises CsvProblem on a bad header."""
    reader = csv.reader(lines)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise CsvProblem("the file is empty") from None
    except csv.Error as exc:
        raise CsvProblem(f"not a CSV file: {exc}") from None
    if len(header) > MAX_COLUMNS:
        raise CsvProblem(f"{len(header)} columns; at most {MAX_COLUMNS}")
    if any(not name for name in header):
        raise CsvProblem("every column in the header needs a name")
    if len(set(header)) != len(header):
        raise CsvProblem("column names in the header must be unique")
    return header, reader


def profile_csv(text: str) -> CsvProfile:
    header, reader = read_rows(io.StringIO(text, newline=""))
    numeric = [True] * len(header)
    distinct: list[set[str]] = [set() for _ in header]
    rows = 0
    try:
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise CsvProblem(
                    f"line {line_no} has {len(row)} fields, the header has {len(header)}"
                )
            rows += 1
            for i, value in enumerate(row):
                if numeric[i] and parse_float(value) is None:
                    numeric[i] = False
                if len(distinct[i]) <= MAX_CSV_CLASSES:
                    distinct[i].add(value)
    except csv.Error as exc:
        raise CsvProblem(f"line {reader.line_num}: {exc}") from None  # type: ignore[attr-defined]
    if rows == 0:
        raise CsvProblem("the file has a header but no rows")
    columns = tuple(ColumnInfo(name, numeric[i], len(distinct[i])) for i, name in enumerate(header))
    return CsvProfile(rows=rows, columns=columns)
