"""The authorization matrix: every route of the app, called by every kind of caller.

MATRIX below lists each route (method + URL rule) with how to call it against objects
owned by alice (a member) and the status each identity must get:

- anonymous: 401 in the JSON error shape for /api/*, a redirect to /login for pages;
- alice (the owner): the documented success;
- bob (another member): 404 for alice's objects, exactly as for an id that does not
  exist; his lists never show alice's jobs;
- admin: success, and sees everything.

`test_every_route_is_in_the_matrix` fails when a route exists that the matrix does not
list, so a new endpoint cannot ship without deciding who may call it.

API rows authenticate with a bearer token; page rows with a browser session (the user id
written into the session, as Flask-Login's FlaskLoginClient does; the real login form is
exercised in test_security.py). GET rows of the API are also replayed with the
session and must answer the same.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from werkzeug.test import TestResponse

from server.auth import principal
from shared import accounts, job_files
from shared import model_registry as registry
from shared.artifact_store import store_for
from shared.db import session_factory, transaction, utcnow
from shared.orm import (
    CodeBundle,
    Job,
    MetricPoint,
    ModelVersion,
    NotificationEvent,
    RegisteredModel,
    Sweep,
    Upload,
    User,
    Webhook,
    WorkerNode,
)
from shared.settings import Settings
from shared.sweep_spec import parse_sweep_spec, sweep_to_json
from tests.conftest import as_user
from tests.helpers import evaluate_spec, train_spec

ANON, ALICE, BOB, ADMIN = "anonymous", "alice", "bob", "admin"
IDENTITIES = (ANON, ALICE, BOB, ADMIN)

ARTIFACT = "attempt-1/best.pt"
ARTIFACT_BYTES = b"alice's checkpoint bytes"
LOG_LINE = "epoch 1 train_loss=0.5"
CSV = b"x1,x2,label\n0.1,0.2,a\n0.3,0.4,b\n0.5,0.6,a\n0.7,0.8,b\n"

# Expected status per identity.
Expect = dict[str, int]


def owned(ok: int = 200) -> Expect:
    """An object of alice's: hers and the admin's to use; bob gets 404."""
    return {ANON: 401, ALICE: ok, BOB: 404, ADMIN: ok}


def any_user(ok: int = 200) -> Expect:
    return {ANON: 401, ALICE: ok, BOB: ok, ADMIN: ok}


def page(ok: int = 200) -> Expect:
    """An HTML page for logged-in users: anonymous is sent to the login form (302)."""
    return {ANON: 302, ALICE: ok, BOB: ok, ADMIN: ok}


def owned_page(ok: int = 200) -> Expect:
    """A page about an object of alice's: bob gets the 404 page, anonymous the login form."""
    return {ANON: 302, ALICE: ok, BOB: 404, ADMIN: ok}


PUBLIC: Expect = {ANON: 200, ALICE: 200, BOB: 200, ADMIN: 200}


@dataclass
class World:
    """Alice's and bob's objects, created once per test through the API and the DB."""

    app: Flask
    settings: Settings
    db_url: str
    users: Any
    job: int  # alice's succeeded train job, with metrics, a log and artifacts
    queued: int  # alice's queued job (the one to cancel)
    bob_job: int
    upload: int  # alice's CSV upload
    spare_token: int  # an extra token of alice's (the one to revoke)
    spare_secret: str
    clients: dict[str, FlaskClient] = field(default_factory=dict)
    sessions: dict[str, FlaskClient] = field(default_factory=dict)
    spare_upload: int = 0  # a second upload of alice's (the one the page deletes)
    done: int = 0  # alice's finished job whose files the delete rows remove
    bundle: int = 0  # alice's code bundle (from when she could run code)
    spare_bundle: int = 0  # another of hers (the one to delete)
    sweep: int = 0  # alice's running sweep (the one to cancel)
    cancelled_sweep: int = 0  # alice's cancelled sweep (the one to resume)
    page_sweep: int = 0  # the same two for the sweep page's buttons
    page_cancelled_sweep: int = 0
    webhook: int = 0  # alice's webhook (read, changed, tested)
    spare_webhook: int = 0  # another of hers (the API deletes it)
    page_webhook: int = 0  # and one the settings page deletes

    def user(self, identity: str) -> Any:
        return {ALICE: self.users.alice, BOB: self.users.bob, ADMIN: self.users.admin}[identity]

    def ids(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "queued": self.queued,
            "bob_job": self.bob_job,
            "upload": self.upload,
            "spare_upload": self.spare_upload,
            "done": self.done,
            "bundle": self.bundle,
            "spare_bundle": self.spare_bundle,
            "sweep": self.sweep,
            "cancelled_sweep": self.cancelled_sweep,
            "page_sweep": self.page_sweep,
            "page_cancelled_sweep": self.page_cancelled_sweep,
            "webhook": self.webhook,
            "spare_webhook": self.spare_webhook,
            "page_webhook": self.page_webhook,
            "token": self.spare_token,
            "artifact": ARTIFACT,
        }


def session_client(app: Flask, db_url: str, user: Any | None) -> FlaskClient:
    """A browser-like client logged in as `user` (anonymous for None)."""
    client = app.test_client()
    if user is not None:
        with transaction(db_url) as s:
            session_id = principal(s.get(User, user.id)).get_id()
        with client.session_transaction() as sess:
            sess["_user_id"] = session_id
            sess["_fresh"] = True
    return client


def page_csrf_token(client: FlaskClient) -> str:
    """The CSRF token a page gives this client (its <meta name="csrf-token">)."""
    resp = client.get("/login")
    if resp.status_code != 200:  # logged in: /login redirects; any page has the token
        resp = client.get("/")
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', resp.get_data(as_text=True))
    assert match, f"no csrf-token meta tag on the page ({resp.status_code})"
    return match.group(1)


