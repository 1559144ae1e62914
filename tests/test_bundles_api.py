"""Code bundles through the API (server/bundles_api.py), on both databases and on both
artifact stores (a local folder and a real S3-compatible server): who may upload,
content stored once, crafted archives refused naming the rule, ownership, deletion."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from shared import accounts
from shared.artifact_store import bundle_key, store_for
from shared.code_bundle import pack_directory, sha256_file
from shared.db import transaction
from shared.orm import CodeBundle
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.job_rows import add_jobs


@pytest.fixture(params=["local", "s3"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The settings with artifacts in a local folder, or in a fresh bucket."""
    if request.param == "s3":
        return request.getfixturevalue("s3_settings")  # type: ignore[no-any-return]
    return settings


def make_app(settings: Settings, **overrides: Any) -> Flask:
    from server.app import create_app

    return create_app(settings.model_copy(update=overrides), {"TESTING": True})


def grant(db_url: str, *usernames: str) -> None:
    with transaction(db_url) as session:
        for name in usernames:
            user = accounts.find_user(session, name)
            assert user is not None
            user.can_run_code = True


def project_bundle(tmp_path: Path, text: str = "print('hi')\n") -> bytes:
    root = tmp_path / f"proj-{abs(hash(text))}"
    (root / "pkg").mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(text)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "requirements.txt").write_text("numpy\n")
    out = tmp_path / f"{root.name}.tar.gz"
    return pack_directory(root, out, 10_000_000).path.read_bytes()


def post_bundle(client: Any, body: bytes, multipart: bool = False, name: str = "") -> Any:
    if multipart:
        return client.post(
            "/api/v1/bundles", data={"file": (io.BytesIO(body), name or "project.tar.gz")}
        )
    query = f"?filename={name}" if name else ""
    return client.post(f"/api/v1/bundles{query}", data=body, content_type="application/gzip")


def stored_bundles(settings: Settings) -> list[str]:
    return [item["path"] for item in store_for(settings).list("bundles")]


def rows(db_url: str) -> list[tuple[int | None, str]]:
    with transaction(db_url) as session:
        return [(b.owner_id, b.sha256) for b in session.query(CodeBundle).order_by(CodeBundle.id)]


def fields(resp: Any) -> dict[str, str]:
    return resp.get_json()["error"]["fields"]


# ---------------------------------------------------------------- who may upload


def test_a_member_without_the_permission_gets_403_naming_it(
    app: Flask, users: TestUsers, db_url: str, settings: Settings, tmp_path: Path
) -> None:
    body = project_bundle(tmp_path)
    refused = post_bundle(as_user(app, users.alice), body)
    assert refused.status_code == 403, refused.get_json()
    assert "can_run_code" in fields(refused)
    assert rows(db_url) == [] and stored_bundles(settings) == []
    grant(db_url, "alice")  # read from the database on the next request
    assert post_bundle(as_user(app, users.alice), body).status_code == 201
    # Admins may without a grant.
    assert post_bundle(as_user(app, users.admin), body).status_code == 201


# ---------------------------------------------------------------- stored once


