"""Admission limits: no job a member submits can take a worker host down (issue 11).

The attack first: specs that were accepted with 201 (a 3-billion-parameter MLP, a
2-billion-parameter Transformer and LSTM, batch_size 65536, 10,000 epochs) are now a
422 naming the field, from the API, the estimate endpoint, retry and the web form;
then the limits per role, the default max_runtime_s, an admin raising one user's
limits (API and CLI), and the estimate endpoint the submit form calls.
"""

from __future__ import annotations

import json
import re
from html import unescape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict

from shared import accounts
from shared.db import transaction, utcnow
from shared.job_estimate import GIB
from shared.limits import LIMITS, LimitsError, apply_changes, effective_limits, parse_value
from shared.orm import Job, User
from shared.settings import Settings
from tests.conftest import as_user
from tests.helpers import train_spec
from tests.test_accounts_cli import db, env, migrated_db  # noqa: F401 - fixtures
from tests.test_accounts_cli import run as cli_run
from tests.test_authorization import page_csrf_token, session_client
from tests.test_submit_page import errors_text, page, post, set_name, set_value

if TYPE_CHECKING:
    from tests.conftest import TestUsers

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

# 4x256x256 images: 512 samples stay under the synthetic data's size cap.
BIG_IMAGES = {
    "name": "synthetic_images",
    "params": {"channels": 4, "height": 256, "width": 256, "num_samples": 512},
}
SEQUENCES = {"name": "synthetic_sequences"}
ATTACKS: dict[str, tuple[dict[str, Any], str]] = {
    "mlp 8192x16 on 4x256x256": (
        train_spec(dataset=BIG_IMAGES, model={"name": "mlp", "params": {"hidden": 8192, "layers": 16}}),
        "model.params.hidden",
    ),
    "transformer 2048x24, ff 16384": (
        train_spec(
            dataset=SEQUENCES,
            model={"name": "transformer",
                   "params": {"d_model": 2048, "layers": 24, "ff_dim": 16384, "heads": 16}},
        ),
        "model.params.d_model",
    ),
    "lstm 4096x8 bidirectional": (
        train_spec(
            dataset=SEQUENCES,
            model={"name": "lstm", "params": {"hidden": 4096, "layers": 8, "bidirectional": True}},
        ),
        "model.params.hidden",
    ),
    "batch_size 65536": (train_spec(batch_size=65536), "batch_size"),
    "epochs 10000": (train_spec(epochs=10000), "epochs"),
}  # fmt: skip


def job_count(db_url: str) -> int:
    with transaction(db_url) as s:
        return s.query(Job).count()


def set_overrides(db_url: str, username: str, limits: dict[str, Any] | None) -> None:
    with transaction(db_url) as s:
        s.query(User).filter_by(username=username).one().limits = limits


# ---------------------------------------------------------------- the attack


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_members_job_that_would_take_a_host_down_is_refused(
    client: FlaskClient, db_url: str, attack: str
) -> None:
    spec, field = ATTACKS[attack]
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 422, resp.get_json()
    error = resp.get_json()["error"]
    assert error["code"] == "over_limit"
    assert field in error["fields"], error
    message = error["fields"][field]
    assert "limit" in message
    if field.startswith("model.params"):
        # The estimate and the limit, both in the message.
        assert "parameters" in message and "100,000,000" in message, message
        assert "GiB" in message, message
    assert job_count(db_url) == 0


@SQLITE_ONLY
def test_the_estimate_matches_the_issues_figures(client: FlaskClient) -> None:
    spec, _ = ATTACKS["mlp 8192x16 on 4x256x256"]
    body = client.post("/api/v1/jobs/estimate", json=spec).get_json()
    # 262,144 inputs x 8192, 15 x 8192^2, 8192 x 10 outputs, biases.
    assert body["params"] == 3_154_329_610
    memory = body["memory_bytes"]
    # adam: two state values per parameter
    assert memory["weights"] == memory["gradients"] == 4 * body["params"]
    assert memory["optimizer_state"] == 8 * body["params"]
    assert 46 < memory["total"] / GIB < 48  # "about 47 GiB"
    assert not body["ok"] and "model.params.hidden" in body["exceeded"]


