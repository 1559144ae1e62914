"""Submitting script jobs: the can_run_code permission, the bundle and its entry point,
the limits that apply to a job whose model nobody knows before it runs."""

from __future__ import annotations

from typing import Any

import pytest

from shared import accounts
from shared.db import transaction
from shared.orm import CodeBundle, Job, User
from tests.conftest import TestUsers, as_user

pytestmark = pytest.mark.usefixtures("users")


def add_bundle(db_url: str, owner_id: int, files: list[str] | None = None) -> int:
    with transaction(db_url) as session:
        bundle = CodeBundle(
            owner_id=owner_id,
            sha256="ab" * 32,
            archive_format="tar.gz",
            filename="project.tar.gz",
            size_bytes=100,
            unpacked_bytes=200,
            file_count=2,
            python_files=files if files is not None else ["train.py", "pkg/__init__.py",
                                                           "pkg/jobs.py"],
            has_requirements=False,
        )  # fmt: skip
        session.add(bundle)
        session.flush()
        return bundle.id


def grant(db_url: str, username: str, allowed: bool = True) -> None:
    with transaction(db_url) as session:
        user = accounts.find_user(session, username)
        assert user is not None
        user.can_run_code = allowed


def script(bundle: int, **overrides: Any) -> dict[str, Any]:
    return {"kind": "script", "bundle_id": bundle, "entry": "train.py", **overrides}


def test_a_member_without_the_permission_gets_403_naming_it(
    app, users: TestUsers, db_url: str
) -> None:
    bundle = add_bundle(db_url, users.alice.id)
    got = as_user(app, users.alice).post("/api/v1/jobs", json=script(bundle))
    assert got.status_code == 403, got.json
    assert "can_run_code" in got.json["error"]["fields"]
    with transaction(db_url) as session:
        assert session.query(Job).count() == 0


def test_a_granted_member_and_an_admin_may_submit(app, users: TestUsers, db_url: str) -> None:
    grant(db_url, "alice")
    bundle = add_bundle(db_url, users.alice.id)
    got = as_user(app, users.alice).post(
        "/api/v1/jobs",
        json=script(bundle, args=["--lr", "0.01"], params={"depth": 3}, dataset=None),
    )
    assert got.status_code == 201, got.json
    job = got.json
    assert job["kind"] == "script" and job["queue"] == "cpu"
    assert job["spec"]["args"] == ["--lr", "0.01"] and job["spec"]["params"] == {"depth": 3}
    assert job["spec"]["max_runtime_s"] is not None  # the limits' default, as for any job
    # Admins may whether or not they were granted it; the entry may be a function.
    admin_bundle = add_bundle(db_url, users.admin.id)
    got = as_user(app, users.admin).post(
        "/api/v1/jobs", json=script(admin_bundle, entry="pkg.jobs:main")
    )
    assert got.status_code == 201, got.json
    # A package's function: pkg/__init__.py counts for "pkg:main".
    got = as_user(app, users.admin).post(
        "/api/v1/jobs", json=script(admin_bundle, entry="pkg:main")
    )
    assert got.status_code == 201, got.json


