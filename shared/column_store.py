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

The header is {"format": "columns-v1", "rows": N, "columns": [...],
"labels": {"offset": L, "length": B}}, one column entry per CSV column in file order:

    {"name": "price", "numeric": true, "distinct": 37, "missing": 0,
     "first_missing_row": null,
     "values": {"offset": 4096, "dtype": "<f4"} | null,
     "codes": {"offset": 8192, "dtype": "<u2", "count": 3} | null}

- `values`: N float32, for a numeric column only; an empty cell is NaN, a number beyond
  float32's range is +-infinity (what numpy's float32 cast of float() gives).
- `codes`: N uint16, for a column with at most MAX_CSV_CLASSES distinct values (the
  only ones a classification target may be): code i is the i-th distinct value in the
  order first seen; an empty cell is 65535. Class numbers are the sorted order of the
  values (shared/csv_profile.py), which the reader works out from the labels.
- The labels: B bytes at offset L, one line per distinct value of each coded column in
  the order first seen, `<column index>\t<the value as a JSON string>\n`; so the k-th
  line of column j is its code k. They sit outside the header so that a reader loads
  the header (names and counts) and only the labels of the column it trains on.
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

from shared.csv_profile import CsvProfile, DistinctValues, read_records
from shared.dataset_catalog import MAX_CSV_CLASSES

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
    index: int
    name: str
    numeric: bool
    distinct: int
    missing: int
    first_missing_row: int | None
    values_offset: int | None
    codes_offset: int | None
    codes_count: int | None


@dataclass(frozen=True)
class ColumnFile:
    """A `.cols` file's header: what the worker needs to find any column's data."""

    path: Path
    rows: int
    columns: tuple[StoredColumn, ...]
    labels_offset: int
    labels_length: int

    def column(self, name: str) -> StoredColumn:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def labels(self, name: str) -> list[str]:
        """A coded column's distinct values in code order (the order first seen).

        Streams the labels region, decoding only this column's lines."""
        column = self.column(name)
        if column.codes_offset is None:
            raise ColumnFileError(f"column {name!r} has no codes")
        prefix = f"{column.index}\t".encode()
        found: list[str] = []
        with open(self.path, "rb") as f:
            f.seek(self.labels_offset)
            left = self.labels_length
            while left > 0:
                line = f.readline(min(left, 1 << 20) + 1)
                if not line:
                    break
                left -= len(line)
                if line.startswith(prefix):
                    found.append(json.loads(line[len(prefix) :]))
        if len(found) != column.codes_count:
            raise ColumnFileError(
                f"{self.path.name}: column {name!r} has {len(found)} labels, the header says "
                f"{column.codes_count}"
            )
        return found


def _as_float32(value: str) -> float:
    number = float(value)
    if abs(number) >= _F32_OVERFLOW:
        return math.copysign(math.inf, number)
    return number


def _layout(profile: CsvProfile, data_start: int) -> tuple[list[dict[str, Any]], int]:
    """Header entries with their data offsets, and where the data end."""
    entries: list[dict[str, Any]] = []
    offset = data_start
    for column, first_missing in zip(profile.columns, profile.first_missing, strict=True):
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
        if column.distinct <= MAX_CSV_CLASSES:
            entry["codes"] = {"offset": offset, "dtype": "<u2", "count": column.distinct}
            offset += 2 * profile.rows
            offset += -offset % 8
        entries.append(entry)
    return entries, offset


def _header(entries: list[dict[str, Any]], rows: int, labels: tuple[int, int]) -> bytes:
    body = {
        "format": FORMAT,
        "rows": rows,
        "columns": entries,
        "labels": {"offset": labels[0], "length": labels[1]},
    }
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def write_column_file(csv_lines: Iterable[str], profile: CsvProfile, out: BinaryIO) -> int:
    """Write the `.cols` form of a CSV already profiled from the same lines; its size.

    `csv_lines` is read a second time here (a text file opened with newline=""), and
    `out` must be a real file: the data are written with positioned writes, the header
    last (its labels' length is known only then).
    """
    # Offsets take at most 20 digits: lay out with the widest, so the header written at
    # the end fits the room left for it.
    widest = 10**19
    entries, _ = _layout(profile, widest)
    room = 16 + len(_header(entries, profile.rows, (widest, widest)))
    data_start = room + (-room % 8)
    entries, data_end = _layout(profile, data_start)
    fd = out.fileno()
    os.ftruncate(fd, data_end)

    stored = [(i, e) for i, e in enumerate(entries) if e["values"] or e["codes"]]
    distinct = {i: DistinctValues() for i, e in stored if e["codes"]}
    labels_at = data_end
    block = max(1, CELLS_PER_BLOCK // max(1, len(entries)))
    _names, records = read_records(csv_lines)
    row = 0
    for values_block in _blocks(records, block):
        new_labels: list[bytes] = []
        for i, entry in stored:
            cells = [values[i] for values in values_block]
            if entry["values"] is not None:
                floats = array.array("f", [_as_float32(v) if v else math.nan for v in cells])
                _pwrite_array(fd, floats, entry["values"]["offset"] + 4 * row)
            if entry["codes"] is not None:
                seen = distinct[i]
                codes = array.array("H")
                for v in cells:
                    if not v:
                        codes.append(EMPTY_CODE)
                        continue
                    code, new = seen.code(v)
                    if code < 0:
                        raise ColumnFileError("the file changed while it was stored")
                    codes.append(code)
                    if new:
                        new_labels.append(f"{i}\t{json.dumps(v)}\n".encode())
                _pwrite_array(fd, codes, entry["codes"]["offset"] + 2 * row)
        if new_labels:
            chunk = b"".join(new_labels)
            os.pwrite(fd, chunk, labels_at)
            labels_at += len(chunk)
        row += len(values_block)
    if row != profile.rows:
        raise ColumnFileError(
            f"the file changed while it was stored: {row} rows, then {profile.rows}"
        )
    header = _header(entries, profile.rows, (data_end, labels_at - data_end))
    if 16 + len(header) > data_start:
        raise AssertionError("header outgrew its reserved space")
    header += b" " * (data_start - 16 - len(header))
    os.pwrite(fd, MAGIC + struct.pack("<Q", len(header)) + header, 0)
    out.flush()
    os.fsync(fd)
    return labels_at


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
            rows = int(header["rows"])
            labels = header["labels"]
            labels_offset, labels_length = int(labels["offset"]), int(labels["length"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ColumnFileError(f"{path.name}: unreadable header ({exc})") from None
    if header.get("format") != FORMAT:
        raise ColumnFileError(f"{path.name}: unknown format {header.get('format')!r}")
    if labels_offset + labels_length > size:
        raise ColumnFileError(f"{path.name}: the labels run past the end")
    columns = []
    for index, c in enumerate(header["columns"]):
        values, codes = c.get("values"), c.get("codes")
        for part, width in ((values, 4), (codes, 2)):
            if part is not None and int(part["offset"]) + width * rows > size:
                raise ColumnFileError(f"{path.name}: column {c['name']!r} runs past the end")
        columns.append(
            StoredColumn(
                index=index,
                name=c["name"],
                numeric=bool(c["numeric"]),
                distinct=int(c["distinct"]),
                missing=int(c["missing"]),
                first_missing_row=c.get("first_missing_row"),
                values_offset=None if values is None else int(values["offset"]),
                codes_offset=None if codes is None else int(codes["offset"]),
                codes_count=None if codes is None else int(codes["count"]),
            )
        )
    return ColumnFile(path, rows, tuple(columns), labels_offset, labels_length)
