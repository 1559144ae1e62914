"""The compact typed form an uploaded CSV is stored in ("columns" storage format).

An upload is parsed once, in the web process, by the rules in shared/csv_profile.py,
and stored as one file, `<upload_id>.cols`, that the worker trains from without parsing
text again. Parsing streams: one pass profiles the columns (shared/csv_profile.py's
`profile_records`), a second writes the values, a bounded number of rows at a time, at
offsets known from the first pass; neither holds the file or its rows in memory.

Layout (all integers little-endian):

    offset 0   8 bytes   magic b"TYCOLS01"
    offset 8   8 bytes   header length H (unsigned)
    offset 16  H bytes   header: UTF-8 JSON, padded with spaces to a multiple of 8
    then       the column arrays, each at the offset its header entry gives

The header is {"format": "columns-v1", "rows": N, "columns": [...]}, one entry per CSV
column in file order:

    {"name": "price", "numeric": true, "distinct": 37, "missing": 0,
     "first_missing_row": null,
     "values": {"offset": 4096, "dtype": "<f4"} | null,
     "codes": {"offset": 8192, "dtype": "<u2", "labels": ["a", "b"]} | null}

- `values`: N float32, for a numeric column only; an empty cell is NaN, a number beyond
  float32's range is +-infinity (what numpy's float32 cast of float() gives).
- `codes`: N uint16, for a column with at most MAX_CSV_CLASSES distinct values (the
  only ones a classification target may be): code i is `labels[i]`, labels being the
  sorted distinct strings; an empty cell is 65535.
- A column that is neither (text with many distinct values) stores no data: it can be
  neither a feature nor a target, and its profile stays in the header.
- `first_missing_row` is the 0-based data row of the first empty cell (null if none),
  so a target with a gap is reported by row without keeping the text.

Pure stdlib (array, json, os): the web process writes this without numpy.
"""

from __future__ import annotations

import array
import json
import math
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.csv_profile import CsvProfile, read_records

MAGIC = b"TYCOLS01"
FORMAT = "columns-v1"
EMPTY_CODE = 0xFFFF
# Rows are written in blocks of about this many cells: memory per block stays small
# whatever the width of the file.
CELLS_PER_BLOCK = 1 << 16
# float32's largest finite value plus half an ulp: anything at or beyond rounds to inf.
_F32_OVERFLOW = 3.4028235677973366e38
_HEADER_LIMIT = 1 << 30


class ColumnFileError(ValueError):
    pass


@dataclass(frozen=True)
class StoredColumn:
    name: str
    numeric: bool
    distinct: int
    missing: int
    first_missing_row: int | None
    values_offset: int | None
    codes_offset: int | None
    labels: tuple[str, ...] | None


@dataclass(frozen=True)
class ColumnFile:
    """A `.cols` file's header: what the worker needs to find any column's data."""

    path: Path
    rows: int
    columns: tuple[StoredColumn, ...]

    def column(self, name: str) -> StoredColumn:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)


def _as_float32(value: str) -> float:
    number = float(value)
    if abs(number) >= _F32_OVERFLOW:
        return math.copysign(math.inf, number)
    return number


def _layout(profile: CsvProfile) -> tuple[list[dict[str, Any]], int]:
    """Header entries with their data offsets (relative to the data start), and the data size."""
    entries: list[dict[str, Any]] = []
    offset = 0
    for column, labels, first_missing in zip(
        profile.columns, profile.labels, profile.first_missing, strict=True
    ):
        entry: dict[str, Any] = {
            "name": column.name,
            "numeric": column.numeric,
            "distinct": column.distinct,
            "missing": column.missing,
            "first_missing_row": first_missing,
            "values": None,
            "codes": None,
        }
        if column.numeric:
            entry["values"] = {"offset": offset, "dtype": "<f4"}
            offset += 4 * profile.rows
            offset += -offset % 8
        if labels is not None:
            entry["codes"] = {"offset": offset, "dtype": "<u2", "labels": list(labels)}
            offset += 2 * profile.rows
            offset += -offset % 8
        entries.append(entry)
    return entries, offset


def _header_bytes(entries: list[dict[str, Any]], rows: int, data_start: int) -> bytes:
    shifted = []
    for entry in entries:
        entry = dict(entry)
        for key in ("values", "codes"):
            if entry[key] is not None:
                entry[key] = {**entry[key], "offset": entry[key]["offset"] + data_start}
        shifted.append(entry)
    text = json.dumps({"format": FORMAT, "rows": rows, "columns": shifted}, ensure_ascii=False)
    return text.encode("utf-8")