def make_world(app: Flask, settings: Settings, db_url: str, users: Any) -> World:
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)

    def submit(client: FlaskClient, name: str) -> int:
        resp = client.post("/api/v1/jobs", json=train_spec(name=name))
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()["id"]

    job, queued = submit(alice, "alice-run"), submit(alice, "alice-queued")
    bob_job = submit(bob, "bob-run")
    resp = alice.post("/api/v1/uploads?filename=a.csv", data=CSV, content_type="text/csv")
    assert resp.status_code == 201, resp.get_json()
    upload = resp.get_json()["id"]
    with transaction(db_url) as s:
        row = s.get(Job, job)
        row.state, row.attempt, row.finished_at = "succeeded", 1, utcnow()
        row.checkpoint_path = str(job_files.job_dir(settings, job) / ARTIFACT)
        s.add(
            MetricPoint(
                job_id=job, attempt=1, key="val_loss", step=1, epoch=1, value=0.5, wall_time=0.0
            )
        )
        spare = accounts.create_token(s, s.get(User, users.alice.id), "spare")
        spare_id, spare_secret = spare.token.id, spare.secret
    path = job_files.job_dir(settings, job) / ARTIFACT
    path.parent.mkdir(parents=True)
    path.write_bytes(ARTIFACT_BYTES)
    job_files.log_path(settings, job).write_text(LOG_LINE + "\n")
    world = World(
        app, settings, db_url, users, job, queued, bob_job, upload, spare_id, spare_secret
    )
    resp = alice.post("/api/v1/uploads?filename=b.csv", data=CSV, content_type="text/csv")
    assert resp.status_code == 201, resp.get_json()
    world.spare_upload = resp.get_json()["id"]
    # Not alice's main job: evaluate jobs queued by the rows above use its checkpoint.
    world.done = submit(alice, "alice-done")
    with transaction(db_url) as s:
        row = s.get(Job, world.done)
        row.state, row.attempt, row.finished_at = "succeeded", 1, utcnow()
    done_file = job_files.job_dir(settings, world.done) / ARTIFACT
    done_file.parent.mkdir(parents=True)
    done_file.write_bytes(ARTIFACT_BYTES)
    # Alice's bundles, from when she had can_run_code (she has not now: the upload row
    # below shows the gate).
    with transaction(db_url) as s:
        made = [
            CodeBundle(owner_id=users.alice.id, sha256=digit * 64, archive_format="tar.gz",
                       filename=f"{digit}.tar.gz", size_bytes=10, unpacked_bytes=10,
                       file_count=1, python_files=["train.py"], has_requirements=False)
            for digit in "12"
        ]  # fmt: skip
        s.add_all(made)
        s.flush()
        world.bundle, world.spare_bundle = made[0].id, made[1].id
        stored = sweep_to_json(parse_sweep_spec(SWEEP))
        sweeps = [Sweep(owner_id=users.alice.id, name=f"alice-{state}", spec=stored, state=state)
                  for state in ("running", "cancelled", "running", "cancelled")]  # fmt: skip
        s.add_all(sweeps)
        s.flush()
        world.sweep, world.cancelled_sweep = sweeps[0].id, sweeps[1].id
        world.page_sweep, world.page_cancelled_sweep = sweeps[2].id, sweeps[3].id
    world.clients = {ANON: as_user(app, None)} | {
        i: as_user(app, world.user(i)) for i in IDENTITIES[1:]
    }
    world.sessions = {ANON: session_client(app, db_url, None)} | {
        i: session_client(app, db_url, world.user(i)) for i in IDENTITIES[1:]
    }
    seed_registry(world)
    seed_webhooks(world)
    return world


# ---------------------------------------------------------------- checks on a success
# Each takes (response, identity, world) and asserts more than the status.


def listed_ids(resp: TestResponse) -> set[int]:
    return {j["id"] for j in resp.get_json()["jobs"]}


def check_job_list(resp: TestResponse, who: str, w: World) -> None:
    owners = {j["owner"] for j in resp.get_json()["jobs"]}
    ids = listed_ids(resp)
    if who == ALICE:
        assert owners == {"alice"} and {w.job, w.queued} <= ids, ids
    elif who == BOB:
        assert owners == {"bob"} and ids == {w.bob_job}, ids
    else:
        assert {w.job, w.queued, w.bob_job} <= ids, ids


def check_owner_filter(resp: TestResponse, who: str, w: World) -> None:
    # ?owner=alice: a member sees only their own jobs whatever the filter says.
    mine = {w.job, w.queued, w.done}
    expected = {BOB: set(), ALICE: mine, ADMIN: mine}[who]
    assert listed_ids(resp) == expected


