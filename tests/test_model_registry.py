"""The model registry (shared/model_registry.py, server/registry_api.py) on SQLite and
PostgreSQL: versions numbered per model and never shared by concurrent promotions, a
version's hash that of the file's bytes (computed here independently), one production
version per model with the history of both moves, owner-or-admin permissions, the job
checks (422 naming job_id), and deleting a pinned job's files refused."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from server.app import create_app
from shared import job_files
from shared import model_registry as registry
from shared.artifact_store import LocalStore, job_prefix, store_for
from shared.db import session_factory, transaction, utcnow
from shared.orm import Job, ModelStageEvent, ModelVersion, RegisteredModel
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.job_rows import add_jobs

API = "/api/v1/registry/models"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def finished_job(
    db_url: str,
    settings: Settings,
    owner: int,
    *,
    kind: str = "train",
    state: str = "succeeded",
    files: dict[str, bytes] | None = None,
    name: str | None = None,
) -> int:
    """A job row of `kind` with `files` in its checkpoint directory (attempt-1), as a
    worker leaves it; by default its model file holds a few random bytes."""
    if files is None:
        files = {registry.MODEL_FILE.get(kind, "best.pt"): os.urandom(300)}
    spec = None
    if kind not in ("train", "evaluate"):
        spec = {"kind": kind, "name": name, "tags": [], "source_job_id": 1}
    [job_id] = add_jobs(db_url, [{"owner": owner, "kind": kind, "state": state, "spec": spec,
                                  "name": name or f"{kind}-job"}])  # fmt: skip
    directory = job_files.job_dir(settings, job_id) / "attempt-1"
    directory.mkdir(parents=True)
    for file_name, data in files.items():
        (directory / file_name).write_bytes(data)
    with transaction(db_url) as s:
        s.get(Job, job_id).checkpoint_path = str(directory)
    return job_id


def model_bytes(settings: Settings, job_id: int, name: str) -> bytes:
    return (job_files.job_dir(settings, job_id) / "attempt-1" / name).read_bytes()


@pytest.fixture
def alice(app: Flask, users: TestUsers) -> FlaskClient:
    return as_user(app, users.alice)


@pytest.fixture
def bob(app: Flask, users: TestUsers) -> FlaskClient:
    return as_user(app, users.bob)


@pytest.fixture
def admin(app: Flask, users: TestUsers) -> FlaskClient:
    return as_user(app, users.admin)


def promote(client: FlaskClient, name: str, job_id: int, **body: Any) -> Any:
    return client.post(f"{API}/{name}/versions", json={"job_id": job_id, **body})


# ---------------------------------------------------------------- versions and hashes


def test_versions_are_numbered_and_pin_the_model_files_hash(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    # Over two MiB: the hash is streamed in the store's 1 MiB chunks.
    big = os.urandom(2 * (1 << 20) + 123)
    first = finished_job(db_url, settings, users.alice.id, files={"best.pt": big, "last.pt": b"x"})
    second = finished_job(db_url, settings, users.alice.id)

    made = promote(alice, "digits-cnn", first, description="baseline", stage="staging")
    assert made.status_code == 201, made.get_json()
    assert made.headers["Location"] == f"{API}/digits-cnn/versions/1"
    v1 = made.get_json()
    assert (v1["model"], v1["version"], v1["stage"], v1["job_id"]) == (
        "digits-cnn",
        1,
        "staging",
        first,
    )
    assert v1["sha256"] == sha(big) and v1["size_bytes"] == len(big)
    # A train job pins its best.pt only (last.pt is not the model).
    assert v1["files"] == [{"name": "best.pt", "sha256": sha(big), "size_bytes": len(big)}]
    assert (v1["created_by"], v1["job_kind"], v1["description"]) == ("alice", "train", "baseline")
    assert v1["history"] == [{"version": 1, "from_stage": None, "to_stage": "staging",
                              "user": "alice", "at": v1["created_at"], "note": "baseline"}]  # fmt: skip

    v2 = promote(alice, "digits-cnn", second).get_json()
    assert (v2["version"], v2["stage"]) == (2, "none")
    assert v2["sha256"] == sha(model_bytes(settings, second, "best.pt"))

    model = alice.get(f"{API}/digits-cnn").get_json()
    assert [v["version"] for v in model["versions"]] == [2, 1]
    assert (model["owner"], model["latest_version"], model["version_count"]) == ("alice", 2, 2)
    assert (model["production"], model["staging"]) == (None, [1])
    assert [(e["version"], e["to_stage"]) for e in model["history"]] == [
        (2, "none"),
        (1, "staging"),
    ]
    one = alice.get(f"{API}/digits-cnn/versions/1").get_json()
    assert one["sha256"] == sha(big) and len(one["history"]) == 1
    listed = alice.get(API).get_json()["models"]
    assert [(m["name"], m["latest_version"]) for m in listed] == [("digits-cnn", 2)]

    # The same job twice in one model is refused; under another name it is fine.
    again = promote(alice, "digits-cnn", first)
    assert again.status_code == 409 and again.get_json()["error"]["fields"] == {
        "job_id": f"job {first} is already version 1 of digits-cnn"
    }
    assert promote(alice, "digits-cnn-copy", first).get_json()["version"] == 1


def test_each_kind_pins_its_model_file_and_an_export_all_its_files(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    export_files = {
        "state_dict.pt": os.urandom(500),
        "model_card.json": b'{"tolerance": 0.0001}',
        "model.pt2": os.urandom(700),
        "model.onnx": os.urandom(600),
    }
    jobs = {
        "prune": finished_job(db_url, settings, users.alice.id, kind="prune"),
        "quantize": finished_job(db_url, settings, users.alice.id, kind="quantize"),
        "export": finished_job(db_url, settings, users.alice.id, kind="export", files=export_files),
    }
    for kind, job_id in jobs.items():
        got = promote(alice, f"m-{kind}", job_id)
        assert got.status_code == 201, got.get_json()
        version = got.get_json()
        assert version["job_kind"] == kind
        assert version["model_file"] == registry.MODEL_FILE[kind]
        assert version["sha256"] == sha(model_bytes(settings, job_id, version["model_file"]))
    export = alice.get(f"{API}/m-export/versions/1").get_json()
    # The model file first, then the rest by name; each hash the file's own.
    assert [f["name"] for f in export["files"]] == [
        "state_dict.pt", "model.onnx", "model.pt2", "model_card.json",
    ]  # fmt: skip
    for f in export["files"]:
        data = export_files[f["name"]]
        assert (f["sha256"], f["size_bytes"]) == (sha(data), len(data))
    assert registry.MODEL_FILE == {"train": "best.pt", "prune": "best.pt",
                                   "quantize": "model.pt", "export": "state_dict.pt"}  # fmt: skip


# ---------------------------------------------------------------- stages


def test_one_production_version_and_the_history_of_both_moves(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    for _ in range(3):
        promote(alice, "m", finished_job(db_url, settings, users.alice.id))
    up = alice.post(f"{API}/m/versions/1/stage", json={"stage": "production", "note": "v1 ok"})
    assert up.status_code == 200 and up.get_json()["stage"] == "production"
    # Version 3 straight to production at registration archives version 1 too.
    v4 = promote(alice, "m", finished_job(db_url, settings, users.alice.id), stage="production")
    assert v4.get_json()["version"] == 4
    moved = alice.post(f"{API}/m/versions/2/stage", json={"stage": "production"})
    assert moved.status_code == 200
    model = alice.get(f"{API}/m").get_json()
    stages = {v["version"]: v["stage"] for v in model["versions"]}
    assert stages == {1: "archived", 2: "production", 3: "none", 4: "archived"}
    assert model["production"] == 2
    moves = [(e["version"], e["from_stage"], e["to_stage"], e["user"], e["note"])
             for e in model["history"]]  # fmt: skip
    assert moves == [
        (2, "none", "production", "alice", None),
        (4, "production", "archived", "alice", "replaced in production by version 2"),
        (4, None, "production", "alice", None),
        (1, "production", "archived", "alice", "replaced in production by version 4"),
        (1, "none", "production", "alice", "v1 ok"),
        (3, None, "none", "alice", None),
        (2, None, "none", "alice", None),
        (1, None, "none", "alice", None),
    ]
    # The same stage again changes and records nothing; a bad stage names the field.
    same = alice.post(f"{API}/m/versions/2/stage", json={"stage": "production"})
    assert same.status_code == 200 and len(same.get_json()["history"]) == 2
    bad = alice.post(f"{API}/m/versions/2/stage", json={"stage": "live"})
    assert bad.status_code == 422 and "stage" in bad.get_json()["error"]["fields"]
    missing = alice.post(f"{API}/m/versions/9/stage", json={"stage": "staging"})
    assert missing.status_code == 404 and missing.get_json()["error"]["fields"] == {
        "version": "no such version"
    }
    with transaction(db_url) as s:
        assert s.query(ModelVersion).filter(ModelVersion.stage == "production").count() == 1


def test_resolve_and_verify_for_the_prediction_server(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    jobs = [finished_job(db_url, settings, users.alice.id) for _ in range(3)]
    for job_id, stage in zip(jobs, ("production", "staging", "staging"), strict=True):
        promote(alice, "served", job_id, stage=stage)
    store = store_for(settings)
    with transaction(db_url) as s:
        assert registry.resolve(s, "served", stage="production").version == 1
        assert registry.resolve(s, "served", stage="staging").version == 3  # the newest
        assert registry.resolve(s, "served", version=2).job_id == jobs[1]
        assert registry.resolve(s, "served", stage="archived") is None
        assert registry.resolve(s, "nothing", stage="production") is None
        with pytest.raises(ValueError):
            registry.resolve(s, "served", stage="production", version=1)
        v1 = registry.resolve(s, "served", stage="production")
        key = registry.file_key(s, v1)
        assert key == f"{job_prefix(jobs[0])}/attempt-1/best.pt"
        assert registry.verify_files(s, store, v1) == {}
    model_file = job_files.job_dir(settings, jobs[0]) / "attempt-1" / "best.pt"
    model_file.write_bytes(b"changed behind the registry's back")
    with transaction(db_url) as s:
        v1 = registry.resolve(s, "served", stage="production")
        problem = registry.verify_files(s, store, v1)["best.pt"]
        assert problem.startswith(f"sha256 {sha(model_file.read_bytes())}, registered ")


# ---------------------------------------------------------------- job checks


def test_a_job_that_cannot_be_registered_is_a_422_naming_job_id(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    me = users.alice.id
    failed = finished_job(db_url, settings, me, state="failed")
    running = finished_job(db_url, settings, me, state="running")
    [evaluate] = add_jobs(db_url, [{"owner": me, "kind": "evaluate", "source_job_id": None}])
    deleted = finished_job(db_url, settings, me)
    with transaction(db_url) as s:
        s.get(Job, deleted).artifacts_deleted_at = utcnow()
    no_file = finished_job(db_url, settings, me, files={"last.pt": b"only the last"})
    bobs = finished_job(db_url, settings, users.bob.id)
    cases = {
        failed: f"job {failed} is failed; only a succeeded job's model can be registered",
        running: f"job {running} is running; only a succeeded job's model can be registered",
        evaluate: f"job {evaluate} is an evaluate job; only train, prune, quantize and export "
        "jobs make a model",
        deleted: f"job {deleted}'s files, its model among them, were deleted",
        no_file: f"job {no_file} has no best.pt in its checkpoint directory, so no model to "
        "register",
        bobs: f"job {bobs} does not exist",  # someone else's reads as missing
        10**9: f"job {10**9} does not exist",
    }
    for job_id, message in cases.items():
        got = promote(alice, "refused", job_id)
        assert got.status_code == 422, (job_id, got.get_json())
        assert got.get_json()["error"] == {"code": "invalid_job", "fields": {"job_id": message},
                                           "message": "the job's model cannot be registered"}  # fmt: skip
    # Nothing was created by any of them.
    assert alice.get(f"{API}/refused").status_code == 404
    # The body and the name are checked too, each naming its field.
    for body, field in (({"job_id": "7"}, "job_id"), ({}, "job_id"),
                        ({"job_id": 1, "stage": "archived"}, "stage"),
                        ({"job_id": 1, "extra": 1}, "extra")):  # fmt: skip
        got = alice.post(f"{API}/m/versions", json=body)
        assert got.status_code == 422 and field in got.get_json()["error"]["fields"], body
    bad_name = promote(alice, "Bad_Name", failed)
    assert bad_name.status_code == 422 and set(bad_name.get_json()["error"]["fields"]) == {"name"}
    assert alice.get(f"{API}/Bad_Name").status_code == 404


# ---------------------------------------------------------------- permissions


def test_members_see_and_change_only_their_own_models_and_admins_all(
    alice: FlaskClient, bob: FlaskClient, admin: FlaskClient, settings: Settings,
    db_url: str, users: TestUsers,
) -> None:  # fmt: skip
    job = finished_job(db_url, settings, users.alice.id)
    assert promote(alice, "alices", job).status_code == 201

    # Bob: alice's model reads exactly like a missing one, and stays as it was.
    for path in (f"{API}/alices", f"{API}/alices/versions/1"):
        theirs, nothing = bob.get(path), bob.get(path.replace("alices", "nobodys"))
        assert theirs.status_code == nothing.status_code == 404
        assert json.dumps(theirs.get_json()).replace("alices", "X") == json.dumps(
            nothing.get_json()
        ).replace("nobodys", "X")
    staged = bob.post(f"{API}/alices/versions/1/stage", json={"stage": "production"})
    assert staged.status_code == 404
    # Names are global: bob cannot add versions under alice's name (with his own job).
    taken = promote(bob, "alices", finished_job(db_url, settings, users.bob.id))
    assert taken.status_code == 409 and set(taken.get_json()["error"]["fields"]) == {"name"}
    assert bob.get(API).get_json()["models"] == []
    assert bob.get(f"{API}?all=true").status_code == 403
    assert alice.get(f"{API}/alices/versions/1").get_json()["stage"] == "none"

    # The admin sees it (all=true lists it), moves it and adds a version, recorded as his.
    assert "alices" not in {m["name"] for m in admin.get(API).get_json()["models"]}
    assert "alices" in {m["name"] for m in admin.get(f"{API}?all=true").get_json()["models"]}
    moved = admin.post(f"{API}/alices/versions/1/stage", json={"stage": "staging"})
    assert moved.status_code == 200 and moved.get_json()["history"][0]["user"] == "root"
    other = promote(admin, "alices", finished_job(db_url, settings, users.bob.id))
    assert other.status_code == 201 and other.get_json()["created_by"] == "root"
    model = alice.get(f"{API}/alices").get_json()
    assert model["owner"] == "alice" and model["version_count"] == 2


# ---------------------------------------------------------------- deletion


def test_deleting_a_pinned_jobs_files_is_refused(
    alice: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    pinned = finished_job(db_url, settings, users.alice.id)
    free = finished_job(db_url, settings, users.alice.id)
    promote(alice, "keep", pinned)
    promote(alice, "keep", finished_job(db_url, settings, users.alice.id))
    promote(alice, "also", pinned, stage="production")
    refused = alice.delete(f"/api/v1/jobs/{pinned}/artifacts")
    assert refused.status_code == 409
    error = refused.get_json()["error"]
    assert error["code"] == "artifacts_pinned"
    assert error["fields"] == {
        "job_id": "pinned by model version(s) also version 1, keep version 1"
    }
    assert (job_files.job_dir(settings, pinned) / "attempt-1" / "best.pt").exists()
    with transaction(db_url) as s:
        assert s.get(Job, pinned).artifacts_deleted_at is None
    # An unpinned job's files go as before; archiving a version does not unpin it.
    assert alice.delete(f"/api/v1/jobs/{free}/artifacts").status_code == 200
    alice.post(f"{API}/also/versions/1/stage", json={"stage": "archived"})
    assert alice.delete(f"/api/v1/jobs/{pinned}/artifacts").status_code == 409


# ---------------------------------------------------------------- concurrency


def _in_threads(count: int, work: Any) -> list[Any]:
    """Run work(i) in `count` threads started together; results (or exceptions) by i."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_promotions_never_share_a_number(
    settings: Settings, db_url: str, users: TestUsers
) -> None:
    count = 6
    jobs = [finished_job(db_url, settings, users.alice.id) for _ in range(count)]
    store = LocalStore(settings.resolved_artifacts_dir)
    actor = registry.Actor(users.alice.id, False)

    def promote_one(i: int) -> int:
        with session_factory(db_url)() as session:
            # All into one new name: the model is created once, the losers retry.
            return registry.promote(session, store, actor, "raced", jobs[i]).version

    numbers = _in_threads(count, promote_one)
    assert sorted(numbers) == list(range(1, count + 1)), numbers
    with transaction(db_url) as s:
        assert s.query(RegisteredModel).count() == 1
        assert s.query(RegisteredModel).one().last_version == count

    def to_production(i: int) -> str:
        with session_factory(db_url)() as session:
            version = registry.resolve(session, "raced", version=i + 1)
            return registry.move_stage(session, version.id, "production", actor).stage

    assert _in_threads(count, to_production) == ["production"] * count
    with transaction(db_url) as s:
        stages = sorted(v.stage for v in s.query(ModelVersion))
        assert stages == ["archived"] * (count - 1) + ["production"]
        # Each move recorded once: count registrations, count promotions, count-1 archivings.
        events = [(e.from_stage, e.to_stage) for e in s.query(ModelStageEvent)]
        assert events.count(("production", "archived")) == count - 1
        assert events.count(("none", "production")) == count


