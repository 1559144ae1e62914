"""The one storage interface for job files and uploads: a local directory or an S3 bucket.

`TRAINYARD_ARTIFACTS_URL` picks it (shared/settings.py): a directory (the default,
`home`/artifacts) or `s3://bucket/prefix` on AWS, MinIO, Ceph or any S3-compatible
service (`TRAINYARD_S3_ENDPOINT_URL`). Keys are relative posix paths, the same in both:

    jobs/<id>/job.log                     the job's log, appended to by every attempt
    jobs/<id>/attempt-<n>/last.pt         an attempt's checkpoints and exported files
    uploads/<id>.cols                     an uploaded CSV in its compact form

Workers write locally first (worker/artifact_sync.py) and upload; the web lists, tails,
streams and deletes through here; resume downloads the newest complete checkpoint of an
earlier attempt. An S3 PUT (multipart included) is atomic: an object exists only once
its upload completed, so a listed checkpoint is never a half-written one, and nothing
here has to mark completeness separately.

boto3 rather than fsspec/s3fs: one synchronous client for every S3 service, with
presigned URLs, ranged GETs and multipart uploads built in, and no async event loop
inside Celery's prefork children or gunicorn's threads.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from shared import job_files
from shared.job_files import TMP_SUFFIX, ByteSource, FileSource
from shared.settings import Settings

CHUNK = 1 << 20
T = TypeVar("T")


class ArtifactStoreError(Exception):
    """The store could not be reached or refused a request (not a missing object,
    which each call answers as None/False): the web answers 503, a worker retries the
    attempt elsewhere (worker/artifact_sync.py)."""


def _store_call(method: Callable[..., T]) -> Callable[..., T]:
    """Turns botocore's errors (which share no base class worth catching) into
    ArtifactStoreError, naming the call."""

    @functools.wraps(method)
    def wrapper(self: S3Store, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except ArtifactStoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise ArtifactStoreError(
                f"{self.url}: {method.__name__} failed: {type(exc).__name__}: {exc}"
            ) from exc

    return wrapper


def job_prefix(job_id: int) -> str:
    return f"jobs/{int(job_id)}"


def attempt_prefix(job_id: int, attempt: int) -> str:
    return f"{job_prefix(job_id)}/attempt-{int(attempt)}"


def log_key(job_id: int) -> str:
    return f"{job_prefix(job_id)}/{job_files.LOG_NAME}"


def upload_key(upload_id: int, storage_format: str) -> str:
    return f"uploads/{int(upload_id)}{job_files.UPLOAD_SUFFIXES[storage_format]}"


BUNDLE_FORMATS = ("tar.gz", "zip")


def bundle_key(sha256: str, archive_format: str) -> str:
    """A code bundle's archive, once per content (every owner's row points here)."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    if archive_format not in BUNDLE_FORMATS:
        raise ValueError(f"not a bundle format: {archive_format!r}")
    return f"bundles/{sha256}.{archive_format}"


@dataclass(frozen=True)
class Download:
    """An object opened for reading: its size and its bytes in chunks."""

    size: int
    chunks: Iterator[bytes]


class ArtifactStore:
    """What web and workers do with stored files. Keys are trusted here: a name from a
    request goes through `find` (or `list`), which refuses anything but a plain
    relative path of a listed, complete file."""

    url: str  # for messages and Job.checkpoint_path

    def put_file(self, local: Path, key: str) -> None:
        raise NotImplementedError

    def get_file(self, key: str, local: Path) -> bool:
        """Copy the object to `local` (atomically: a temp file renamed); False if missing."""
        raise NotImplementedError

    def size(self, key: str) -> int | None:
        raise NotImplementedError

    def source(self, key: str) -> ByteSource:
        """The object as a ByteSource, for tailing a log (shared/job_files.py)."""
        raise NotImplementedError

    def list(self, prefix: str, etags: bool = False) -> list[dict[str, Any]]:
        """Every complete file under `prefix`, sorted: {"path" (relative to the prefix),
        "size_bytes", "modified_at"}, as shared/job_files.list_artifacts gives them;
        with `etags`, also each object's "etag" where the store has one."""
        raise NotImplementedError

    def find(self, prefix: str, name: str) -> str | None:
        """The key of `name` (from a request) under `prefix`, if it is a listed file."""
        if not job_files.plain_relative_name(name):
            return None
        listed = {item["path"] for item in self.list(prefix)}
        return f"{prefix}/{name}" if name in listed else None

    def open(self, key: str) -> Download | None:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Remove everything under `prefix`; the bytes freed."""
        raise NotImplementedError

    def delete(self, key: str) -> int:
        raise NotImplementedError

    def presigned_url(self, key: str, filename: str, seconds: int) -> str | None:
        """A short-lived URL that downloads the object as an attachment, or None where
        the store has none (a local directory)."""
        return None

    @property
    def is_local(self) -> bool:
        return False


class LocalStore(ArtifactStore):
    """A directory on this host (or on a mount every host shares)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    @property
    def is_local(self) -> bool:
        return True

    def path(self, key: str) -> Path:
        return self.root / key

    def put_file(self, local: Path, key: str) -> None:
        target = self.path(key)
        if Path(local).resolve() == target.resolve():
            return  # the worker wrote it in place
        _atomic_copy(Path(local), target)

    def get_file(self, key: str, local: Path) -> bool:
        source = self.path(key)
        if not source.is_file():
            return False
        if source.resolve() != Path(local).resolve():
            _atomic_copy(source, Path(local))
        return True

    def size(self, key: str) -> int | None:
        return FileSource(self.path(key)).size()

    def source(self, key: str) -> ByteSource:
        return FileSource(self.path(key))

    def list(self, prefix: str, etags: bool = False) -> list[dict[str, Any]]:
        return job_files.list_artifacts(self.path(prefix))

    def find(self, prefix: str, name: str) -> str | None:
        # resolve_artifact also refuses symlinks anywhere along the way.
        found = job_files.resolve_artifact(self.path(prefix), name)
        return None if found is None else f"{prefix}/{name}"

    def open(self, key: str) -> Download | None:
        path = self.path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError):
            return None
        size = os.fstat(f.fileno()).st_size

        def chunks() -> Iterator[bytes]:
            with f:
                while data := f.read(CHUNK):
                    yield data

        return Download(size, chunks())

    def delete_prefix(self, prefix: str) -> int:
        return job_files.delete_tree(self.path(prefix))

    def delete(self, key: str) -> int:
        path = self.path(key)
        size = FileSource(path).size() or 0
        path.unlink(missing_ok=True)
        return size


