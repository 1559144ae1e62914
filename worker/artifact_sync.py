"""An attempt's files, from this host's disk to the artifact store (shared/artifact_store.py).

Training writes checkpoints locally (worker/training/checkpoint.py: a temp file, fsync,
rename) and the job log is appended locally (worker/job_log.py); with a bucket as the
store, `AttemptSync` uploads them from a background thread every few seconds, and
`flush` uploads what is left before the runner records the attempt's outcome, so a job
recorded as succeeded has its checkpoints in the store. A checkpoint is snapshotted
with a hard link before its upload: the writer replaces `last.pt` by rename, never in
place, so the linked inode stays the complete file however long the upload takes.

With a local directory as the store the worker writes in place and there is nothing to
upload: every method here does nothing.

Resume and evaluation go the other way: `fetch_resume_checkpoint` downloads the newest
`last.pt` an earlier attempt uploaded (objects exist only once their upload completed,
so a half-uploaded checkpoint is never picked), `fetch_resume_dir` the newest earlier
attempt's whole directory (a script job's, whose files have names of its own), and
`fetch_checkpoint_dir` a finished job's checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

from shared.artifact_store import ArtifactStore, attempt_prefix, log_key, upload_key
from shared.job_files import TMP_SUFFIX, UPLOAD_SUFFIXES, job_dir, log_path, upload_file
from shared.settings import Settings

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 2.0
CHECKPOINT_NAMES = ("last.pt", "best.pt")


class StoreUnavailable(Exception):
    """The artifact store could not be read or written: an infrastructure failure
    (worker/failures.py), retried on another attempt, never the job's own fault."""


@contextlib.contextmanager
def store_errors(what: str):  # type: ignore[no-untyped-def]
    try:
        yield
    except StoreUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore's errors have no common base here
        raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc


class AttemptSync:
    """Uploads `directory` (one attempt's files) and the job log while the attempt runs."""

    def __init__(
        self,
        store: ArtifactStore,
        settings: Settings,
        job_id: int,
        attempt: int,
        interval_s: float = SYNC_INTERVAL_S,
    ):
        self.store, self.interval_s = store, interval_s
        self.directory = job_dir(settings, job_id) / f"attempt-{attempt}"
        self.prefix = attempt_prefix(job_id, attempt)
        self.log_file, self.log_key = log_path(settings, job_id), log_key(job_id)
        self._sent: dict[Path, tuple[int, int]] = {}
        self._lock = threading.Lock()  # one upload pass at a time: thread or flush
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.flushed = False  # the last flush uploaded everything the attempt wrote

    @property
    def active(self) -> bool:
        return not self.store.is_local

    def __enter__(self) -> AttemptSync:
        if self.active:
            self._thread = threading.Thread(target=self._run, name="artifact-sync", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.upload_changed()
                self._failures = 0
            except Exception:  # noqa: BLE001 - retried next pass; flush reports for real
                self._failures += 1
                if self._failures == 1:
                    log.warning("uploading %s failed; retrying", self.prefix, exc_info=True)

    def upload_changed(self) -> int:
        """Upload every file of the attempt (and the log) changed since its last upload;
        how many were uploaded. Raises what the store raises."""
        if not self.active:
            return 0
        with self._lock:
            # The log first: whenever a checkpoint is in the store, so is the log up to
            # it (a host killed between the two would otherwise leave a checkpoint to
            # resume from and no record of the attempt that wrote it).
            sent = self._upload_if_changed(self.log_file, self.log_key)
            for path in sorted(self._files()):
                sent += self._upload_if_changed(
                    path, f"{self.prefix}/{path.relative_to(self.directory).as_posix()}"
                )
            return sent

    def flush(self) -> None:
        """The last upload of the attempt, before its outcome is recorded: raises if the
        store cannot be written, so the outcome is not recorded without its files."""
        with store_errors(f"uploading {self.prefix} to {self.store.url}"):
            self.upload_changed()
        self.flushed = True

    def drop_local_copy(self) -> None:
        """With a bucket: remove this host's copy of the attempt's files once all of
        them are in the store, so a worker host's disk does not fill with every job it
        ever ran (a later attempt or evaluation downloads what it needs)."""
        if self.active and self.flushed:
            shutil.rmtree(self.directory, ignore_errors=True)

    def upload_log(self) -> None:
        """The log alone (the runner's final line, written after the outcome)."""
        if self.active:
            with self._lock:
                self._upload_if_changed(self.log_file, self.log_key)

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return [
            p for p in self.directory.rglob("*")
            if p.is_file() and not p.is_symlink() and not p.name.endswith(TMP_SUFFIX)
        ]  # fmt: skip

    def _upload_if_changed(self, path: Path, key: str) -> int:
        try:
            st = path.stat()
        except FileNotFoundError:
            return 0
        stamp = (st.st_size, st.st_mtime_ns)
        if self._sent.get(path) == stamp:
            return 0
        with _snapshot(path) as copy:
            self.store.put_file(copy, key)
        self._sent[path] = stamp
        return 1


@contextlib.contextmanager
def _snapshot(path: Path):  # type: ignore[no-untyped-def]
    """A stable copy of `path` to upload: a hard link where the file is replaced by
    rename (checkpoints), a byte copy where it grows in place (the log)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.upload{TMP_SUFFIX}")
    try:
        if path.suffix == ".log":
            shutil.copyfile(path, tmp)
        else:
            os.link(path, tmp)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def upload_log(store: ArtifactStore, settings: Settings, job_id: int) -> None:
    """The job's log alone, after a line written outside an attempt (a killed child)."""
    if not store.is_local:
        with store_errors(f"uploading job {job_id}'s log to {store.url}"):
            store.put_file(log_path(settings, job_id), log_key(job_id))


def fetch_log(store: ArtifactStore, settings: Settings, job_id: int) -> None:
    """Bring the job's log from the store before an attempt appends to it: the earlier
    attempts may have run on another host. A longer local copy (this host's, with lines
    a killed attempt never uploaded) is kept."""
    if store.is_local:
        return
    local = log_path(settings, job_id)
    stored = store.size(log_key(job_id))
    here = local.stat().st_size if local.is_file() else -1
    if stored is not None and stored > here:
        store.get_file(log_key(job_id), local)


def fetch_resume_checkpoint(
    store: ArtifactStore, settings: Settings, job_id: int, attempt: int
) -> Path | None:
    """The newest `last.pt` an earlier attempt of this job left, on this host's disk.

    Locally: the file itself. With a bucket: downloaded from the newest earlier attempt
    that uploaded one (with its best.pt), whichever host wrote it."""
    with store_errors(f"downloading a checkpoint of job {job_id} from {store.url}"):
        return _fetch_resume_checkpoint(store, settings, job_id, attempt)


def _fetch_resume_checkpoint(
    store: ArtifactStore, settings: Settings, job_id: int, attempt: int
) -> Path | None:
    for earlier in range(attempt - 1, 0, -1):
        directory = job_dir(settings, job_id) / f"attempt-{earlier}"
        if store.is_local:
            if (directory / "last.pt").is_file():
                return directory / "last.pt"
            continue
        if store.get_file(f"{attempt_prefix(job_id, earlier)}/last.pt", directory / "last.pt"):
            store.get_file(f"{attempt_prefix(job_id, earlier)}/best.pt", directory / "best.pt")
            return directory / "last.pt"
    return None


def fetch_resume_dir(
    store: ArtifactStore, settings: Settings, job_id: int, attempt: int
) -> Path | None:
    """The newest earlier attempt's directory that holds files, on this host's disk: what
    a script job resumes from (it names its own checkpoint files, so any file counts).

    Locally: the directory itself. With a bucket: that attempt's objects, downloaded
    (objects exist only once uploaded whole, so none is half a file)."""
    with store_errors(f"downloading the checkpoints of job {job_id} from {store.url}"):
        for earlier in range(attempt - 1, 0, -1):
            directory = job_dir(settings, job_id) / f"attempt-{earlier}"
            if store.is_local:
                if _has_files(directory):
                    return directory
                continue
            prefix = attempt_prefix(job_id, earlier)
            listed = store.list(prefix)
            if listed:
                for item in listed:
                    store.get_file(f"{prefix}/{item['path']}", directory / item["path"])
                return directory
    return None


def _has_files(directory: Path) -> bool:
    return directory.is_dir() and any(
        p.is_file() and not p.name.endswith(TMP_SUFFIX) for p in directory.rglob("*")
    )


def fetch_checkpoint_dir(
    store: ArtifactStore,
    settings: Settings,
    job_id: int,
    checkpoint_path: str,
    names: tuple[str, ...] = CHECKPOINT_NAMES,
) -> Path:
    """A finished job's checkpoint directory on this host (`checkpoint_path` as the job
    row holds it: a local directory or a store URL ending in attempt-<n>), with `names`
    downloaded into it from a bucket."""
    attempt_name = checkpoint_path.rstrip("/").rsplit("/", 1)[-1]
    local = job_dir(settings, job_id) / attempt_name
    if not store.is_local:
        with store_errors(f"downloading job {job_id}'s checkpoints from {store.url}"):
            for name in names:
                store.get_file(f"jobs/{int(job_id)}/{attempt_name}/{name}", local / name)
        return local
    return Path(checkpoint_path)


def checkpoint_location(store: ArtifactStore, directory: Path, job_id: int, attempt: int) -> str:
    """What Job.checkpoint_path records: the local directory, or its URL in the bucket."""
    return str(directory) if store.is_local else f"{store.url}/{attempt_prefix(job_id, attempt)}"


def fetch_upload(store: ArtifactStore, settings: Settings, upload_id: int) -> None:
    """An uploaded CSV on this host's disk (settings.uploads_dir), from the bucket if
    it is not here yet or differs in size."""
    if store.is_local:
        return
    with store_errors(f"downloading upload {upload_id} from {store.url}"):
        _fetch_upload(store, settings, upload_id)


def _fetch_upload(store: ArtifactStore, settings: Settings, upload_id: int) -> None:
    for storage_format in UPLOAD_SUFFIXES:
        key = upload_key(upload_id, storage_format)
        size = store.size(key)
        if size is None:
            continue
        local = upload_file(settings.uploads_dir, upload_id, storage_format)
        if not local.is_file() or local.stat().st_size != size:
            store.get_file(key, local)
        return
