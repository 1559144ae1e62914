"""Where a job's files live, and safe reads of them for the web API.

The worker writes under `job_dir` (checkpoints in `attempt-<n>/`, the job log in
`job.log`); the web lists, tails and serves them. Everything here takes paths or names
that may come straight from an HTTP request, so nothing may read outside the job's
directory or block on a huge file. Pure stdlib: the web imports this without torch.

Uploads live here too (`upload_file`): the web receives and stores them, the worker
reads them, and deleting an upload or a finished job's files goes through here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from shared.column_store import write_column_file
from shared.csv_profile import CsvProfile
from shared.settings import Settings

LOG_NAME = "job.log"
# In-progress atomic writes (worker/training/checkpoint.py): renamed into place when done.
TMP_SUFFIX = ".tmp"
DEFAULT_MAX_BYTES = 256_000

_DRIVE = re.compile(r"^[A-Za-z]:")


def job_dir(settings: Settings, job_id: int) -> Path:
    """The directory holding everything one job writes (all attempts)."""
    return settings.resolved_artifacts_dir / "jobs" / str(job_id)


def log_path(settings: Settings, job_id: int) -> Path:
    """The job's human-readable log, appended to by every attempt."""
    return job_dir(settings, job_id) / LOG_NAME


def _split_lines(data: bytes) -> list[str]:
    # Split on b"\n" only: str.splitlines would also break on \x0b, \x1c, U+2028...,
    # which a log line may well contain, and the line counts would no longer match.
    text = data.decode("utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


class ByteSource(Protocol):
    """A file that may be remote (shared/artifact_store.py): its size and byte ranges."""

    def size(self) -> int | None:
        """Its size in bytes; None when it does not exist."""
        ...

    def read(self, start: int, length: int) -> bytes:
        """At most `length` bytes from `start` (fewer at the end)."""
        ...


class FileSource:
    """A local file as a ByteSource."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def size(self) -> int | None:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return None

    def read(self, start: int, length: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            return b""


def _source(where: Path | ByteSource) -> ByteSource:
    return FileSource(where) if isinstance(where, (str, Path)) else where


def read_log_tail(
    where: Path | ByteSource, lines: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[str], int]:
    """The last `lines` lines of the file and the offset they end at (the file size).

    Reads at most `max_bytes` from the end, so the cost does not grow with the file; a
    first line cut by that window is dropped. A last line without its newline yet is
    included, as `tail` does. ([], 0) when the file does not exist.
    """
    source = _source(where)
    size = source.size()
    if size is None:
        return [], 0
    if lines <= 0 or max_bytes <= 0:
        return [], size
    start = max(0, size - max_bytes)
    # Bounded by the size seen above: a writer appending meanwhile cannot make this
    # read more than max_bytes.
    data = source.read(start, size - start)
    end = start + len(data)
    if start > 0:
        newline = data.find(b"\n")
        data = b"" if newline < 0 else data[newline + 1 :]
    return _split_lines(data)[-lines:], end


def read_log_from(
    where: Path | ByteSource, offset: int, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[str], int]:
    """The complete lines written at or after byte `offset`, and the offset to pass next.

    For following a live log: a last line still being written is left for the next
    call. An offset past the end means the file was truncated or replaced, so reading
    starts again from 0. A single line longer than `max_bytes` is returned in pieces
    rather than stalling the reader forever. ([], 0) when the file does not exist.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    source = _source(where)
    size = source.size()
    if size is None:
        return [], 0
    if offset > size:
        offset = 0
    data = source.read(offset, min(max_bytes, size - offset)) if size > offset else b""
    newline = data.rfind(b"\n")
    if newline >= 0:
        data = data[: newline + 1]
    elif len(data) < max_bytes:
        data = b""  # only a partial line so far
    return _split_lines(data), offset + len(data)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _iso_utc(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def list_artifacts(directory: Path) -> list[dict[str, Any]]:
    """Every regular file under `directory`, recursively, sorted by path:
    {"path": "attempt-1/best.pt", "size_bytes": ..., "modified_at": "...Z"}.

    Symlinks (to files or directories) are skipped, so a listing never reaches outside
    the directory, and so are `*.tmp` files, which are checkpoints still being written.
    [] when the directory does not exist.
    """
    root = Path(directory)
    if root.is_symlink() or not root.is_dir():
        return []
    found: list[dict[str, Any]] = []
    # os.walk does not descend into symlinked directories with followlinks=False.
    for parent, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                continue
            path = Path(parent, name)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue  # removed while listing (a tmp file renamed, a cleanup)
            if not stat.S_ISREG(st.st_mode):
                continue
            found.append(
                {
                    "path": path.relative_to(root).as_posix(),
                    "size_bytes": st.st_size,
                    "modified_at": _iso_utc(st.st_mtime),
                }
            )
    found.sort(key=lambda item: item["path"])
    return found


def resolve_artifact(directory: Path, name: str) -> Path | None:
    """The regular file `name` (a path as list_artifacts gives it) inside `directory`,
    or None: missing, not a regular file, a symlink anywhere along the way, a `*.tmp`
    file, or any name that is not a plain relative posix path ("..", ".", empty parts,
    absolute paths, backslashes, drive letters, NUL bytes). Only the canonical spelling
    of a name is accepted: "a/./b" and "a//b" are None even when "a/b" exists.
    """
    if not plain_relative_name(name):
        return None
    root = Path(directory)
    try:
        root_resolved = root.resolve(strict=True)
        candidate = root
        for part in name.split("/"):
            candidate = candidate / part
            # lstat, not stat: a symlink is refused whatever it points to, as
            # list_artifacts never lists one.
            st = candidate.lstat()
            if stat.S_ISLNK(st.st_mode):
                return None
        if not stat.S_ISREG(st.st_mode):
            return None
        resolved = candidate.resolve(strict=True)
    except (OSError, ValueError):
        return None
    # Belt and braces after the checks above: whatever they missed, the real path
    # must still be inside the real directory.
    if resolved == root_resolved or not resolved.is_relative_to(root_resolved):
        return None
    return resolved


def plain_relative_name(name: object) -> bool:
    """A plain relative posix path: no '..', '.', empty parts, absolute paths,
    backslashes, drive letters, NUL bytes or `*.tmp` names."""
    if not isinstance(name, str) or not name:
        return False
    if "\x00" in name or "\\" in name or name.startswith("/") or _DRIVE.match(name):
        return False
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False
    return not name.endswith(TMP_SUFFIX)


# ---------------------------------------------------------------- uploads

# An upload's file name by storage format (uploads.storage_format): "csv" is the raw
# file as older versions kept it; "columns" is shared/column_store.py's compact form.
UPLOAD_SUFFIXES = {"csv": ".csv", "columns": ".cols"}
COPY_CHUNK = 1 << 20


def upload_file(uploads_dir: Path, upload_id: int, storage_format: str) -> Path:
    """Where an upload stored in `storage_format` lives."""
    return Path(uploads_dir) / f"{upload_id}{UPLOAD_SUFFIXES[storage_format]}"


def find_upload_file(uploads_dir: Path, upload_id: int) -> tuple[Path, str] | None:
    """The upload's file and its format, the compact form first; None when neither exists.

    The worker has no database: it asks the directory which form an upload is in.
    """
    for storage_format in ("columns", "csv"):
        path = upload_file(uploads_dir, upload_id, storage_format)
        if path.is_file():
            return path, storage_format
    return None


def _private_tmp(directory: Path, stem: str) -> tuple[int, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{stem}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), path


# A temporary upload file older than this was left by a process that died mid-upload.
STALE_TMP_SECONDS = 24 * 3600


def remove_stale_upload_tmp(uploads_dir: Path, now: float | None = None) -> int:
    """Remove temporary files a killed web process left in the uploads folder; how many."""
    cutoff = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    for path in Path(uploads_dir).glob(f".*{TMP_SUFFIX}"):
        try:
            if path.lstat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def receive_upload(stream: BinaryIO, uploads_dir: Path, max_bytes: int) -> tuple[Path, int]:
    """Copy a request body to a private temporary file in chunks: (its path, its size).

    Memory stays at one chunk whatever the size. More than `max_bytes` raises
    UploadTooLarge (the file is removed); the caller removes the file when done.
    """
    remove_stale_upload_tmp(uploads_dir)
    fd, path = _private_tmp(Path(uploads_dir), "incoming")
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := stream.read(COPY_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise UploadTooLarge(max_bytes)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size


class UploadTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"larger than {limit} bytes")
        self.limit = limit


def store_upload_columns(
    uploads_dir: Path, upload_id: int, csv_path: Path, profile: CsvProfile
) -> Path:
    """Write the compact form of a profiled CSV as the upload's file (atomically, 0600)."""
    final = upload_file(uploads_dir, upload_id, "columns")
    fd, tmp = _private_tmp(Path(uploads_dir), str(upload_id))
    try:
        with os.fdopen(fd, "wb") as out, open(csv_path, encoding="utf-8-sig", newline="") as f:
            write_column_file(f, profile, out)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def delete_upload_files(uploads_dir: Path, upload_id: int) -> int:
    """Remove every stored form of an upload; the bytes freed."""
    freed = 0
    for storage_format in UPLOAD_SUFFIXES:
        path = upload_file(uploads_dir, upload_id, storage_format)
        freed += _size(path)
        path.unlink(missing_ok=True)
    return freed


def delete_job_files(settings: Settings, job_id: int) -> int:
    """Remove a job's local directory (checkpoints, exports, its log); the bytes freed."""
    return delete_tree(job_dir(settings, job_id))


def delete_tree(root: Path) -> int:
    """Remove a directory; the bytes freed. Symlinks inside are unlinked, never
    followed, so nothing outside the directory goes."""
    if root.is_symlink():
        root.unlink()
        return 0
    if not root.is_dir():
        return 0
    freed = sum(item["size_bytes"] for item in list_artifacts(root))
    shutil.rmtree(root, ignore_errors=True)
    return freed