# ---------------------------------------------------------------- roles and overrides


@SQLITE_ONLY
def test_limits_follow_the_role(app: Flask, users: TestUsers, db_url: str) -> None:
    spec = train_spec(batch_size=16384)
    refused = as_user(app, users.alice).post("/api/v1/jobs", json=spec)
    assert refused.status_code == 422
    assert refused.get_json()["error"]["fields"] == {
        "batch_size": "16,384 is over the limit of 8,192"
    }
    assert as_user(app, users.admin).post("/api/v1/jobs", json=spec).status_code == 201
    # Even an admin's defaults stop a 3-billion-parameter model.
    spec, field = ATTACKS["mlp 8192x16 on 4x256x256"]
    resp = as_user(app, users.admin).post("/api/v1/jobs", json=spec)
    assert resp.status_code == 422 and field in resp.get_json()["error"]["fields"]


@SQLITE_ONLY
def test_settings_set_the_role_limits(settings: Settings, users: TestUsers, db_url: str) -> None:
    from server.app import create_app

    app = create_app(settings.model_copy(update={"max_epochs_per_user": 3}), {"TESTING": True})
    client = as_user(app, users.alice)
    assert client.post("/api/v1/jobs", json=train_spec(epochs=3)).status_code == 201
    resp = client.post("/api/v1/jobs", json=train_spec(epochs=4))
    assert resp.get_json()["error"]["fields"] == {"epochs": "4 is over the limit of 3"}


def test_max_runtime_s_gets_the_roles_default(app: Flask, users: TestUsers) -> None:
    alice, admin = as_user(app, users.alice), as_user(app, users.admin)
    job = alice.post("/api/v1/jobs", json=train_spec()).get_json()
    assert job["spec"]["max_runtime_s"] == 6 * 3600
    job = admin.post("/api/v1/jobs", json=train_spec()).get_json()
    assert job["spec"]["max_runtime_s"] == 24 * 3600
    assert alice.post("/api/v1/jobs", json=train_spec(max_runtime_s=600)).status_code == 201
    resp = alice.post("/api/v1/jobs", json=train_spec(max_runtime_s=2 * 86400))
    assert resp.status_code == 422
    assert resp.get_json()["error"]["fields"] == {
        "max_runtime_s": "172,800 s is over the limit of 86,400 s"
    }
    assert admin.post("/api/v1/jobs", json=train_spec(max_runtime_s=2 * 86400)).status_code == 201


@SQLITE_ONLY
def test_a_replayed_request_is_still_the_same_job(client: FlaskClient) -> None:
    # The stored spec has the default max_runtime_s; the same request sent again has none.
    headers = {"Idempotency-Key": "once"}
    first = client.post("/api/v1/jobs", json=train_spec(), headers=headers)
    again = client.post("/api/v1/jobs", json=train_spec(), headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]


@SQLITE_ONLY
def test_an_admin_raises_one_users_limits(app: Flask, users: TestUsers, db_url: str) -> None:
    alice, bob, admin = (as_user(app, u) for u in (users.alice, users.bob, users.admin))
    spec, _ = ATTACKS["mlp 8192x16 on 4x256x256"]
    url = "/api/v1/users/alice/limits"
    for member in (alice, bob):
        assert member.get(url).status_code == 403
        assert member.patch(url, json={"max_params": 5e9}).status_code == 403

    body = admin.get(url).get_json()
    assert body["overrides"] == {} and body["role"] == "member"
    assert body["limits"]["max_params"] == body["role_defaults"]["max_params"] == 100_000_000

    resp = admin.patch(url, json={"max_params": 5e9, "max_memory_gib": 64})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["overrides"] == {"max_params": 5_000_000_000, "max_memory_gib": 64.0}
    assert body["limits"]["max_params"] == 5_000_000_000
    with transaction(db_url) as s:
        row = s.query(User).filter_by(username="alice").one()
        assert row.limits == {"max_params_per_user": 5_000_000_000, "max_memory_gib_per_user": 64.0}
    # Alice's own, not bob's.
    assert alice.post("/api/v1/jobs", json=spec).status_code == 201
    assert bob.post("/api/v1/jobs", json=spec).status_code == 422

    # null: back to the role's default; the other override stays.
    body = admin.patch(url, json={"max_params": None}).get_json()
    assert body["overrides"] == {"max_memory_gib": 64.0}
    assert alice.post("/api/v1/jobs", json=spec).status_code == 422

    for bad, field in (
        ({"max_parameters": 1}, "max_parameters"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"max_epochs": 2.5}, "max_epochs"),
        ({"max_epochs": "many"}, "max_epochs"),
        ({"max_epochs": True}, "max_epochs"),
    ):
        resp = admin.patch(url, json=bad)
        assert resp.status_code == 422, bad
        assert field in resp.get_json()["error"]["fields"], resp.get_json()
    assert admin.patch(url, json=[1]).status_code == 422
    assert admin.get("/api/v1/users/nobody/limits").status_code == 404
    assert admin.patch("/api/v1/users/no%00body/limits", json={}).status_code == 404