class S3Store(ArtifactStore):
    """A bucket (and key prefix) on an S3-compatible service."""

    def __init__(self, url: str, endpoint_url: str | None = None, client: Any = None):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.url = url.rstrip("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self._client = client if client is not None else _s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @_store_call
    def put_file(self, local: Path, key: str) -> None:
        # upload_file switches to a multipart upload for large files; either way the
        # object appears only when the whole upload completed.
        self._client.upload_file(str(local), self.bucket, self._key(key))

    @_store_call
    def get_file(self, key: str, local: Path) -> bool:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            self._client.download_file(self.bucket, self._key(key), str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            if _missing(exc):
                return False
            raise
        os.replace(tmp, local)
        return True

    @_store_call
    def size(self, key: str) -> int | None:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        return int(head["ContentLength"])

    def source(self, key: str) -> ByteSource:
        return _ObjectSource(self, key)

    @_store_call
    def read(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            got = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
        except Exception as exc:
            if _missing(exc) or _range_not_satisfiable(exc):
                return b""
            raise
        return bytes(got["Body"].read())

    @_store_call
    def list(self, prefix: str, etags: bool = False) -> list[dict[str, Any]]:
        base = self._key(prefix.rstrip("/")) + "/"
        found = []
        for page in self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base
        ):
            for item in page.get("Contents", []):
                name = item["Key"][len(base) :]
                if not job_files.plain_relative_name(name):
                    continue
                modified = item["LastModified"].astimezone(timezone.utc).replace(tzinfo=None)
                entry = {
                    "path": name,
                    "size_bytes": int(item["Size"]),
                    "modified_at": modified.isoformat(timespec="milliseconds") + "Z",
                }
                if etags:
                    # The object's version: the MD5 of its bytes unless it was uploaded
                    # in parts (then it ends in "-<parts>").
                    entry["etag"] = str(item.get("ETag", "")).strip('"')
                found.append(entry)
        found.sort(key=lambda item: item["path"])
        return found

    @_store_call
    def open(self, key: str) -> Download | None:
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            if _missing(exc):
                return None
            raise
        body = got["Body"]

        def chunks() -> Iterator[bytes]:
            with contextlib.closing(body):
                yield from body.iter_chunks(CHUNK)

        return Download(int(got["ContentLength"]), chunks())

    @_store_call
    def delete_prefix(self, prefix: str) -> int:
        items = self.list(prefix)
        keys = [{"Key": self._key(f"{prefix.rstrip('/')}/{i['path']}")} for i in items]
        for start in range(0, len(keys), 1000):  # the API's batch limit
            self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True}
            )
        return sum(i["size_bytes"] for i in items)

    @_store_call
    def delete(self, key: str) -> int:
        size = self.size(key) or 0
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return size

    @_store_call
    def presigned_url(self, key: str, filename: str, seconds: int) -> str | None:
        return str(
            self._client.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": self._key(key),
                    "ResponseContentDisposition": f'attachment; filename="{filename}"',
                },
                ExpiresIn=seconds,
            )
        )


class _ObjectSource:
    def __init__(self, store: S3Store, key: str):
        self.store, self.key = store, key

    def size(self) -> int | None:
        return self.store.size(self.key)

    def read(self, start: int, length: int) -> bytes:
        return self.store.read(self.key, start, length)


def store_for(settings: Settings) -> ArtifactStore:
    """The store `settings` name; one S3 client per process (boto3 clients are
    thread-safe, but must not cross a fork: Celery's prefork children make their own)."""
    if settings.artifacts_in_bucket:
        return _cached_s3(str(settings.artifacts_url), settings.s3_endpoint_url, os.getpid())
    return LocalStore(settings.resolved_artifacts_dir)


@lru_cache(maxsize=8)
def _cached_s3(url: str, endpoint_url: str | None, _pid: int) -> S3Store:
    return S3Store(url, endpoint_url)


def _s3_client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        # Path-style addressing works with MinIO and Ceph without DNS per bucket.
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _missing(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound")


def _range_not_satisfiable(exc: Exception) -> bool:
    return _error_code(exc) in ("416", "InvalidRange")


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while data := src.read(CHUNK):
                dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
