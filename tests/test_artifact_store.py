"""shared/artifact_store.py against a local directory and a real S3-compatible server
(moto's, on loopback: tests/s3_server.py), through the same calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from shared.artifact_store import ArtifactStore, LocalStore, S3Store, store_for
from shared.job_files import read_log_from, read_log_tail
from shared.settings import Settings
from tests.s3_server import new_bucket


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3Store(f"s3://{new_bucket(endpoint)}/some/prefix", endpoint)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_put_list_get_open_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    store.put_file(write(src / "last.pt", b"x" * 3000), "jobs/7/attempt-1/last.pt")
    store.put_file(write(src / "best.pt", b"best"), "jobs/7/attempt-1/best.pt")
    store.put_file(write(src / "job.log", b"one\ntwo\n"), "jobs/7/job.log")
    store.put_file(write(src / "other", b"other job"), "jobs/70/job.log")

    listed = store.list("jobs/7")
    assert [i["path"] for i in listed] == ["attempt-1/best.pt", "attempt-1/last.pt", "job.log"]
    assert [i["size_bytes"] for i in listed] == [4, 3000, 8]
    assert all(i["modified_at"].endswith("Z") for i in listed)
    assert store.size("jobs/7/attempt-1/last.pt") == 3000
    assert store.size("jobs/7/attempt-2/last.pt") is None

    got = tmp_path / "cache" / "last.pt"
    assert store.get_file("jobs/7/attempt-1/last.pt", got) and got.read_bytes() == b"x" * 3000
    assert not store.get_file("jobs/7/attempt-9/last.pt", tmp_path / "cache" / "none.pt")
    assert not (tmp_path / "cache" / "none.pt").exists()

    opened = store.open("jobs/7/attempt-1/best.pt")
    assert opened is not None and opened.size == 4 and b"".join(opened.chunks) == b"best"
    assert store.open("jobs/7/nope") is None

    assert store.find("jobs/7", "attempt-1/best.pt") == "jobs/7/attempt-1/best.pt"
    for bad in ("../70/job.log", "attempt-1/../job.log", "/jobs/7/job.log", "", "nope"):
        assert store.find("jobs/7", bad) is None, bad

    assert store.delete_prefix("jobs/7") == 3012
    assert store.list("jobs/7") == []
    assert [i["path"] for i in store.list("jobs/70")] == ["job.log"]  # a prefix, not a glob


def test_a_log_is_tailed_and_followed_by_byte_ranges(store: ArtifactStore, tmp_path: Path) -> None:
    lines = [f"line {i}" for i in range(200)]
    store.put_file(write(tmp_path / "log", ("\n".join(lines) + "\npartial").encode()), "j.log")
    tail, end = read_log_tail(store.source("j.log"), 3, max_bytes=100)
    assert tail == ["line 198", "line 199", "partial"] and end == store.size("j.log")
    got, offset = read_log_from(store.source("j.log"), 0, max_bytes=50)
    assert got == [f"line {i}" for i in range(7)]  # 7 bytes each: 7 fit in 50
    assert read_log_from(store.source("j.log"), offset, max_bytes=15)[0] == ["line 7", "line 8"]
    assert read_log_tail(store.source("missing.log"), 5) == ([], 0)
    assert read_log_from(store.source("missing.log"), 0) == ([], 0)


def test_an_interrupted_upload_is_never_listed_or_read(s3_endpoint: str) -> None:
    """A multipart upload that never completed (the worker died mid-upload) leaves no
    object: nothing lists it, so resume can never pick it."""
    store = S3Store(f"s3://{new_bucket(s3_endpoint)}", s3_endpoint)
    client = store._client
    started = client.create_multipart_upload(Bucket=store.bucket, Key="jobs/1/attempt-2/last.pt")
    client.upload_part(
        Bucket=store.bucket, Key="jobs/1/attempt-2/last.pt", PartNumber=1,
        UploadId=started["UploadId"], Body=b"half a checkpoint",
    )  # fmt: skip
    assert store.list("jobs/1") == []
    assert store.size("jobs/1/attempt-2/last.pt") is None
    assert store.open("jobs/1/attempt-2/last.pt") is None


def test_a_presigned_url_downloads_the_object_as_an_attachment(
    s3_endpoint: str, tmp_path: Path
) -> None:
    store = S3Store(f"s3://{new_bucket(s3_endpoint)}/p", s3_endpoint)
    store.put_file(write(tmp_path / "f", b"weights"), "jobs/3/attempt-1/best.pt")
    url = store.presigned_url("jobs/3/attempt-1/best.pt", "job-3-best.pt", 60)
    assert url is not None
    got = requests.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"weights"
    assert 'filename="job-3-best.pt"' in got.headers["Content-Disposition"]
    assert LocalStore(tmp_path).presigned_url("f", "f", 60) is None


def test_the_settings_pick_the_store(settings: Settings, tmp_path: Path) -> None:
    assert isinstance(store_for(settings), LocalStore)
    local = Settings(home=tmp_path, artifacts_url=str(tmp_path / "elsewhere"))
    assert local.resolved_artifacts_dir == (tmp_path / "elsewhere").resolve()
    bucket = Settings(home=tmp_path, artifacts_url="s3://b/p", s3_endpoint_url="http://127.0.0.1:1")
    store = store_for(bucket)
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("b", "p")
    # The worker's local copy stays under home.
    assert bucket.resolved_artifacts_dir == (tmp_path / "artifacts").resolve()
    for bad in ("s3://", "http://example.com/x", "gs://bucket"):
        with pytest.raises(ValueError, match="TRAINYARD_ARTIFACTS_URL"):
            Settings(home=tmp_path, artifacts_url=bad)