def test_revoking_the_permission_stops_the_next_submission(
    app, users: TestUsers, db_url: str
) -> None:
    grant(db_url, "alice")
    bundle = add_bundle(db_url, users.alice.id)
    client = as_user(app, users.alice)
    assert client.post("/api/v1/jobs", json=script(bundle)).status_code == 201
    grant(db_url, "alice", allowed=False)
    assert client.post("/api/v1/jobs", json=script(bundle)).status_code == 403


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"entry": "missing.py"}, "entry"),
        ({"entry": "pkg.other:main"}, "entry"),
        ({"entry": "../train.py"}, "entry"),
        ({"entry": "/abs/train.py"}, "entry"),
        ({"bundle_id": 999_999}, "bundle_id"),
        ({"args": ["ok", "bad\u0000"]}, "args.1"),
        ({"params": "not an object"}, "params"),
        ({"dataset": {"name": "iris"}}, "dataset.name"),
        ({"dataset": {"name": "cifar10"}}, "dataset.name"),  # no files in this data dir
        ({"resources": {"processes": 2}}, "resources.processes"),
        ({"resources": {"memory_gb": 10_000}}, "resources.memory_gb"),
        ({"stop_grace_s": 0}, "stop_grace_s"),
        ({"max_runtime_s": 10**9}, "max_runtime_s"),
        ({"batch_size": 3}, "batch_size"),
    ],
)
def test_bad_script_specs_are_422_naming_the_field(
    app, users: TestUsers, db_url: str, overrides: dict[str, Any], field: str
) -> None:
    grant(db_url, "alice")
    bundle = add_bundle(db_url, users.alice.id)
    body = script(bundle, **overrides)
    got = as_user(app, users.alice).post("/api/v1/jobs", json=body)
    assert got.status_code == 422, got.json
    assert field in got.json["error"]["fields"], got.json


def test_someone_elses_bundle_reads_as_missing(app, users: TestUsers, db_url: str) -> None:
    grant(db_url, "alice")
    bobs = add_bundle(db_url, users.bob.id)
    got = as_user(app, users.alice).post("/api/v1/jobs", json=script(bobs))
    assert got.status_code == 422
    assert got.json["error"]["fields"]["bundle_id"] == f"bundle {bobs} does not exist"


def test_a_script_job_asking_for_a_gpu_goes_to_the_gpu_queue(
    app, users: TestUsers, db_url: str
) -> None:
    grant(db_url, "alice")
    bundle = add_bundle(db_url, users.alice.id)
    got = as_user(app, users.alice).post(
        "/api/v1/jobs", json=script(bundle, resources={"gpus": 2}, priority=8, tags=["mine"])
    )
    assert got.status_code == 201, got.json
    assert got.json["queue"] == "gpu" and got.json["priority"] == 8
    listed = as_user(app, users.alice).get("/api/v1/jobs?kind=script").json
    assert [j["id"] for j in listed["jobs"]] == [got.json["id"]]
    with transaction(db_url) as session:
        assert session.get(User, users.alice.id).can_run_code


def test_admins_grant_and_revoke_the_permission_over_the_api(
    app, users: TestUsers, db_url: str
) -> None:
    admin, alice = as_user(app, users.admin), as_user(app, users.alice)
    assert alice.get("/api/v1/me").json["may_run_code"] is False
    assert admin.get("/api/v1/me").json["may_run_code"] is True
    # Members can neither read nor change permissions, their own included.
    assert alice.get("/api/v1/users/alice/permissions").status_code == 403
    got = alice.patch("/api/v1/users/alice/permissions", json={"can_run_code": True})
    assert got.status_code == 403
    got = admin.patch("/api/v1/users/alice/permissions", json={"can_run_code": True})
    assert got.status_code == 200, got.json
    assert got.json == {"username": "alice", "role": "member", "can_run_code": True,
                        "may_run_code": True}  # fmt: skip
    assert alice.get("/api/v1/me").json["may_run_code"] is True
    bundle = add_bundle(db_url, users.alice.id)
    assert alice.post("/api/v1/jobs", json=script(bundle)).status_code == 201
    got = admin.patch("/api/v1/users/alice/permissions", json={"can_run_code": "yes please"})
    assert got.status_code == 422 and "can_run_code" in got.json["error"]["fields"], got.json
    got = admin.patch("/api/v1/users/alice/permissions", json={"can_walk_on_water": True})
    assert got.status_code == 422 and "can_walk_on_water" in got.json["error"]["fields"]
    assert admin.get("/api/v1/users/nobody/permissions").status_code == 404
    admin.patch("/api/v1/users/alice/permissions", json={"can_run_code": False})
    assert alice.post("/api/v1/jobs", json=script(bundle)).status_code == 403