def check_job(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["id"] == w.job and resp.get_json()["owner"] == "alice"


def check_metrics(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["series"]["val_loss"]["value"] == [0.5]


def check_logs(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["lines"] == [LOG_LINE]


def check_artifact_list(resp: TestResponse, who: str, w: World) -> None:
    assert ARTIFACT in {a["path"] for a in resp.get_json()["artifacts"]}


def check_download(resp: TestResponse, who: str, w: World) -> None:
    assert resp.data == ARTIFACT_BYTES
    assert resp.headers["Content-Disposition"].startswith("attachment")


def check_tensorboard(resp: TestResponse, who: str, w: World) -> None:
    assert resp.headers["Content-Disposition"].startswith("attachment")
    with tarfile.open(fileobj=io.BytesIO(resp.data)) as tar:
        assert tar.getnames()[0].split("-")[:2] == ["job", str(w.job)]  # job-<id>-<name>


def check_new_job_is_callers(resp: TestResponse, who: str, w: World) -> None:
    # A retried or submitted job belongs to whoever asked, even an admin retrying alice's.
    assert resp.get_json()["owner"] == w.user(who).username
    assert resp.get_json()["id"] not in {w.job, w.queued, w.bob_job}


def check_evaluate(resp: TestResponse, who: str, w: World) -> None:
    if who == BOB:  # reads exactly as a missing id (see test_another_users_object_...)
        assert resp.get_json()["error"]["fields"] == {
            "source_job_id": f"job {w.job} does not exist"
        }
    elif who != ANON:
        check_new_job_is_callers(resp, who, w)
        assert resp.get_json()["source_job_id"] == w.job


def check_cancel(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        state = s.get(Job, w.queued).state
    assert state == ("queued" if who in (ANON, BOB) else "cancelled")


def check_upload(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["id"] == w.upload and resp.get_json()["rows"] == 4


def check_new_upload(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["rows"] == 4


def check_column_search(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["columns"] == [{"name": "x2", "numeric": True, "distinct": 4}]


def check_upload_list(resp: TestResponse, who: str, w: World) -> None:
    ids = {u["id"] for u in resp.get_json()["uploads"]}
    assert ({w.upload, w.spare_upload} <= ids) == (who == ALICE), ids


def check_all_uploads(resp: TestResponse, who: str, w: World) -> None:
    assert {w.upload, w.spare_upload} <= {u["id"] for u in resp.get_json()["uploads"]}


def _upload_exists(w: World, upload_id: int) -> bool:
    with transaction(w.db_url) as s:
        return s.get(Upload, upload_id) is not None


def check_upload_deleted(resp: TestResponse, who: str, w: World) -> None:
    # Refused callers leave it in place; the owner's and the admin's delete it.
    assert _upload_exists(w, w.upload) == (who in (ANON, BOB))


def check_page_upload_deleted(resp: TestResponse, who: str, w: World) -> None:
    assert _upload_exists(w, w.spare_upload) == (who in (ANON, BOB))
    if who in (ALICE, ADMIN):
        assert resp.headers["Location"] == "/uploads"


def check_artifacts_deleted(resp: TestResponse, who: str, w: World) -> None:
    gone = not (job_files.job_dir(w.settings, w.done) / ARTIFACT).exists()
    assert gone == (who in (ALICE, ADMIN))
    if who in (ALICE, ADMIN) and not resp.headers.get("Location"):
        assert resp.get_json()["artifacts_deleted_at"]


def check_uploads_page(resp: TestResponse, who: str, w: World) -> None:
    html = resp.get_data(as_text=True)
    assert 'id="uploads-page"' in html
    assert (f'id="upload-{w.spare_upload}"' in html) == (who in (ALICE, ADMIN))


def check_own_tokens(resp: TestResponse, who: str, w: World) -> None:
    tokens = resp.get_json()["tokens"]
    assert tokens and {t["user"] for t in tokens} == {w.user(who).username}
    assert all("token" not in t and "token_hash" not in t for t in tokens)


def check_all_tokens(resp: TestResponse, who: str, w: World) -> None:
    assert {t["user"] for t in resp.get_json()["tokens"]} == {"alice", "bob", "root"}


def check_new_token(resp: TestResponse, who: str, w: World) -> None:
    body = resp.get_json()
    assert body["user"] == w.user(who).username and body["token"].startswith("ty_")


def check_revoke(resp: TestResponse, who: str, w: World) -> None:
    # Bob's attempt must leave alice's token working; the others' must have killed it.
    still_works = w.app.test_client().get(
        "/api/v1/me", headers={"Authorization": f"Bearer {w.spare_secret}"}
    )
    assert still_works.status_code == (200 if who in (ANON, BOB) else 401)


def check_me(resp: TestResponse, who: str, w: World) -> None:
    user = w.user(who)
    assert resp.get_json() == {"id": user.id, "username": user.username, "role": user.role,
                               "may_run_code": who == ADMIN}  # fmt: skip


def bundle_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("train.py")
        tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


def check_new_bundle(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        owners = {b.owner_id for b in s.query(CodeBundle).filter(CodeBundle.id != w.bundle)}
    # Only the admin's upload got through (members lack can_run_code).
    assert owners == ({w.users.alice.id, w.users.admin.id} if who == ADMIN
                      else {w.users.alice.id}), owners  # fmt: skip


def check_bundle_list(resp: TestResponse, who: str, w: World) -> None:
    ids = {b["id"] for b in resp.get_json()["bundles"]}
    assert (w.bundle in ids) == (who == ALICE), ids  # one's own; admins: ?all=true


def check_bundle_deleted(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        exists = s.get(CodeBundle, w.spare_bundle) is not None
    assert exists == (who in (ANON, BOB))


SWEEP = {
    "base": train_spec(epochs=2),
    "space": {"optimizer.lr": "choice([0.001, 0.01])"},
    "method": "grid",
    "metric": "val_accuracy",
}


def check_new_sweep(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        sweep = s.get(Sweep, resp.get_json()["id"])
        assert sweep.owner_id == w.user(who).id


def check_page_new_sweep(resp: TestResponse, who: str, w: World) -> None:
    sweep_id = int(resp.headers["Location"].removeprefix("/sweeps/"))
    with transaction(w.db_url) as s:
        assert s.get(Sweep, sweep_id).owner_id == w.user(who).id


def check_sweeps_page(resp: TestResponse, who: str, w: World) -> None:
    listed = f'data-sweep-id="{w.sweep}"' in resp.get_data(as_text=True)
    assert listed == (who in (ALICE, ADMIN))


def check_sweep_list(resp: TestResponse, who: str, w: World) -> None:
    ids = {x["id"] for x in resp.get_json()["sweeps"]}
    assert (w.sweep in ids) == (who == ALICE), ids


def check_sweep_state(sweep_attr: str, expected: str) -> Callable[[TestResponse, str, World], None]:
    def check(resp: TestResponse, who: str, w: World) -> None:
        with transaction(w.db_url) as s:
            state = s.get(Sweep, getattr(w, sweep_attr)).state
        assert (state == expected) == (who in (ALICE, ADMIN)), state

    return check


# The model registry (server/registry_api.py, server/web/registry_pages.py): alice's
# model "alice-model", version 1 her job `job`, registered through its rules.
REGISTRY = "/api/v1/registry/models"


def seed_registry(w: World) -> None:
    actor = registry.Actor(w.users.alice.id, False)
    with session_factory(w.db_url)() as session:
        registry.promote(session, store_for(w.settings), actor, "alice-model", w.job)


def _model_names(resp: TestResponse) -> set[str]:
    return {m["name"] for m in resp.get_json()["models"]}


def check_model_list(resp: TestResponse, who: str, w: World) -> None:
    # One's own (the admin's too: ?all=true lists everyone's).
    assert ("alice-model" in _model_names(resp)) == (who == ALICE)


def check_all_models(resp: TestResponse, who: str, w: World) -> None:
    assert "alice-model" in _model_names(resp)


def check_new_model_version(resp: TestResponse, who: str, w: World) -> None:
    # alice's job under a new name: hers and the admin's to register (the model is then
    # the registrant's); for bob her job reads as missing (422 naming job_id).
    if who in (ALICE, ADMIN):
        body = resp.get_json()
        assert (body["model"], body["version"], body["job_id"]) == ("alice-second", 1, w.job)
        assert body["created_by"] == w.user(who).username
    elif who == BOB:
        assert resp.get_json()["error"]["fields"] == {"job_id": f"job {w.job} does not exist"}


def check_registry_refusal(resp: TestResponse, who: str, w: World) -> None:
    # bob's queued job into alice's name: the name is taken for bob (409 naming name);
    # alice and the admin may write to her model but the job is not a succeeded one of
    # theirs (422 naming job_id). Either way her model keeps its one version.
    if who != ANON:
        fields = set(resp.get_json()["error"]["fields"])
        assert fields == ({"name"} if who == BOB else {"job_id"}), fields
    assert [v.version for v in _alice_model_versions(w)] == [1]


def _alice_model_versions(w: World) -> list[ModelVersion]:
    with transaction(w.db_url) as s:
        model = s.query(RegisteredModel).filter(RegisteredModel.name == "alice-model").one()
        return s.query(ModelVersion).filter(ModelVersion.model_id == model.id).all()


def check_alice_model_stage(expected: str) -> Callable[[TestResponse, str, World], None]:
    def check(resp: TestResponse, who: str, w: World) -> None:
        [version] = _alice_model_versions(w)
        stage = version.stage
        assert stage == (expected if who in (ALICE, ADMIN) else "none"), stage

    return check


def check_registry_page(resp: TestResponse, who: str, w: World) -> None:
    listed = 'data-model="alice-model"' in resp.get_data(as_text=True)
    assert listed == (who in (ALICE, ADMIN))  # an admin's page lists everyone's


def check_page_registered(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        made = s.query(RegisteredModel).filter(RegisteredModel.name == "alice-page-model").first()
    assert (made is not None) == (who in (ALICE, ADMIN))
    if who in (ALICE, ADMIN):
        assert resp.headers["Location"] == "/registry/alice-page-model"


def check_permissions(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        granted = s.get(User, w.users.alice.id).can_run_code
    assert granted == (who == ADMIN)


def check_script_page(resp: TestResponse, who: str, w: World) -> None:
    # Members are told which permission they lack; the admin gets the form; nothing is
    # created either way (the POST names no bundle).
    text = resp.get_data(as_text=True)
    if who in (ALICE, BOB):
        assert "can_run_code" in text
    elif who == ADMIN:
        assert 'id="script-form"' in text
    with transaction(w.db_url) as s:
        assert s.query(Job).filter(Job.kind == "script").count() == 0


def check_queues(resp: TestResponse, who: str, w: World) -> None:
    # Members see only their own waiting jobs; depths count everyone's, anonymously.
    waiting = resp.get_json()["waiting"]
    ids = {j["id"] for j in waiting}
    if who == ADMIN:
        assert w.bob_job in ids, ids
    else:
        assert {j["owner"] for j in waiting} <= {w.user(who).username}
        assert (w.bob_job in ids) == (who == BOB), ids


def check_workers_page(resp: TestResponse, who: str, w: World) -> None:
    html = resp.get_data(as_text=True)
    assert 'id="workers-page"' in html
    # bob's queued job waits; alice's jobs are named alice-run and alice-queued.
    assert ("bob-run" in html) == (who in (BOB, ADMIN))
    assert ("alice-" in html) == (who != BOB) or who == ALICE


def check_home(resp: TestResponse, who: str, w: World) -> None:
    html = resp.get_data(as_text=True)
    sees = {name for name in ("alice-run", "alice-queued", "bob-run") if name in html}
    expected = {
        ALICE: {"alice-run", "alice-queued"},
        BOB: {"bob-run"},
        ADMIN: {"alice-run", "alice-queued", "bob-run"},
    }[who]
    assert sees == expected, sees


def check_compare(resp: TestResponse, who: str, w: World) -> None:
    # alice's job compared: hers and the admin's to see; bob's 404 names nothing of it.
    assert ("alice-run" in resp.get_data(as_text=True)) == (who in (ALICE, ADMIN))


def check_leaderboard(resp: TestResponse, who: str, w: World) -> None:
    # alice's succeeded digits job puts digits in the dataset list; bob has none.
    assert ('<option value="digits"' in resp.get_data(as_text=True)) == (who in (ALICE, ADMIN))


def check_login_page(resp: TestResponse, who: str, w: World) -> None:
    if who == ANON:
        assert 'name="csrf_token"' in resp.get_data(as_text=True)
    else:  # already logged in: on to the app
        assert resp.headers["Location"] == "/"


def check_logged_out(resp: TestResponse, who: str, w: World) -> None:
    assert resp.headers["Location"] == "/login"
    assert w.sessions[who].get("/").status_code == 302  # the session is gone


def check_bad_login(resp: TestResponse, who: str, w: World) -> None:
    if who == ANON:
        assert "Wrong username or password." in resp.get_data(as_text=True)


def check_submit_page(resp: TestResponse, who: str, w: World) -> None:
    html = resp.get_data(as_text=True)
    assert 'id="submit-form"' in html
    # The evaluate form offers only the caller's own succeeded train jobs.
    assert (f'<option value="{w.job}"' in html) == (who == ALICE)


def check_clone_page(resp: TestResponse, who: str, w: World) -> None:
    # Bob's 404 must not show alice's spec (the form's inputs filled from it).
    assert ('value="alice-run"' in resp.get_data(as_text=True)) == (who in (ALICE, ADMIN))


def check_form_job(resp: TestResponse, who: str, w: World) -> None:
    # A job submitted with the form belongs to whoever submitted it.
    if who == ANON:
        assert resp.headers["Location"].startswith("/login")
        return
    job_id = int(resp.headers["Location"].removeprefix("/jobs/"))
    with transaction(w.db_url) as s:
        assert s.get(Job, job_id).owner_id == w.user(who).id


def check_job_page(resp: TestResponse, who: str, w: World) -> None:
    html = resp.get_data(as_text=True)
    assert 'id="job-page"' in html and "alice-run" in html


def check_job_stream(resp: TestResponse, who: str, w: World) -> None:
    # alice's job is finished: its state, then the end of the stream.
    body = resp.get_data(as_text=True)
    assert resp.mimetype == "text/event-stream"
    assert "event: job\n" in body and body.rstrip().split("\n")[-2] == "event: end"


def check_timeline(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["job_id"] == w.job


def check_estimate(resp: TestResponse, who: str, w: World) -> None:
    body = resp.get_json()
    assert body["params"] == 53_002 and body["ok"] is True, body  # the CNN on digits


def check_evaluate_estimate(resp: TestResponse, who: str, w: World) -> None:
    if who == BOB:  # as for submitting: alice's job reads as missing
        assert resp.get_json()["error"]["fields"] == {
            "source_job_id": f"job {w.job} does not exist"
        }
    elif who != ANON:
        assert resp.get_json()["params"] == 53_002


def check_user_limits(resp: TestResponse, who: str, w: World) -> None:
    assert resp.get_json()["username"] == "alice"


def check_limits_change(resp: TestResponse, who: str, w: World) -> None:
    # Only the admin's change is stored.
    with transaction(w.db_url) as s:
        limits = s.get(User, w.users.alice.id).limits
    assert limits == ({"max_epochs_per_user": 500} if who == ADMIN else None), limits


def check_page_cancel(resp: TestResponse, who: str, w: World) -> None:
    check_cancel(resp, who, w)
    if who in (ALICE, ADMIN):
        assert resp.headers["Location"] == f"/jobs/{w.queued}"


def check_page_new_job(resp: TestResponse, who: str, w: World) -> None:
    # Retried or evaluated from the page: a new job, the caller's, and its page next.
    job_id = int(resp.headers["Location"].removeprefix("/jobs/"))
    with transaction(w.db_url) as s:
        job = s.get(Job, job_id)
        assert job.owner_id == w.user(who).id and job_id not in (w.job, w.queued, w.bob_job)


NODE = "matrix-1@gpu-01"
ADMIN_ONLY: Expect = {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200}


def check_node_control(resp: TestResponse, who: str, w: World) -> None:
    # Only the admin's (root's) cordon/drain is stored (shared/worker_nodes.py), under their name.
    with transaction(w.db_url) as s:
        row = s.get(WorkerNode, NODE)
    if who == ADMIN:
        assert resp.get_json()["node"] == NODE
        assert row is not None and row.changed_by == "root"
    else:
        assert row is None or row.changed_by == "root", row


def check_node_control_page(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        row = s.get(WorkerNode, NODE)
    if who == ADMIN:
        assert resp.headers["Location"] == "/workers"
        assert row is not None and row.cordoned and row.changed_by == "root"
    else:
        assert row is None or row.changed_by == "root", row


# Webhooks (server/webhooks_api.py, server/web/webhook_pages.py): alice's three, owned
# like jobs; the test settings' http URL allows loopback receivers.
HOOK = "/api/v1/webhooks/<int:webhook_id>"
HOOK_URL = "http://127.0.0.1:9/matrix"


def seed_webhooks(w: World) -> None:
    with transaction(w.db_url) as s:
        made = [Webhook(owner_id=w.users.alice.id, url=HOOK_URL, secret=f"whsec_{i}",
                        events=["job.failed"], format="json", stall_minutes=30, enabled=True)
                for i in range(3)]  # fmt: skip
        s.add_all(made)
        s.flush()
        w.webhook, w.spare_webhook, w.page_webhook = (h.id for h in made)


def check_webhook_list(resp: TestResponse, who: str, w: World) -> None:
    hooks = resp.get_json()["webhooks"]
    assert (w.webhook in {h["id"] for h in hooks}) == (who == ALICE)  # admins: ?all=true
    assert all("secret" not in h for h in hooks)


def check_all_webhooks(resp: TestResponse, who: str, w: World) -> None:
    assert w.webhook in {h["id"] for h in resp.get_json()["webhooks"]}


def check_new_webhook(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        hook = s.get(Webhook, resp.get_json()["id"])
        assert hook.owner_id == w.user(who).id and resp.get_json()["secret"] == hook.secret


def check_page_new_webhook(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        owners = set(s.scalars(select(Webhook.owner_id).where(Webhook.url == HOOK_URL + "/page")))
    assert owners == ({w.user(who).id} if who != ANON else set())


def check_webhook_changed(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        minutes = s.get(Webhook, w.webhook).stall_minutes
    assert minutes == (45 if who in (ALICE, ADMIN) else 30)


def check_webhook_gone(attr: str) -> Callable[[TestResponse, str, World], None]:
    def check(resp: TestResponse, who: str, w: World) -> None:
        with transaction(w.db_url) as s:
            exists = s.get(Webhook, getattr(w, attr)) is not None
        assert exists == (who in (ANON, BOB))

    return check


def check_ping_queued(resp: TestResponse, who: str, w: World) -> None:
    with transaction(w.db_url) as s:
        pings = s.scalars(select(NotificationEvent.event_id)
                          .where(NotificationEvent.webhook_id == w.webhook)).all()  # fmt: skip
    assert len(pings) == (1 if who in (ALICE, ADMIN) else 0), pings


def check_webhooks_page(resp: TestResponse, who: str, w: World) -> None:
    listed = f'data-webhook-id="{w.webhook}"' in resp.get_data(as_text=True)
    assert listed == (who in (ALICE, ADMIN))  # an admin's page lists everyone's


# ---------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Row:
    method: str
    rule: str  # exactly as in app.url_map
    expect: Expect
    path: str = ""  # the URL to call, with {job}, {queued}, {upload}, ...; default: rule
    json: Any = None
    data: bytes | None = None
    content_type: str | None = None
    check: Callable[[TestResponse, str, World], None] | None = None
    # Run `check` on every answer, refusals and redirects too (to show a refused write
    # changed nothing); by default it only runs on a 2xx.
    check_all: bool = False
    page: bool = False  # an HTML page: browser session (and CSRF token on POST)
    optional: bool = False  # a route another engineer may not have added yet
    note: str = ""  # tells rows of the same route apart in failure messages

    @property
    def route(self) -> tuple[str, str]:
        return self.method, self.rule

    def label(self) -> str:
        return f"{self.method} {self.path or self.rule}" + (f" ({self.note})" if self.note else "")


J = "/api/v1/jobs/<int:job_id>"

MATRIX: tuple[Row, ...] = (
    # jobs
    Row("GET", "/api/v1/jobs", any_user(), check=check_job_list),
    Row("GET", "/api/v1/jobs", any_user(), "/api/v1/jobs?owner=alice", check=check_owner_filter),
    Row("GET", J, owned(), "/api/v1/jobs/{job}", check=check_job),
    Row("GET", J + "/metrics", owned(), "/api/v1/jobs/{job}/metrics", check=check_metrics),
    Row("GET", J + "/events", owned(), "/api/v1/jobs/{job}/events", check=check_timeline),
    Row("GET", J + "/logs", owned(), "/api/v1/jobs/{job}/logs", check=check_logs),
    Row("GET", J + "/artifacts", owned(), "/api/v1/jobs/{job}/artifacts", check=check_artifact_list),
    Row("GET", J + "/artifacts/<path:name>", owned(), "/api/v1/jobs/{job}/artifacts/{artifact}",
        check=check_download),
    Row("GET", J + "/tensorboard", owned(), "/api/v1/jobs/{job}/tensorboard",
        check=check_tensorboard),
    Row("POST", "/api/v1/jobs", any_user(201), json=train_spec(), check=check_new_job_is_callers,
        note="train"),
    # bob: 422 "job N does not exist", the answer for an id that does not exist.
    Row("POST", "/api/v1/jobs", {ANON: 401, ALICE: 201, BOB: 422, ADMIN: 201},
        json={"kind": "evaluate", "source_job_id": "{job}", "dataset": {"split": "test"}},
        check=check_evaluate, check_all=True, note="evaluate alice's job"),
    # The estimate (server/api.py): a spec in, nothing stored; an evaluate spec's source is
    # checked as on submission.
    Row("POST", "/api/v1/jobs/estimate", any_user(), json=train_spec(), check=check_estimate),
    Row("POST", "/api/v1/jobs/estimate", {ANON: 401, ALICE: 200, BOB: 422, ADMIN: 200},
        json={"kind": "evaluate", "source_job_id": "{job}"}, check=check_evaluate_estimate,
        check_all=True, note="evaluate alice's job"),
    Row("POST", J + "/cancel", owned(), "/api/v1/jobs/{queued}/cancel", check=check_cancel,
        check_all=True),
    Row("POST", J + "/retry", owned(201), "/api/v1/jobs/{job}/retry",
        check=check_new_job_is_callers),
    # uploads
    Row("POST", "/api/v1/uploads", any_user(201), data=CSV, content_type="text/csv",
        check=check_new_upload),
    Row("GET", "/api/v1/uploads/<int:upload_id>", owned(), "/api/v1/uploads/{upload}",
        check=check_upload),
    Row("GET", "/api/v1/uploads/<int:upload_id>/columns", owned(),
        "/api/v1/uploads/{upload}/columns?q=X2", check=check_column_search),
    Row("GET", "/api/v1/uploads", any_user(), check=check_upload_list),
    Row("GET", "/api/v1/uploads", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200},
        "/api/v1/uploads?all=true", check=check_all_uploads),
    # account and tokens
    Row("GET", "/api/v1/me", any_user(), check=check_me),
    Row("GET", "/api/v1/tokens", any_user(), check=check_own_tokens),
    Row("GET", "/api/v1/tokens", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200},
        "/api/v1/tokens?all=true", check=check_all_tokens),
    Row("POST", "/api/v1/tokens", any_user(201), json={"name": "matrix"}, check=check_new_token),
    # Admins may revoke anyone's token (a leaked one); bob cannot see alice's.
    Row("DELETE", "/api/v1/tokens/<int:token_id>", owned(), "/api/v1/tokens/{token}",
        check=check_revoke, check_all=True),
    # users' limits (server/users_api.py): admins only, whoever the user
    Row("GET", "/api/v1/users/<username>/limits", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200},
        "/api/v1/users/alice/limits", check=check_user_limits),
    Row("PATCH", "/api/v1/users/<username>/limits",
        {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200}, "/api/v1/users/alice/limits",
        json={"max_epochs": 500}, check=check_limits_change, check_all=True),
    # who may run code (server/users_api.py): admins only
    Row("GET", "/api/v1/users/<username>/permissions", ADMIN_ONLY,
        "/api/v1/users/alice/permissions"),
    Row("PATCH", "/api/v1/users/<username>/permissions", ADMIN_ONLY,
        "/api/v1/users/alice/permissions", json={"can_run_code": True}, check=check_permissions,
        check_all=True),
    # code bundles (server/bundles_api.py): uploads need can_run_code, which admins have
    Row("POST", "/api/v1/bundles", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 201},
        "/api/v1/bundles?filename=m.tar.gz", data=bundle_bytes(),
        content_type="application/gzip", check=check_new_bundle, check_all=True),
    Row("GET", "/api/v1/bundles", any_user(), check=check_bundle_list),
    Row("GET", "/api/v1/bundles/<int:bundle_id>", owned(), "/api/v1/bundles/{bundle}"),
    Row("DELETE", "/api/v1/bundles/<int:bundle_id>", owned(), "/api/v1/bundles/{spare_bundle}",
        check=check_bundle_deleted, check_all=True),
    # sweeps (server/sweeps_api.py): owned like jobs
    Row("POST", "/api/v1/sweeps", any_user(201), json=SWEEP, check=check_new_sweep),
    Row("GET", "/api/v1/sweeps", any_user(), check=check_sweep_list),
    Row("GET", "/api/v1/sweeps/<int:sweep_id>", owned(), "/api/v1/sweeps/{sweep}"),
    Row("POST", "/api/v1/sweeps/<int:sweep_id>/cancel", owned(), "/api/v1/sweeps/{sweep}/cancel",
        check=check_sweep_state("sweep", "cancelled"), check_all=True),
    Row("POST", "/api/v1/sweeps/<int:sweep_id>/resume", owned(),
        "/api/v1/sweeps/{cancelled_sweep}/resume",
        check=check_sweep_state("cancelled_sweep", "running"), check_all=True),
    # the sweep pages (server/web/sweep_pages.py)
    Row("GET", "/sweeps", page(), check=check_sweeps_page, page=True),
    Row("GET", "/sweeps/new", page(), page=True),
    Row("GET", "/sweeps/new", {ANON: 302, ALICE: 200, BOB: 404, ADMIN: 200},
        "/sweeps/new?from_job={job}", check_all=True, page=True, note="from alice's job"),
    Row("POST", "/sweeps/new", page(303), data=b"spec=" + quote(json.dumps(SWEEP)).encode(),
        check=check_page_new_sweep, page=True),
    Row("GET", "/sweeps/<int:sweep_id>", owned_page(), "/sweeps/{sweep}", page=True),
    Row("POST", "/sweeps/<int:sweep_id>/cancel", owned_page(303), "/sweeps/{page_sweep}/cancel",
        check=check_sweep_state("page_sweep", "cancelled"), check_all=True, page=True),
    Row("POST", "/sweeps/<int:sweep_id>/resume", owned_page(303),
        "/sweeps/{page_cancelled_sweep}/resume",
        check=check_sweep_state("page_cancelled_sweep", "running"), check_all=True, page=True),
    # the model registry (server/registry_api.py, server/web/registry_pages.py): alice's
    # "alice-model" (seed_registry) is owned like a job; names are global, so bob cannot
    # add a version to hers (409), and her job is missing for him (422 naming job_id).
    Row("GET", REGISTRY, any_user(), check=check_model_list),
    Row("GET", REGISTRY, {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200}, REGISTRY + "?all=true",
        check=check_all_models),
    Row("GET", REGISTRY + "/<name>", owned(), REGISTRY + "/alice-model"),
    Row("GET", REGISTRY + "/<name>/versions/<int:version>", owned(),
        REGISTRY + "/alice-model/versions/1"),
    Row("POST", REGISTRY + "/<name>/versions", {ANON: 401, ALICE: 201, BOB: 422, ADMIN: 201},
        REGISTRY + "/alice-second/versions", json={"job_id": "{job}"},
        check=check_new_model_version, check_all=True, note="alice's job, a new name"),
    Row("POST", REGISTRY + "/<name>/versions", {ANON: 401, ALICE: 422, BOB: 409, ADMIN: 422},
        REGISTRY + "/alice-model/versions", json={"job_id": "{bob_job}"},
        check=check_registry_refusal, check_all=True, note="bob's queued job, alice's name"),
    Row("POST", REGISTRY + "/<name>/versions/<int:version>/stage", owned(),
        REGISTRY + "/alice-model/versions/1/stage", json={"stage": "staging"},
        check=check_alice_model_stage("staging"), check_all=True),
    Row("GET", "/registry", page(), check=check_registry_page, page=True),
    Row("GET", "/registry/<name>", owned_page(), "/registry/alice-model", page=True),
    Row("POST", "/registry/<name>/versions/<int:version>/stage", owned_page(303),
        "/registry/alice-model/versions/1/stage", data=b"stage=production",
        check=check_alice_model_stage("production"), check_all=True, page=True),
    Row("POST", "/jobs/<int:job_id>/register", owned_page(303), "/jobs/{job}/register",
        data=b"name=alice-page-model&stage=none", check=check_page_registered, check_all=True,
        page=True),
    # registries and health
    Row("GET", "/api/v1/models", any_user()),
    Row("GET", "/api/v1/datasets", any_user()),
    # workers and queues (server/cluster_api.py): counts for everyone, jobs only one's own
    Row("GET", "/api/v1/workers", any_user()),
    Row("GET", "/api/v1/queues", any_user(), check=check_queues),
    # cordon, drain, uncordon, clear a worker node (server/cluster_api.py): admins only
    Row("POST", "/api/v1/workers/<node>/cordon", ADMIN_ONLY, f"/api/v1/workers/{NODE}/cordon",
        check=check_node_control, check_all=True),
    Row("POST", "/api/v1/workers/<node>/drain", ADMIN_ONLY,
        f"/api/v1/workers/{NODE}/drain?now=true", check=check_node_control, check_all=True),
    Row("POST", "/api/v1/workers/<node>/uncordon", ADMIN_ONLY,
        f"/api/v1/workers/{NODE}/uncordon", check=check_node_control, check_all=True),
    Row("POST", "/api/v1/workers/<node>/clear", ADMIN_ONLY, f"/api/v1/workers/{NODE}/clear",
        check=check_node_control, check_all=True),
    # webhooks (server/webhooks_api.py, server/web/webhook_pages.py)
    Row("GET", "/api/v1/webhooks", any_user(), check=check_webhook_list),
    Row("GET", "/api/v1/webhooks", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200},
        "/api/v1/webhooks?all=true", check=check_all_webhooks),
    Row("POST", "/api/v1/webhooks", any_user(201), json={"url": HOOK_URL, "events": ["job.failed"]},
        check=check_new_webhook),
    Row("GET", HOOK, owned(), "/api/v1/webhooks/{webhook}"),
    Row("GET", HOOK + "/deliveries", owned(), "/api/v1/webhooks/{webhook}/deliveries"),
    Row("PATCH", HOOK, owned(), "/api/v1/webhooks/{webhook}", json={"stall_minutes": 45},
        check=check_webhook_changed, check_all=True),
    Row("POST", HOOK + "/test", owned(202), "/api/v1/webhooks/{webhook}/test",
        check=check_ping_queued, check_all=True),
    Row("DELETE", HOOK, owned(), "/api/v1/webhooks/{spare_webhook}",
        check=check_webhook_gone("spare_webhook"), check_all=True),
    Row("GET", "/settings/webhooks", page(), check=check_webhooks_page, page=True),
    Row("POST", "/settings/webhooks", page(201), page=True, check=check_page_new_webhook,
        check_all=True, data=b"url=" + quote(HOOK_URL + "/page", safe="").encode()
        + b"&events=job.failed&format=json&stall_minutes=30&enabled=y"),
    Row("POST", "/settings/webhooks/<int:webhook_id>/test", owned_page(303),
        "/settings/webhooks/{webhook}/test", page=True),
    Row("POST", "/settings/webhooks/<int:webhook_id>/delete", owned_page(303),
        "/settings/webhooks/{page_webhook}/delete", check=check_webhook_gone("page_webhook"),
        check_all=True, page=True),
    # Prometheus (server/prometheus.py): the scrape token or an admin
    Row("GET", "/metrics", {ANON: 401, ALICE: 403, BOB: 403, ADMIN: 200}),
    Row("GET", "/healthz", PUBLIC),
    # HTML
    Row("GET", "/", page(), check=check_home, page=True),
    # the job page (server/web/job_page.py): alice's job is a 404 page for bob
    Row("GET", "/jobs/<int:job_id>", owned_page(), "/jobs/{job}", check=check_job_page,
        page=True),
    Row("GET", "/jobs/<int:job_id>/stream", owned_page(), "/jobs/{job}/stream",
        check=check_job_stream, page=True),
    Row("POST", "/jobs/<int:job_id>/cancel", owned_page(303), "/jobs/{queued}/cancel",
        check=check_page_cancel, check_all=True, page=True),
    Row("POST", "/jobs/<int:job_id>/retry", owned_page(303), "/jobs/{job}/retry",
        check=check_page_new_job, page=True),
    Row("POST", "/jobs/<int:job_id>/evaluate", owned_page(303), "/jobs/{job}/evaluate",
        data=b"split=test&checkpoint=best&dataset=", check=check_page_new_job, page=True),
    Row("POST", "/jobs/<int:job_id>/derive", owned_page(303), "/jobs/{job}/derive",
        data=b"kind=quantize", check=check_page_new_job, page=True),
    Row("GET", "/compare", {ANON: 302, ALICE: 200, BOB: 404, ADMIN: 200}, "/compare?ids={job}",
        check=check_compare, check_all=True, page=True),
    Row("GET", "/leaderboard", page(), check=check_leaderboard, page=True),
    Row("GET", "/workers", page(), check=check_workers_page, page=True),
    # The workers page's admin buttons (server/web/workers.py).
    Row("POST", "/workers/<node>/<action>", {ANON: 302, ALICE: 403, BOB: 403, ADMIN: 303},
        f"/workers/{NODE}/cordon", check=check_node_control_page, check_all=True, page=True),
    Row("GET", "/submit", page(), check=check_submit_page, page=True),
    Row("GET", "/submit", {ANON: 302, ALICE: 200, BOB: 404, ADMIN: 200}, "/submit?clone={job}",
        check=check_clone_page, check_all=True, page=True, note="clone alice's job"),
    Row("POST", "/submit", page(302), page=True, data=b"kind=train&name=matrix-form",
        check=check_form_job, check_all=True),
    # The "Run your code" page (server/web/script_submit.py): can_run_code, as the API.
    Row("GET", "/submit/script", {ANON: 302, ALICE: 403, BOB: 403, ADMIN: 200}, page=True,
        check=check_script_page, check_all=True),
    Row("POST", "/submit/script", {ANON: 302, ALICE: 403, BOB: 403, ADMIN: 422}, page=True,
        data=b"entry=train.py", check=check_script_page, check_all=True),
    # The submit form's live estimate (server/web/submit.py): the form's fields in, JSON out.
    Row("POST", "/submit/estimate", page(), page=True, data=b"kind=train", check=check_estimate),
    Row("GET", "/login", {ANON: 200, ALICE: 302, BOB: 302, ADMIN: 302}, check=check_login_page,
        check_all=True, page=True),
    Row("POST", "/login", {ANON: 401, ALICE: 302, BOB: 302, ADMIN: 302}, page=True,
        note="wrong password",
        data=b"username=alice&password=not-her-password", check=check_bad_login, check_all=True,
        content_type="application/x-www-form-urlencoded"),
    # API reference (server/openapi.py, still being written, hence optional): the document
    # is public (it describes the API, no data); the Swagger UI page needs a login.
    Row("GET", "/api/v1/openapi.json", PUBLIC, optional=True),
    Row("GET", "/api/docs", page(), page=True, optional=True),
    # Deleting (server/deletion.py): alice's objects are hers and the admin's to delete;
    # bob's attempt is a 404 and leaves them. Late: the rows above read them.
    Row("GET", "/uploads", page(), check=check_uploads_page, page=True),
    Row("POST", "/uploads/<int:upload_id>/delete", owned_page(303),
        "/uploads/{spare_upload}/delete", check=check_page_upload_deleted, check_all=True,
        page=True),
    Row("DELETE", "/api/v1/uploads/<int:upload_id>", owned(), "/api/v1/uploads/{upload}",
        check=check_upload_deleted, check_all=True),
    Row("POST", "/jobs/<int:job_id>/artifacts/delete", owned_page(303),
        "/jobs/{done}/artifacts/delete", check=check_artifacts_deleted, check_all=True,
        page=True),
    Row("DELETE", J + "/artifacts", owned(), "/api/v1/jobs/{done}/artifacts",
        check=check_artifacts_deleted, check_all=True),
    # Last: it ends the session the page rows above use.
    Row("POST", "/logout", {i: 302 for i in IDENTITIES}, page=True, check=check_logged_out,
        check_all=True),
)  # fmt: skip

IGNORED_ENDPOINTS = {"static"}


def app_routes(app: Flask) -> set[tuple[str, str]]:
    return {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint not in IGNORED_ENDPOINTS
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }


def test_every_route_is_in_the_matrix(tmp_path: Path) -> None:
    from server.app import create_app

    app = create_app(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    routes = app_routes(app)
    listed = {row.route for row in MATRIX}
    missing = sorted(routes - listed)
    assert not missing, (
        "routes with no row in the authorization matrix (add them to MATRIX in "
        "tests/test_authorization.py, deciding who may call them): "
        + ", ".join(f"{method} {rule}" for method, rule in missing)
    )
    stale = sorted(r.route for r in MATRIX if not r.optional and r.route not in routes)
    assert not stale, "MATRIX rows for routes the app does not have: " + ", ".join(
        f"{m} {r}" for m, r in stale
    )


def fill(value: Any, ids: dict[str, Any]) -> Any:
    """Put the world's ids into a row's path or JSON body ("{job}" -> 12)."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\{(\w+)\}", value)
        return ids[whole.group(1)] if whole else value.format(**ids)
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, ids) for v in value]
    return value


def call(row: Row, client: FlaskClient, w: World) -> TestResponse:
    path = fill(row.path or row.rule, w.ids())
    kwargs: dict[str, Any] = {}
    if row.json is not None:
        kwargs["json"] = fill(row.json, w.ids())
    data = row.data
    if row.page and row.method == "POST":
        # A real browser form carries the page's CSRF token.
        token = f"csrf_token={page_csrf_token(client)}".encode()
        data = token + (b"&" + data if data else b"")
        kwargs["content_type"] = "application/x-www-form-urlencoded"
    if data is not None:
        kwargs["data"] = data
        kwargs.setdefault("content_type", row.content_type)
    return client.open(path, method=row.method, **kwargs)


def check_response(row: Row, who: str, resp: TestResponse, w: World) -> None:
    if resp.status_code != row.expect[who]:
        raise AssertionError(
            f"status {resp.status_code}, expected {row.expect[who]}: "
            + resp.get_data(as_text=True)[:200]
        )
    if resp.status_code == 401 and not row.page:
        body = resp.get_json()
        assert body["error"]["code"] == "unauthorized", body
        assert set(body["error"]) == {"code", "message", "fields"}
    elif resp.status_code == 404 and not row.page:
        assert resp.get_json()["error"]["code"] == "not_found"
    elif resp.status_code == 302 and who == ANON and row.method == "GET":
        assert resp.headers["Location"].startswith("/login"), resp.headers["Location"]
    if row.check is not None and (resp.status_code < 300 or row.check_all):
        row.check(resp, who, w)


@pytest.mark.parametrize("who", IDENTITIES)
def test_authorization_matrix(who: str, app: Flask, settings: Settings, db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    w = make_world(app, settings, db_url, users)
    routes = app_routes(app)
    failures: list[str] = []
    for row in MATRIX:
        if row.optional and row.route not in routes:
            continue
        client = w.sessions[who] if row.page else w.clients[who]
        try:
            check_response(row, who, call(row, client, w), w)
            if not row.page and row.method == "GET":
                # The same read with the browser session (no token) answers the same.
                check_response(row, who, call(row, w.sessions[who], w), w)
        except Exception as exc:  # noqa: BLE001 - collect every row's failure, then report
            failures.append(f"{who}: {row.label()}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------- no existence leak


def normalized(resp: TestResponse, object_id: int) -> tuple[int, str]:
    """Status and body with the asked-for id replaced, to compare two answers."""
    body = json.dumps(resp.get_json(), sort_keys=True)
    return resp.status_code, re.sub(rf"\b{object_id}\b", "<id>", body)


def test_another_users_object_reads_exactly_like_a_missing_one(
    app: Flask, settings: Settings, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    w = make_world(app, settings, db_url, users)
    bob = w.clients[BOB]
    missing = 10**9  # no such job, upload or token
    probes = [
        ("GET", "/api/v1/jobs/{}"),
        ("GET", "/api/v1/jobs/{}/metrics"),
        ("GET", "/api/v1/jobs/{}/logs"),
        ("GET", "/api/v1/jobs/{}/artifacts"),
        ("GET", "/api/v1/jobs/{}/artifacts/" + ARTIFACT),
        ("GET", "/api/v1/jobs/{}/tensorboard"),
        ("POST", "/api/v1/jobs/{}/cancel"),
        ("POST", "/api/v1/jobs/{}/retry"),
        ("DELETE", "/api/v1/jobs/{}/artifacts"),
    ]
    cases = [(m, p, w.job) for m, p in probes]
    cases += [
        ("GET", "/api/v1/uploads/{}", w.upload),
        ("DELETE", "/api/v1/uploads/{}", w.upload),
        ("DELETE", "/api/v1/tokens/{}", w.spare_token),
    ]
    for method, template, alices in cases:
        theirs = bob.open(template.format(alices), method=method)
        nothing = bob.open(template.format(missing), method=method)
        assert theirs.status_code == 404, (template, theirs.get_json())
        assert normalized(theirs, alices) == normalized(nothing, missing), template
        assert sorted(theirs.headers.keys()) == sorted(nothing.headers.keys()), template

    # An evaluate job naming alice's job as its source: the 422 of a missing job.
    theirs = bob.post("/api/v1/jobs", json=evaluate_spec(w.job))
    nothing = bob.post("/api/v1/jobs", json=evaluate_spec(missing))
    assert theirs.status_code == 422
    assert theirs.get_json()["error"]["fields"] == {"source_job_id": f"job {w.job} does not exist"}
    assert normalized(theirs, w.job) == normalized(nothing, missing)

    with transaction(db_url) as s:  # and nothing of alice's changed hands or state
        assert s.query(Job).filter(Job.owner_id == users.bob.id).count() == 1  # bob-run
        assert s.get(Job, w.queued).state == "queued"