def write_column_file(csv_lines: Iterable[str], profile: CsvProfile, out: BinaryIO) -> int:
    """Write the `.cols` form of a CSV already profiled from the same lines; its size.

    `csv_lines` is read a second time here (a text file opened with newline=""), and
    `out` must be a real file: the data are written with positioned writes.
    """
    entries, data_size = _layout(profile)
    # The header holds absolute offsets, so its length must be known first: offsets are
    # at most a few digits longer than the relative ones, so pad for the widest.
    relative = _header_bytes(entries, profile.rows, 0)
    data_start = 16 + len(relative) + 24 * 2 * len(entries)
    data_start += -data_start % 8
    header = _header_bytes(entries, profile.rows, data_start)
    if 16 + len(header) > data_start:
        raise AssertionError("header outgrew its reserved space")
    header += b" " * (data_start - 16 - len(header))
    fd = out.fileno()
    os.pwrite(fd, MAGIC + struct.pack("<Q", len(header)) + header, 0)
    os.ftruncate(fd, data_start + data_size)

    stored = [(i, e) for i, e in enumerate(entries) if e["values"] or e["codes"]]
    code_of = [
        {label: code for code, label in enumerate(e["codes"]["labels"])} if e["codes"] else None
        for e in entries
    ]
    block = max(1, CELLS_PER_BLOCK // max(1, len(entries)))
    _header, records = read_records(csv_lines)
    row = 0
    for values_block in _blocks(records, block):
        for i, entry in stored:
            cells = [values[i] for values in values_block]
            if entry["values"] is not None:
                floats = array.array("f", [_as_float32(v) if v else math.nan for v in cells])
                _pwrite_array(fd, floats, data_start + entry["values"]["offset"] + 4 * row)
            codes_map = code_of[i]
            if codes_map is not None:
                codes = array.array("H", [codes_map[v] if v else EMPTY_CODE for v in cells])
                _pwrite_array(fd, codes, data_start + entry["codes"]["offset"] + 2 * row)
        row += len(values_block)
    if row != profile.rows:
        raise ColumnFileError(f"the file changed while it was stored: {row} rows, then {profile.rows}")
    out.flush()
    os.fsync(fd)
    return data_start + data_size


def _pwrite_array(fd: int, values: array.array, offset: int) -> None:
    if values.itemsize * 8 != {"f": 32, "H": 16}[values.typecode]:
        raise AssertionError("array item size")  # platforms where C float/short differ
    data = values.tobytes() if sys.byteorder == "little" else _swapped(values)
    os.pwrite(fd, data, offset)


def _swapped(values: array.array) -> bytes:
    copy = array.array(values.typecode, values)
    copy.byteswap()
    return copy.tobytes()


def _blocks(records: Iterator[tuple[int, list[str]]], size: int) -> Iterator[list[list[str]]]:
    block: list[list[str]] = []
    for _line, values in records:
        block.append(values)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def read_column_file(path: Path) -> ColumnFile:
    """The header of a `.cols` file; ColumnFileError when it is not one."""
    with open(path, "rb") as f:
        start = f.read(16)
        if len(start) != 16 or start[:8] != MAGIC:
            raise ColumnFileError(f"{path.name} is not a trainyard column file")
        (length,) = struct.unpack("<Q", start[8:])
        size = os.fstat(f.fileno()).st_size
        if length > min(_HEADER_LIMIT, size - 16):
            raise ColumnFileError(f"{path.name}: header length {length} beyond the file")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except ValueError as exc:
            raise ColumnFileError(f"{path.name}: unreadable header ({exc})") from None
    if header.get("format") != FORMAT:
        raise ColumnFileError(f"{path.name}: unknown format {header.get('format')!r}")
    rows = int(header["rows"])
    columns = []
    for c in header["columns"]:
        values, codes = c.get("values"), c.get("codes")
        for part, width in ((values, 4), (codes, 2)):
            if part is not None and int(part["offset"]) + width * rows > size:
                raise ColumnFileError(f"{path.name}: column {c['name']!r} runs past the end")
        columns.append(
            StoredColumn(
                name=c["name"],
                numeric=bool(c["numeric"]),
                distinct=int(c["distinct"]),
                missing=int(c["missing"]),
                first_missing_row=c.get("first_missing_row"),
                values_offset=None if values is None else int(values["offset"]),
                codes_offset=None if codes is None else int(codes["offset"]),
                labels=None if codes is None else tuple(codes["labels"]),
            )
        )
    return ColumnFile(path=path, rows=rows, columns=tuple(columns))