@SQLITE_ONLY
def test_retry_is_held_to_the_limits_of_whoever_retries(
    app: Flask, users: TestUsers, db_url: str
) -> None:
    alice = as_user(app, users.alice)
    job_id = alice.post("/api/v1/jobs", json=train_spec(epochs=50)).get_json()["id"]
    with transaction(db_url) as s:
        row = s.get(Job, job_id)
        row.state, row.finished_at = "failed", utcnow()
    set_overrides(db_url, "alice", {"max_epochs_per_user": 10})
    resp = alice.post(f"/api/v1/jobs/{job_id}/retry")
    assert resp.status_code == 422
    assert resp.get_json()["error"]["fields"] == {"epochs": "50 is over the limit of 10"}
    # From the job page: the refusal, field by field, on the page it was asked from.
    page_client = session_client(app, db_url, users.alice)
    token = page_csrf_token(page_client)
    resp = page_client.post(f"/jobs/{job_id}/retry", data={"csrf_token": token})
    assert resp.status_code == 303 and resp.headers["Location"] == f"/jobs/{job_id}"
    # (The flash shows on whichever page comes next.)
    shown = unescape(page_client.get("/submit").get_data(as_text=True))
    assert (
        "the job exceeds the limits of your account. epochs: 50 is over the limit of 10." in shown
    )
    assert job_count(db_url) == 1
    # An admin's retry is held to the admin's limits.
    assert as_user(app, users.admin).post(f"/api/v1/jobs/{job_id}/retry").status_code == 201


# ---------------------------------------------------------------- the estimate endpoint


