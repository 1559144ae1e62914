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
from array import array
from bisect import bisect_left
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


class DistinctValues:
    """One column's distinct strings, up to MAX_CSV_CLASSES + 1, kept as 64-bit hashes.

    A sorted array of hashes (8 bytes each) and the code of each (2 bytes: the order the
    values were first seen) instead of a set of strings: a wide file with few rows has
    almost every cell distinct, and a set of the strings held many times the file. Two
    distinct strings sharing a 64-bit hash (odds about 1 in 10^13 for a full column)
    would count as one. Hashes are per process (str hashing is salted): a profile and
    the file written from it must come from the same process.
    """

    __slots__ = ("codes", "hashes", "overflowed")

    def __init__(self) -> None:
        self.hashes = array("q")
        self.codes = array("H")
        self.overflowed = False

    def __len__(self) -> int:
        return MAX_CSV_CLASSES + 1 if self.overflowed else len(self.hashes)

    def code(self, value: str) -> tuple[int, bool]:
        """(the value's code, whether it is new); (-1, False) once past the cap."""
        if self.overflowed:
            return -1, False
        h = hash(value)
        i = bisect_left(self.hashes, h)
        if i < len(self.hashes) and self.hashes[i] == h:
            return self.codes[i], False
        code = len(self.hashes)
        if code >= MAX_CSV_CLASSES + 1:
            self.overflowed = True
            self.hashes, self.codes = array("q"), array("H")  # give the memory back
            return -1, False
        self.hashes.insert(i, h)
        self.codes.insert(i, code)
        return code, True


@dataclass(frozen=True)
class CsvProfile:
    rows: int
    columns: tuple[ColumnInfo, ...]
    # Per column: the 0-based data row of its first empty cell, or None.
    first_missing: tuple[int | None, ...] = ()


def profile_records(header: list[str], records: Iterable[tuple[int, list[str]]]) -> CsvProfile:
    """Scan the records once, keeping only per-column counters (uploads can be large).

    Memory does not grow with the number of rows, nor with the length of the values:
    per column a few counters and at most MAX_CSV_CLASSES + 1 hashes (DistinctValues).
    """
    width = len(header)
    numeric = [True] * width
    missing = [0] * width
    first_missing: list[int | None] = [None] * width
    distinct = [DistinctValues() for _ in header]
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
            distinct[i].code(value)
        rows += 1
    if rows == 0:
        raise CsvProblem("the file has a header but no rows")
    columns = tuple(
        ColumnInfo(name, numeric[i], len(distinct[i]), missing[i]) for i, name in enumerate(header)
    )
    return CsvProfile(rows, columns, tuple(first_missing))


def profile_lines(lines: Iterable[str]) -> CsvProfile:
    """Profile a CSV read line by line (a text file opened with newline="")."""
    header, records = read_records(lines)
    return profile_records(header, records)


def profile_csv(text: str) -> CsvProfile:
    """Profile a CSV held in memory (small files; uploads stream through profile_lines)."""
    return profile_lines(io.StringIO(text, newline=""))
