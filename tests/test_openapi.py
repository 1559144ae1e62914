"""The OpenAPI document (server/openapi.py) and the API docs page.

The document must be valid OpenAPI 3.1, list every route of the API (a new endpoint
without `@operation` fails here), give every operation its errors in the one error
shape, and be served without credentials. The docs page must render for a logged-in
user from this origin only, and its try-it-out path (session + CSRF header) must work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient

from server.auth import principal
from server.openapi import openapi_document
from server.params import MAX_ID
from shared.db import transaction
from shared.orm import User
from shared.settings import Settings
from shared.spec import JOB_KINDS

DOCUMENTED_OUTSIDE_API = {("GET", "/healthz")}
JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def doc_app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    """An app with no database or broker behind it: the document needs neither."""
    from server.app import create_app

    home = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(home=home, database_url=f"sqlite:///{home / 'db.sqlite'}"))


@pytest.fixture(scope="module")
def document(doc_app: Flask) -> dict[str, Any]:
    # Anonymous on purpose: the document is public.
    resp = doc_app.test_client().get("/api/v1/openapi.json")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    doc: dict[str, Any] = resp.get_json()
    return doc


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def openapi_path(rule: str) -> str:
    """/api/v1/jobs/<int:job_id> -> /api/v1/jobs/{job_id}"""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    # schemathesis validates against the OpenAPI 3.1 meta-schema when loading.
    schemathesis.openapi.from_dict(document).validate()
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; the meta-schema above does not
    # look inside them.
    for schema in document["components"]["schemas"].values():
        jsonschema_rs.meta.validate({"$schema": JSON_SCHEMA_2020_12, **schema})


def route_differences(app: Flask) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(routes the document lacks, documented operations the app lacks)."""
    routes = {
        (method, openapi_path(rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/") or ("GET", rule.rule) in DOCUMENTED_OUTSIDE_API
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    with app.app_context():
        documented = {(method, path) for method, path, _ in operations(openapi_document())}
    return routes - documented, documented - routes


def test_every_api_route_is_documented(doc_app: Flask, document: dict[str, Any]) -> None:
    missing, stale = route_differences(doc_app)
    assert missing == set(), "routes missing from the OpenAPI document (decorate with @operation)"
    assert stale == set(), "documented operations the app does not have"
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(set(ids)) == len(ids)


def test_an_undocumented_endpoint_is_caught(tmp_path: Path) -> None:
    from server.app import create_app

    app = create_app(Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    app.add_url_rule("/api/v1/shiny", "shiny", lambda: "{}", methods=["POST"])
    assert route_differences(app) == ({("POST", "/api/v1/shiny")}, set())


def test_every_operation_documents_its_errors(document: dict[str, Any]) -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for method, path, op in operations(document):
        label = f"{method} {path}"
        codes = set(op["responses"])
        assert any(code.startswith("2") for code in codes), label
        assert "400" in codes, label  # every operation refuses unknown query parameters
        public = op.get("security") == []
        assert public == (label in {"GET /api/v1/openapi.json", "GET /healthz"}), label
        if not public:
            assert "401" in codes, label
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"], label
        if "{" in path:
            assert "404" in codes, label
        if method in ("POST", "DELETE"):
            assert "413" in codes, label
        if "requestBody" in op:
            assert {"413", "415", "422"} <= codes, label
        if "429" in codes:
            assert "Retry-After" in op["responses"]["429"]["headers"], label
        for code, response in op["responses"].items():
            if code.startswith(("4", "5")) and not (path == "/healthz" and code == "503"):
                assert response["content"]["application/json"]["schema"] == error_ref, (
                    label,
                    code,
                )
        for param in op.get("parameters", []):
            if param["in"] == "path" and param["name"].endswith("_id"):
                assert param["schema"] == {"type": "integer", "format": "int64", "minimum": 1,
                                           "maximum": MAX_ID}, label  # fmt: skip


def test_job_submission_is_documented_with_the_spec_union(document: dict[str, Any]) -> None:
    submit = document["paths"]["/api/v1/jobs"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    spec = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert spec["discriminator"]["propertyName"] == "kind"
    assert set(spec["discriminator"]["mapping"]) == set(JOB_KINDS)
    assert {"201", "200", "403", "422", "429"} <= set(submit["responses"])
    assert [p["name"] for p in submit["parameters"] if p["in"] == "header"] == ["Idempotency-Key"]
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["bearer"]["description"],
    }
    assert schemes["session"]["in"] == "cookie"
    uploads = document["paths"]["/api/v1/uploads"]["post"]
    assert {"multipart/form-data", "text/csv"} <= set(uploads["requestBody"]["content"])
    assert [p["name"] for p in uploads["parameters"]] == ["filename"]


def test_the_document_is_built_once_per_app(doc_app: Flask) -> None:
    with doc_app.app_context():
        assert openapi_document() is openapi_document()


def test_spectree_validation_errors_come_in_our_shape(doc_app: Flask) -> None:
    client = doc_app.test_client()
    for url, field, message in [
        ("/healthz?verbose=1", "verbose", "unknown query parameter"),
        ("/api/v1/openapi.json?x=1&x=2", "x", "given more than once"),
    ]:
        resp = client.get(url)
        assert resp.status_code == 400, url
        assert resp.get_json() == {
            "error": {
                "code": "invalid_parameter",
                "message": resp.get_json()["error"]["message"],
                "fields": {field: message},
            }
        }


def test_routing_errors_name_what_is_wrong(doc_app: Flask) -> None:
    client = doc_app.test_client()
    resp = client.get("/api/v1/jobs/abc")
    assert resp.status_code == 404 and set(resp.get_json()["error"]["fields"]) == {"path"}
    resp = client.put("/api/v1/me")
    assert resp.status_code == 405 and set(resp.get_json()["error"]["fields"]) == {"method"}
    assert "GET" in resp.headers["Allow"]


# ---------------------------------------------------------------- with a database


@pytest.fixture
def alice_browser(app: Flask, users: Any, db_url: str) -> FlaskClient:
    """A browser logged in as alice (the session set directly, as Flask-Login suggests)."""
    client = app.test_client()
    with transaction(db_url) as s:
        user = s.get(User, users.alice.id)
        assert user is not None
        session_id = principal(user).get_id()
    with client.session_transaction() as sess:
        sess["_user_id"] = session_id
        sess["_fresh"] = True
    return client


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_docs_page_for_a_logged_in_user(app: Flask, alice_browser: FlaskClient) -> None:
    resp = alice_browser.get("/api/docs")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert 'data-document-url="/api/v1/openapi.json"' in html
    assert re.search(r'<meta name="csrf-token" content="[^"]+"', html)
    assert 'href="/api/docs"' in html  # the nav link
    # Every script is a same-origin file (the CSP forbids inline script).
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts
    for attributes, body in scripts:
        src = re.search(r'src="([^"]+)"', attributes)
        assert src and src.group(1).startswith("/static/") and not body.strip(), attributes
        assert alice_browser.get(src.group(1)).status_code == 200
    for href in re.findall(r'<link rel="stylesheet" href="([^"]+)"', html):
        assert href.startswith("/static/") and alice_browser.get(href).status_code == 200
    # The app's strict policy, unchanged: no inline script or style, same origin only.
    from server.app import CONTENT_SECURITY_POLICY

    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "style-src 'self';" in CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_docs_page_needs_a_login(app: Flask) -> None:
    resp = app.test_client().get("/api/docs")
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_try_it_out_writes_with_the_session_and_csrf_header(alice_browser: FlaskClient) -> None:
    """What api_docs.js does: the page's CSRF token in X-CSRFToken on a session write."""
    html = alice_browser.get("/api/docs").get_data(as_text=True)
    match = re.search(r'<meta name="csrf-token" content="([^"]+)"', html)
    assert match
    refused = alice_browser.post("/api/v1/tokens", json={"name": "from the docs"})
    assert refused.status_code == 400 and "X-CSRFToken" in refused.get_json()["error"]["fields"]
    created = alice_browser.post(
        "/api/v1/tokens", json={"name": "from the docs"}, headers={"X-CSRFToken": match.group(1)}
    )
    assert created.status_code == 201 and created.get_json()["user"] == "alice"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_response_that_breaks_the_document_is_a_500_in_our_shape(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from server import api
    from tests.helpers import train_spec

    job_id = client.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    original = api.job_to_json
    monkeypatch.setattr(api, "job_to_json", lambda job: {**original(job), "surprise": 1})
    resp = client.get(f"/api/v1/jobs/{job_id}")
    assert resp.status_code == 500
    assert resp.get_json()["error"]["code"] == "internal_error"
    assert "does not match the OpenAPI document" in caplog.text


def test_swagger_ui_is_vendored_with_its_license() -> None:
    vendor = Path(__file__).resolve().parent.parent / "server/static/vendor/swagger-ui"
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "LICENSE", "README.md"):
        assert (vendor / name).is_file(), name
    assert "Apache License" in (vendor / "LICENSE").read_text()
    script = (Path(__file__).resolve().parent.parent / "server/static/api_docs.js").read_text()
    assert "X-CSRFToken" in script and "validatorUrl: null" in script