# ---------------------------------------------------------------- a bucket


def test_files_in_a_bucket_are_hashed_through_the_store(
    s3_settings: Settings, users: TestUsers, tmp_path: Path
) -> None:
    app = create_app(s3_settings, {"TESTING": True})
    db_url = s3_settings.resolved_database_url
    [job_id] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "export",
                                  "spec": {"kind": "export", "tags": []}}])  # fmt: skip
    store = store_for(s3_settings)
    files = {"state_dict.pt": os.urandom(3000), "model.onnx": os.urandom(1000)}
    for name, data in files.items():
        local = tmp_path / name
        local.write_bytes(data)
        store.put_file(local, f"{job_prefix(job_id)}/attempt-2/{name}")
    with transaction(db_url) as s:
        s.get(Job, job_id).checkpoint_path = f"{store.url}/{job_prefix(job_id)}/attempt-2"
    got = promote(as_user(app, users.alice), "in-bucket", job_id)
    assert got.status_code == 201, got.get_json()
    assert got.get_json()["files"] == [
        {"name": n, "sha256": sha(files[n]), "size_bytes": len(files[n])}
        for n in ("state_dict.pt", "model.onnx")
    ]
    assert not (s3_settings.resolved_artifacts_dir / "jobs").exists()  # nothing local


def test_checkpoint_prefix_reads_local_and_bucket_paths() -> None:
    job = Job(id=12, checkpoint_path="/srv/trainyard/artifacts/jobs/12/attempt-3")
    assert registry.checkpoint_prefix(job) == "jobs/12/attempt-3"
    job.checkpoint_path = "s3://bucket/prefix/jobs/12/attempt-1/"
    assert registry.checkpoint_prefix(job) == "jobs/12/attempt-1"
    job.checkpoint_path = None
    assert registry.checkpoint_prefix(job) is None
    assert all(re.fullmatch(registry.NAME_PATTERN, n) for n in ("a", "digits-cnn.v2_x", "9" * 64))
    assert not any(registry.valid_name(n) for n in ("", "A", "-a", "a" * 65, "a/b", "a\x00"))