def test_same_content_is_one_row_per_owner_and_one_object(
    store_settings: Settings, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    app = make_app(store_settings)
    grant(db_url, "alice", "bob")
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    body = project_bundle(tmp_path)
    sha = sha256_file(_write(tmp_path / "b.tar.gz", body))

    first = post_bundle(alice, body, name="my-project.tar.gz")
    assert first.status_code == 201, first.get_json()
    created = first.get_json()
    assert first.headers["Location"] == f"/api/v1/bundles/{created['id']}"
    assert created["sha256"] == sha and created["archive_format"] == "tar.gz"
    assert created["filename"] == "my-project.tar.gz" and created["size_bytes"] == len(body)
    assert created["python_files"] == ["pkg/__init__.py", "train.py"]
    assert created["has_requirements"] and created["file_count"] == 3

    again = post_bundle(alice, body, multipart=True)
    assert again.status_code == 200 and again.get_json() == created
    theirs = post_bundle(bob, body)
    assert theirs.status_code == 201 and theirs.get_json()["id"] != created["id"]
    assert rows(db_url) == [(users.alice.id, sha), (users.bob.id, sha)]
    assert stored_bundles(store_settings) == [f"{sha}.tar.gz"]

    found = alice.get(f"/api/v1/bundles?sha256={sha}").get_json()["bundles"]
    assert [b["id"] for b in found] == [created["id"]]
    assert "python_files" not in found[0]  # the list is a summary
    assert alice.get(f"/api/v1/bundles?sha256={'0' * 64}").get_json() == {"bundles": []}
    bad = alice.get("/api/v1/bundles?sha256=XYZ")
    assert bad.status_code == 400 and "sha256" in fields(bad)
    assert alice.get(f"/api/v1/bundles/{created['id']}").get_json() == created

    other = project_bundle(tmp_path, "print('changed')\n")
    changed = post_bundle(alice, other)
    assert changed.status_code == 201 and changed.get_json()["sha256"] != sha
    assert len(stored_bundles(store_settings)) == 2
    listed = alice.get("/api/v1/bundles").get_json()["bundles"]
    assert [b["id"] for b in listed] == [changed.get_json()["id"], created["id"]]


def _write(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path


def test_a_zip_bundle_is_taken_too(app: Flask, users: TestUsers, db_url: str) -> None:
    import zipfile

    grant(db_url, "alice")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("src/train.py", "print(1)\n")
    got = as_user(app, users.alice).post(
        "/api/v1/bundles", data=buf.getvalue(), content_type="application/zip"
    )
    assert got.status_code == 201, got.get_json()
    body = got.get_json()
    assert body["archive_format"] == "zip" and body["filename"] == "bundle.zip"
    assert body["python_files"] == ["src/train.py"] and not body["has_requirements"]


# ---------------------------------------------------------------- refused


def _tar_gz(*entries: tarfile.TarInfo | tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


def _device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    return info


def test_crafted_archives_are_refused_with_422_naming_the_reason(
    store_settings: Settings, users: TestUsers, db_url: str
) -> None:
    app = make_app(store_settings)
    grant(db_url, "alice")
    alice = as_user(app, users.alice)
    crafted = {
        "'..' component": _tar_gz(("train.py", b"x"), ("../../evil.py", b"x")),
        "absolute path": _tar_gz(("/etc/cron.d/evil", b"x")),
        "points outside the bundle": _tar_gz(("train.py", b"x"), _symlink("data", "/etc")),
        "only files, folders and links": _tar_gz(("train.py", b"x"), _device("dev/sda")),
        "not a .tar.gz or .zip archive": b"#!/bin/sh\nrm -rf /\n",
    }
    for reason, body in crafted.items():
        got = alice.post("/api/v1/bundles", data=body, content_type="application/octet-stream")
        assert got.status_code == 422, (reason, got.get_json())
        assert got.get_json()["error"]["code"] == "invalid_bundle"
        assert reason in fields(got)["file"], (reason, fields(got))
    assert rows(db_url) == [] and stored_bundles(store_settings) == []


def test_size_limits_413_naming_the_file_and_media_type_415(
    settings: Settings, users: TestUsers, db_url: str
) -> None:
    app = make_app(settings, max_bundle_bytes=4096, max_bundle_unpacked_bytes=10_000)
    grant(db_url, "alice")
    alice = as_user(app, users.alice)
    big = _tar_gz(("weights.bin", os.urandom(8000)))
    for multipart in (False, True):
        got = post_bundle(alice, big, multipart=multipart)
        assert got.status_code == 413, got.get_json()
        assert "4,096" in fields(got)["file"]
    bomb = _tar_gz(("zeros.bin", b"\0" * 20_000))
    assert len(bomb) < 4096
    got = post_bundle(alice, bomb)
    assert got.status_code == 422 and "unpacks to more than 10,000" in fields(got)["file"]
    csv = alice.post("/api/v1/bundles", data=b"a,b\n", content_type="text/csv")
    assert csv.status_code == 415 and "Content-Type" in fields(csv)
    empty_form = alice.post(
        "/api/v1/bundles", data={"other": "x"}, content_type="multipart/form-data"
    )
    assert empty_form.status_code == 400 and "file" in fields(empty_form)
    assert rows(db_url) == []


def test_the_bundle_quota_counts_new_content_only(
    settings: Settings, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    app = make_app(settings, max_bundles_per_user=1)
    grant(db_url, "alice")
    alice = as_user(app, users.alice)
    body = project_bundle(tmp_path)
    assert post_bundle(alice, body).status_code == 201
    assert post_bundle(alice, body).status_code == 200  # the same bundle: not a new one
    refused = post_bundle(alice, project_bundle(tmp_path, "print(2)\n"))
    assert refused.status_code == 409 and "max_bundles_per_user" in fields(refused)


# ---------------------------------------------------------------- ownership and deletion


def test_someone_elses_bundle_reads_as_missing(
    app: Flask, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    grant(db_url, "alice", "bob")
    alice, bob, admin = (as_user(app, u) for u in (users.alice, users.bob, users.admin))
    bundle_id = post_bundle(alice, project_bundle(tmp_path)).get_json()["id"]
    for method in (bob.get, bob.delete):
        got = method(f"/api/v1/bundles/{bundle_id}")
        assert got.status_code == 404 and "bundle_id" in fields(got)
    assert bob.get("/api/v1/bundles").get_json() == {"bundles": []}
    missing, hidden = bob.get("/api/v1/bundles/999999"), bob.get(f"/api/v1/bundles/{bundle_id}")
    assert missing.status_code == hidden.status_code == 404
    assert fields(missing) == fields(hidden)  # nothing says it exists
    assert admin.get(f"/api/v1/bundles/{bundle_id}").status_code == 200
    assert bob.get("/api/v1/bundles?all=true").status_code == 403
    everyone = admin.get("/api/v1/bundles?all=true").get_json()["bundles"]
    assert [b["id"] for b in everyone] == [bundle_id]


def test_delete_rules(
    store_settings: Settings, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    app = make_app(store_settings)
    grant(db_url, "alice", "bob")
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    body = project_bundle(tmp_path)
    mine = post_bundle(alice, body).get_json()
    theirs = post_bundle(bob, body).get_json()
    key = bundle_key(mine["sha256"], "tar.gz")
    spec = {"kind": "script", "bundle_id": mine["id"], "entry": "train.py"}
    queued, running = add_jobs(
        db_url,
        [
            {"owner": users.alice.id, "kind": "script", "spec": spec, "state": "queued"},
            {"owner": users.alice.id, "kind": "script", "spec": spec, "state": "running"},
        ],
    )
    in_use = alice.delete(f"/api/v1/bundles/{mine['id']}")
    assert in_use.status_code == 409, in_use.get_json()
    assert f"{queued}, {running}" in fields(in_use)["bundle_id"]
    with transaction(db_url) as session:
        from shared.orm import Job

        for job in session.query(Job):
            job.state = "succeeded" if job.id == running else "cancelled"

    # Bob's bundle has the same content: the object stays.
    deleted = alice.delete(f"/api/v1/bundles/{mine['id']}")
    assert deleted.status_code == 200, deleted.get_json()
    assert deleted.get_json() == {"id": mine["id"], "deleted": True, "freed_bytes": 0}
    assert alice.get(f"/api/v1/bundles/{mine['id']}").status_code == 404
    assert store_for(store_settings).size(key) == len(body)
    assert bob.get(f"/api/v1/bundles/{theirs['id']}").status_code == 200

    # The last one takes the object with it.
    last = bob.delete(f"/api/v1/bundles/{theirs['id']}")
    assert last.status_code == 200 and last.get_json()["freed_bytes"] == len(body)
    assert store_for(store_settings).size(key) is None
    assert rows(db_url) == [] and stored_bundles(store_settings) == []
    assert bob.delete(f"/api/v1/bundles/{theirs['id']}").status_code == 404


def test_uploading_again_puts_back_a_missing_object(
    app: Flask, settings: Settings, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    """A delete racing an upload of the same content could remove the object under a
    new row; the next upload of those bytes (the CLI's way to fix anything) restores it."""
    grant(db_url, "alice")
    alice = as_user(app, users.alice)
    body = project_bundle(tmp_path)
    created = post_bundle(alice, body).get_json()
    key = bundle_key(created["sha256"], "tar.gz")
    store_for(settings).delete(key)
    assert post_bundle(alice, body).status_code == 200
    assert store_for(settings).size(key) == len(body)


def test_a_bundle_larger_than_a_json_body_is_taken(
    app: Flask, settings: Settings, users: TestUsers, db_url: str
) -> None:
    """The app refuses bodies over TRAINYARD_MAX_BODY_BYTES (1 MB); a bundle's limit is
    its own, for a raw body and a multipart form alike."""
    assert settings.max_body_bytes < 3_000_000 < settings.max_bundle_bytes
    grant(db_url, "alice")
    alice = as_user(app, users.alice)
    body = _tar_gz(("weights.bin", os.urandom(3_000_000)))
    raw = post_bundle(alice, body)
    assert raw.status_code == 201, raw.get_json()
    assert raw.get_json()["size_bytes"] == len(body)
    form = post_bundle(alice, _tar_gz(("other.bin", os.urandom(3_000_000))), multipart=True)
    assert form.status_code == 201, form.get_json()
