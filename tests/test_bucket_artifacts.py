"""The web with its job files and uploads in an S3 bucket (a real S3-compatible server
on loopback, tests/s3_server.py): nothing on the web's disk, the same ownership rules,
attachment headers and deletion as with a local directory."""

from __future__ import annotations

from typing import Any

import pytest
import requests
from flask import Flask

from server.app import create_app
from shared.artifact_store import S3Store, job_prefix, store_for, upload_key
from shared.db import transaction, utcnow
from shared.orm import Job
from shared.settings import Settings
from tests.conftest import SQLITE_ONLY, TestUsers, as_user
from tests.helpers import train_spec
from tests.test_authorization import session_client
from tests.test_stored_things import CSV, upload


@pytest.fixture
def bucket_app(s3_settings: Settings) -> Flask:
    return create_app(s3_settings, {"TESTING": True})


def finished_job_in_bucket(client: Any, settings: Settings, tmp: Any) -> int:
    """A succeeded job whose files only the bucket holds (as a worker leaves them)."""
    job_id = client.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    store = store_for(settings)
    for name, data in (("attempt-1/best.pt", b"w" * 1000), ("job.log", b"epoch 1\nepoch 2\n")):
        local = tmp / name.replace("/", "_")
        local.write_bytes(data)
        store.put_file(local, f"{job_prefix(job_id)}/{name}")
    with transaction(settings.resolved_database_url) as s:
        row = s.get(Job, job_id)
        row.state, row.attempt, row.finished_at = "succeeded", 1, utcnow()
        row.checkpoint_path = f"{store.url}/{job_prefix(job_id)}/attempt-1"
    return job_id


def test_files_in_the_bucket_are_listed_tailed_and_streamed_to_their_owner_only(
    bucket_app: Flask, s3_settings: Settings, users: TestUsers, tmp_path: Any
) -> None:
    alice, bob = as_user(bucket_app, users.alice), as_user(bucket_app, users.bob)
    job_id = finished_job_in_bucket(alice, s3_settings, tmp_path)
    assert not s3_settings.resolved_artifacts_dir.joinpath("jobs").exists()  # nothing local

    listed = alice.get(f"/api/v1/jobs/{job_id}/artifacts").get_json()["artifacts"]
    assert [(a["path"], a["size_bytes"]) for a in listed] == [
        ("attempt-1/best.pt", 1000), ("job.log", 16),
    ]  # fmt: skip
    logs = alice.get(f"/api/v1/jobs/{job_id}/logs?tail=1").get_json()
    assert logs["lines"] == ["epoch 2"] and logs["size_bytes"] == 16

    got = alice.get(f"/api/v1/jobs/{job_id}/artifacts/attempt-1/best.pt")
    assert got.status_code == 200 and got.data == b"w" * 1000
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["Content-Disposition"].startswith('attachment; filename="best.pt"')
    assert got.headers["Content-Length"] == "1000"
    # Another member sees neither the job nor its files; names cannot escape the prefix.
    assert bob.get(f"/api/v1/jobs/{job_id}/artifacts/attempt-1/best.pt").status_code == 404
    assert bob.get(f"/api/v1/jobs/{job_id}/artifacts").status_code == 404
    for bad in ("../1/job.log", "attempt-1/../job.log", "nope.pt"):
        assert alice.get(f"/api/v1/jobs/{job_id}/artifacts/{bad}").status_code == 404, bad
    browser = session_client(bucket_app, s3_settings.resolved_database_url, users.alice)
    page = browser.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and b"best.pt" in page.data and b"epoch 2" in page.data

    # Deleting the files deletes the objects.
    assert alice.delete(f"/api/v1/jobs/{job_id}/artifacts").status_code == 200
    assert store_for(s3_settings).list(job_prefix(job_id)) == []
    gone = alice.get(f"/api/v1/jobs/{job_id}/artifacts/attempt-1/best.pt")
    assert gone.status_code == 410


def test_downloads_can_redirect_to_a_presigned_url(
    s3_settings: Settings, users: TestUsers, tmp_path: Any
) -> None:
    settings = s3_settings.model_copy(update={"s3_presign_seconds": 60})
    alice = as_user(create_app(settings, {"TESTING": True}), users.alice)
    job_id = finished_job_in_bucket(alice, settings, tmp_path)
    got = alice.get(f"/api/v1/jobs/{job_id}/artifacts/attempt-1/best.pt")
    assert got.status_code == 302
    fetched = requests.get(got.headers["Location"], timeout=10)
    assert fetched.status_code == 200 and fetched.content == b"w" * 1000
    assert 'filename="best.pt"' in fetched.headers["Content-Disposition"]


def test_an_upload_goes_to_the_bucket_and_its_delete_removes_it(
    bucket_app: Flask, s3_settings: Settings, users: TestUsers
) -> None:
    alice = as_user(bucket_app, users.alice)
    made = upload(alice, CSV)
    assert made.status_code == 201, made.get_json()
    upload_id = made.get_json()["id"]
    store = store_for(s3_settings)
    assert (store.size(upload_key(upload_id, "columns")) or 0) > 0
    assert not list(s3_settings.uploads_dir.glob(f"{upload_id}.*"))  # not kept locally
    assert alice.delete(f"/api/v1/uploads/{upload_id}").status_code in (200, 204)
    assert store.size(upload_key(upload_id, "columns")) is None


@SQLITE_ONLY
def test_an_unreachable_bucket_is_a_503_not_a_500(
    s3_settings: Settings, users: TestUsers, tmp_path: Any
) -> None:
    alice_ok = as_user(create_app(s3_settings, {"TESTING": True}), users.alice)
    job_id = finished_job_in_bucket(alice_ok, s3_settings, tmp_path)
    down = s3_settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:9"})
    alice = as_user(create_app(down, {"TESTING": True}), users.alice)
    got = alice.get(f"/api/v1/jobs/{job_id}/artifacts")
    assert got.status_code == 503 and got.headers["Retry-After"]
    assert got.get_json()["error"]["code"] == "storage_unavailable"
    # The job page still renders, without its files.
    app = create_app(down, {"TESTING": True})
    browser = session_client(app, down.resolved_database_url, users.alice)
    assert browser.get(f"/jobs/{job_id}").status_code == 200
    assert isinstance(store_for(down), S3Store)