@SQLITE_ONLY
def test_the_estimate_endpoint(app: Flask, users: TestUsers, db_url: str) -> None:
    client = as_user(app, users.alice)
    body = client.post("/api/v1/jobs/estimate", json=train_spec()).get_json()
    assert body["ok"] is True and body["exceeded"] == {}
    assert body["params"] == 53_002  # the default CNN on digits
    memory = body["memory_bytes"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert body["batch"] == 16 and body["max_runtime_s"] == 6 * 3600
    assert body["limits"] == {
        "max_params": 100_000_000, "max_memory_gib": 16.0, "max_batch_size": 8192,
        "max_epochs": 1000, "default_runtime_s": 21600, "max_runtime_s": 86400,
    }  # fmt: skip

    body = client.post("/api/v1/jobs/estimate", json=ATTACKS["batch_size 65536"][0]).get_json()
    assert body["ok"] is False
    assert body["exceeded"] == {"batch_size": "65,536 is over the limit of 8,192"}
    assert job_count(db_url) == 0  # nothing stored

    bad = client.post("/api/v1/jobs/estimate", json=train_spec(epochs=0))
    assert bad.status_code == 422 and bad.get_json()["error"]["code"] == "invalid_spec"


@SQLITE_ONLY
def test_the_estimate_of_an_evaluate_job(app: Flask, users: TestUsers, db_url: str) -> None:
    client = as_user(app, users.alice)
    job_id = client.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    with transaction(db_url) as s:
        row = s.get(Job, job_id)
        row.state, row.finished_at, row.checkpoint_path = "succeeded", utcnow(), "/x/best.pt"
    spec = {"kind": "evaluate", "source_job_id": job_id, "batch_size": 65536}
    body = client.post("/api/v1/jobs/estimate", json=spec).get_json()
    assert body["params"] == 53_002
    assert body["memory_bytes"]["gradients"] == body["memory_bytes"]["optimizer_state"] == 0
    assert body["exceeded"] == {"batch_size": "65,536 is over the limit of 8,192"}
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 422 and "batch_size" in resp.get_json()["error"]["fields"]


# ---------------------------------------------------------------- the web form


@SQLITE_ONLY
def test_the_form_refuses_a_job_over_the_limits(app: Flask, users: TestUsers, db_url: str) -> None:
    alice = session_client(app, db_url, users.alice)
    _, form = page(alice)
    fields = form.fields(js=False)
    set_name(fields, "dataset.name", "synthetic_sequences")
    set_name(fields, "model.name", "lstm")
    set_value(fields, "f-train-model-lstm-params-hidden", "4096")
    set_value(fields, "f-train-model-lstm-params-layers", "8")
    set_value(fields, "f-train-batch_size", "65536")
    resp = post(alice, fields)
    assert resp.status_code == 422
    errors = errors_text(resp.get_data(as_text=True))
    assert "parameters; the limit is 100,000,000" in errors["f-train-model-lstm-params-hidden"]
    # Both of the batch's problems: activations that need 100+ GiB, and the batch limit.
    assert errors["f-train-batch_size"].lower().startswith("the job would need about")
    assert errors["f-train-batch_size"].endswith("; 65,536 is over the limit of 8,192")
    assert job_count(db_url) == 0

    # The form's live estimate: the same answer, from the form's own fields.
    data = MultiDict([(name, value) for name, value, _ in fields])
    body = alice.post("/submit/estimate", data=data).get_json()
    assert body["ok"] is False and body["params"] > 100_000_000
    assert set(body["exceeded"]) == {"model.params.hidden", "batch_size"}
    set_value(fields, "f-train-model-lstm-params-hidden", "64")
    set_value(fields, "f-train-batch_size", "64")
    data = MultiDict([(name, value) for name, value, _ in fields])
    body = alice.post("/submit/estimate", data=data).get_json()
    assert body["ok"] is True and body["exceeded"] == {}
    # Half-typed input: the fields to fix, as on submit.
    set_value(fields, "f-train-batch_size", "6x")
    data = MultiDict([(name, value) for name, value, _ in fields])
    resp = alice.post("/submit/estimate", data=data)
    assert resp.status_code == 422 and "batch_size" in resp.get_json()["error"]["fields"]
    # Without the page's CSRF token: refused.
    data = MultiDict([(name, value) for name, value, _ in fields if name != "csrf_token"])
    assert alice.post("/submit/estimate", data=data).status_code == 400
    assert job_count(db_url) == 0


def test_the_form_shows_the_runtime_an_empty_field_gets(
    app: Flask, users: TestUsers, db_url: str
) -> None:
    for user, default in ((users.alice, 6 * 3600), (users.admin, 24 * 3600)):
        html = session_client(app, db_url, user).get("/submit").get_data(as_text=True)
        field = re.search(r'<input[^>]*name="max_runtime_s"[^>]*>', html)
        assert field is not None and f'placeholder="default: {default:,}"' in field.group(0)


# ---------------------------------------------------------------- the README


def _readme_section() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Admission limits") :]
    return section[: section.index("\n### ", 1)]


def _commented_json(block: str, start: str) -> str:
    """The `# ...` lines of an example answer, joined (from `start` to the block's end)."""
    begin = block.index(start) + len(start)
    answer = block[begin : block.index("```", begin)]
    return " ".join(line.strip().removeprefix("#").strip() for line in answer.splitlines())


@SQLITE_ONLY
def test_the_readme_examples_match_the_server(client: FlaskClient) -> None:
    section = _readme_section()
    refused, estimated = section.split("/api/v1/jobs/estimate -H", 1)
    body = json.loads(re.search(r"-d '(\{.*?\})'", refused, re.S).group(1))  # type: ignore[union-attr]
    resp = client.post("/api/v1/jobs", json=body)
    assert resp.status_code == 422
    assert resp.get_json() == json.loads(_commented_json(refused, "# 422 "))

    body = json.loads(re.search(r"-d '(\{.*?\})'", estimated, re.S).group(1))  # type: ignore[union-attr]
    answer = client.post("/api/v1/jobs/estimate", json=body).get_json()
    shown = _commented_json(estimated, "# 200 ")
    memory = json.loads(re.search(r'"memory_bytes": (\{[^}]*\})', shown).group(1))  # type: ignore[union-attr]
    assert answer["memory_bytes"] == memory
    for key in ("params", "batch", "memory_gib", "max_runtime_s", "exceeded", "ok"):
        assert f'"{key}": {json.dumps(answer[key])}' in shown, key
    assert f'"max_params": {answer["limits"]["max_params"]}' in shown


# ---------------------------------------------------------------- shared/limits.py


def test_overrides_are_validated_and_merged() -> None:
    assert parse_value("max_params", "5e9") == 5_000_000_000
    assert parse_value("max_params", 5e9) == 5_000_000_000
    assert parse_value("max_memory_gib", 2) == 2.0
    assert parse_value("max_running_jobs", 0) == 0  # 0: no limit, where that means something
    for name, value in (("max_params", 0), ("max_params", -1), ("max_params", 1.5),
                        ("max_params", float("inf")), ("nope", 1), ("max_epochs", "x")):  # fmt: skip
        with pytest.raises(LimitsError):
            parse_value(name, value)
    merged = apply_changes(
        {"max_uploads_per_user": 5, "from_a_newer_version": 1}, {"max_params": 7}
    )
    assert merged == {
        "max_uploads_per_user": 5,
        "from_a_newer_version": 1,
        "max_params_per_user": 7,
    }
    assert apply_changes({"max_params_per_user": 7}, {"max_params": None}) is None


def test_every_limit_has_its_settings() -> None:
    settings = Settings()
    for limit in LIMITS.values():
        assert hasattr(settings, limit.user_setting), limit.user_setting
        assert hasattr(settings, limit.admin_setting), limit.admin_setting
    member = effective_limits(settings, "member", {"max_params_per_user": 7, "junk": "x"})
    assert member["max_params"] == 7 and member["max_epochs"] == settings.max_epochs_per_user
    admin = effective_limits(settings, "admin", None)
    assert admin["max_params"] == settings.max_params_per_admin


# ---------------------------------------------------------------- the CLI


def test_trainyard_user_limits(env: dict[str, str | None], db: str) -> None:  # noqa: F811
    with transaction(db) as s:
        accounts.create_user(s, "alice", "member")

    def run(*args: str) -> Any:
        return cli_run(env, "user", "limits", *args)

    result = run("alice", "--max-params", "5e9", "--max-epochs", "50")
    assert result.exit_code == 0, result.output
    assert "max_params" in result.output and "5,000,000,000" in result.output
    with transaction(db) as s:
        row = s.query(User).filter_by(username="alice").one()
        assert row.limits == {"max_params_per_user": 5_000_000_000, "max_epochs_per_user": 50}

    result = run("alice")  # shows them
    assert (
        result.exit_code == 0 and "5,000,000,000" in result.output and "override" in result.output
    )

    result = run("alice", "--max-params", "default")
    assert result.exit_code == 0, result.output
    with transaction(db) as s:
        assert s.query(User).filter_by(username="alice").one().limits == {"max_epochs_per_user": 50}

    result = run("alice", "--reset")
    with transaction(db) as s:
        assert s.query(User).filter_by(username="alice").one().limits is None

    result = run("alice", "--max-epochs", "0")
    assert result.exit_code == 1 and "error: max_epochs: must be positive" in result.output
    result = run("nobody", "--max-epochs", "3")
    assert result.exit_code == 1 and "no user 'nobody'" in result.output
