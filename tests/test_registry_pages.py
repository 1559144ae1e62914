"""The "Models" pages (server/web/registry_pages.py): the list, a model's page with its
versions (job link, kind, sha256 prefix, size, stage badge, who and when) and stage
history, the stage buttons, and the job page's "Register model" form; another user's
model and job read as missing; a form without its CSRF token changes nothing."""

from __future__ import annotations

import hashlib
import html as html_lib
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.db import transaction
from shared.orm import ModelVersion
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.job_rows import add_jobs
from tests.test_authorization import page_csrf_token, session_client
from tests.test_model_registry import finished_job, model_bytes

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def browser(app: Flask, db_url: str, users: TestUsers) -> FlaskClient:
    return session_client(app, db_url, users.alice)


def text(resp: object) -> str:
    return html_lib.unescape(resp.get_data(as_text=True))  # type: ignore[attr-defined]


def row_of(page: str, version: int) -> str:
    match = re.search(rf'<tr id="version-{version}".*?</tr>', page, re.S)
    assert match, f"no row for version {version}"
    return match.group(0)


def test_the_list_and_a_models_page(
    app: Flask, browser: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    empty = browser.get("/registry")
    assert empty.status_code == 200 and 'id="registry-empty"' in empty.get_data(as_text=True)
    assert '<a href="/registry" aria-current="page">Models</a>' in empty.get_data(as_text=True)

    alice = as_user(app, users.alice)
    first = finished_job(db_url, settings, users.alice.id, name="cnn-baseline")
    second = finished_job(db_url, settings, users.alice.id, kind="quantize", name="cnn-int8")
    for job_id, stage in ((first, "production"), (second, "staging")):
        got = alice.post("/api/v1/registry/models/digits-cnn/versions",
                         json={"job_id": job_id, "stage": stage})  # fmt: skip
        assert got.status_code == 201, got.get_json()

    listed = text(browser.get("/registry"))
    assert 'data-model="digits-cnn"' in listed
    assert '<span class="badge stage-production">v1</span>' in listed
    assert '<span class="badge stage-staging">v2</span>' in listed

    page = text(browser.get("/registry/digits-cnn"))
    v1, v2 = row_of(page, 1), row_of(page, 2)
    digest = hashlib.sha256(model_bytes(settings, first, "best.pt")).hexdigest()
    assert f'href="/jobs/{first}">cnn-baseline #{first}</a>' in v1
    assert "<td>train</td>" in v1 and "<td>quantize</td>" in v2
    assert f'<code class="sha" title="{digest}">{digest[:12]}</code>' in v1
    assert "300 B" in v1 and "alice" in v1
    assert '<span class="badge stage-production">Production</span>' in v1
    assert '<span class="badge stage-staging">Staging</span>' in v2
    # A button for every other stage, none for the one it is in.
    assert re.findall(r'name="stage" value="(\w+)"', v2) == ["none", "production", "archived"]
    history = page[page.index('id="history-table"') :]
    assert history.count('class="history-row"') == 2 and "registered as" in history


def test_the_stage_buttons_move_a_version_and_archive_production(
    app: Flask, browser: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    alice = as_user(app, users.alice)
    for stage in ("production", "none"):
        job_id = finished_job(db_url, settings, users.alice.id)
        alice.post("/api/v1/registry/models/m/versions", json={"job_id": job_id, "stage": stage})
    token = page_csrf_token(browser)
    moved = browser.post("/registry/m/versions/2/stage",
                         data={"csrf_token": token, "stage": "production", "note": "better"})  # fmt: skip
    assert moved.status_code == 303 and moved.headers["Location"] == "/registry/m"
    page = text(browser.get("/registry/m"))
    assert "m version 2: none → production. The version that was in production is archived." in page
    assert 'data-stage="production"' in row_of(page, 2)
    assert 'data-stage="archived"' in row_of(page, 1)
    assert "better" in page and "replaced in production by version 2" in page

    # Without the form's token nothing moves; a stage that does not exist is refused.
    stale = browser.post("/registry/m/versions/1/stage", data={"stage": "production"})
    assert stale.status_code == 303
    bad = browser.post("/registry/m/versions/1/stage", data={"csrf_token": token, "stage": "gold"})
    assert bad.status_code == 303
    page = text(browser.get("/registry/m"))
    assert "The form had expired" in page and "Could not move m version 1" in page
    with transaction(db_url) as s:
        assert {v.version: v.stage for v in s.query(ModelVersion)} == {
            1: "archived",
            2: "production",
        }


def test_the_job_pages_register_form(
    browser: FlaskClient, settings: Settings, db_url: str, users: TestUsers
) -> None:
    job_id = finished_job(db_url, settings, users.alice.id, name="My Best Run!")
    page = text(browser.get(f"/jobs/{job_id}"))
    assert 'id="register-form"' in page
    assert 'name="name" type="text" required maxlength="64"' in page
    assert 'value="my-best-run"' in page  # the job's name, made a valid model name

    token = page_csrf_token(browser)
    made = browser.post(f"/jobs/{job_id}/register",
                        data={"csrf_token": token, "name": "best-run", "stage": "staging"})  # fmt: skip
    assert made.status_code == 303 and made.headers["Location"] == "/registry/best-run"
    shown = text(browser.get("/registry/best-run"))
    assert f"Registered job #{job_id}'s model as best-run version 1 (staging)." in shown

    # Refusals come back to the job page with the registry's reason.
    for name, reason in (("Bad Name", "not a model name"),
                         ("best-run", f"job {job_id} is already version 1 of best-run")):  # fmt: skip
        back = browser.post(f"/jobs/{job_id}/register",
                            data={"csrf_token": token, "name": name, "stage": "none"})  # fmt: skip
        assert back.status_code == 303 and back.headers["Location"] == f"/jobs/{job_id}"
        assert reason in text(browser.get(f"/jobs/{job_id}"))

    # No form where there is no model to register.
    failed = finished_job(db_url, settings, users.alice.id, state="failed")
    [evaluate] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "evaluate"}])
    for other in (failed, evaluate):
        assert 'id="register-form"' not in browser.get(f"/jobs/{other}").get_data(as_text=True)


def test_another_users_model_and_job_read_as_missing(
    app: Flask, settings: Settings, db_url: str, users: TestUsers
) -> None:
    job_id = finished_job(db_url, settings, users.alice.id)
    as_user(app, users.alice).post("/api/v1/registry/models/alices/versions",
                                   json={"job_id": job_id})  # fmt: skip
    bob = session_client(app, db_url, users.bob)
    token = page_csrf_token(bob)
    theirs, nothing = bob.get("/registry/alices"), bob.get("/registry/nobodys")
    assert theirs.status_code == nothing.status_code == 404
    assert 'id="registry-not-found"' in theirs.get_data(as_text=True)
    assert "alices" not in text(bob.get("/registry"))
    staged = bob.post("/registry/alices/versions/1/stage",
                      data={"csrf_token": token, "stage": "production"})  # fmt: skip
    assert staged.status_code == 404
    registered = bob.post(f"/jobs/{job_id}/register",
                          data={"csrf_token": token, "name": "bobs", "stage": "none"})  # fmt: skip
    assert registered.status_code == 404
    with transaction(db_url) as s:
        assert [(v.version, v.stage) for v in s.query(ModelVersion)] == [(1, "none")]
    # The admin's list shows everyone's models.
    root = session_client(app, db_url, users.admin)
    assert 'data-model="alices"' in root.get("/registry").get_data(as_text=True)
