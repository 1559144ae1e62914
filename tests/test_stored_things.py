"""Issue 11, "Uploads and other stored things": per-user quotas and rates on uploads and
API tokens (server/quotas.py), and deleting uploads and finished jobs' files
(server/deletion.py) through the API and the pages.

Each attack is reproduced first: before these limits one member could keep uploading
(filling the disk) and minting tokens without end, and nothing could be deleted.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask

from shared import job_files
from shared.db import transaction, utcnow
from shared.orm import Job, User
from shared.settings import Settings
from tests.conftest import TestUsers, as_user
from tests.helpers import evaluate_spec, train_spec


def error_fields(resp: Any) -> dict[str, str]:
    return resp.get_json()["error"]["fields"]


CSV = b"x1,x2,label\n0.1,0.2,a\n0.3,0.4,b\n0.5,0.6,a\n0.7,0.8,b\n"


def make_app(settings: Settings, **limits: Any) -> Flask:
    from server.app import create_app

    return create_app(settings.model_copy(update=limits), {"TESTING": True})


def upload(client: Any, body: bytes = CSV, multipart: bool = False) -> Any:
    if multipart:
        import io

        return client.post("/api/v1/uploads", data={"file": (io.BytesIO(body), "f.csv")})
    return client.post("/api/v1/uploads?filename=f.csv", data=body, content_type="text/csv")


# ---------------------------------------------------------------- quotas and rates


def test_upload_count_quota_names_the_field_and_frees_on_delete(
    settings: Settings, users: TestUsers
) -> None:
    app = make_app(settings, max_uploads_per_user=2)
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    first = upload(alice).get_json()["id"]
    assert upload(alice).status_code == 201
    refused = upload(alice)
    assert refused.status_code == 409, refused.get_json()
    assert "max_uploads_per_user" in error_fields(refused)
    assert upload(bob).status_code == 201  # per user
    assert alice.delete(f"/api/v1/uploads/{first}").status_code == 200
    assert upload(alice).status_code == 201


@pytest.mark.parametrize("multipart", [False, True])
def test_upload_bytes_quota_is_413_naming_the_field(
    settings: Settings, users: TestUsers, multipart: bool
) -> None:
    body = CSV + b"0.9,1.0,a\n" * 100  # ~1.1 KB
    app = make_app(settings, max_upload_bytes_per_user=2 * len(body) - 1)
    alice = as_user(app, users.alice)
    assert upload(alice, body, multipart).status_code == 201
    refused = upload(alice, body, multipart)
    assert refused.status_code == 413, refused.get_json()
    assert "max_upload_bytes_per_user" in error_fields(refused)
    assert len(alice.get("/api/v1/uploads").get_json()["uploads"]) == 1
    # Nothing left behind by the refused one: only the first upload's file.
    assert [p.name for p in settings.uploads_dir.iterdir()] == ["1.cols"]


def test_upload_rate_limit_is_429_with_retry_after(settings: Settings, users: TestUsers) -> None:
    app = make_app(settings, upload_rate_limit="2/minute")
    alice = as_user(app, users.alice)
    assert [upload(alice).status_code for _ in range(2)] == [201, 201]
    refused = upload(alice)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "upload_rate_limit" in error_fields(refused)
    assert upload(as_user(app, users.bob)).status_code == 201


def test_token_quota_and_rate(settings: Settings, users: TestUsers, db_url: str) -> None:
    app = make_app(settings, max_tokens_per_user=3, token_rate_limit="3/minute")
    alice = as_user(app, users.alice)  # she has one token already (the tests')
    made = [alice.post("/api/v1/tokens", json={"name": f"t{i}"}) for i in range(2)]
    assert [r.status_code for r in made] == [201, 201]
    refused = alice.post("/api/v1/tokens", json={"name": "one too many"})
    assert refused.status_code == 409 and "max_tokens_per_user" in error_fields(refused)
    assert alice.delete(f"/api/v1/tokens/{made[0].get_json()['id']}").status_code == 200
    assert alice.post("/api/v1/tokens", json={"name": "after revoke"}).status_code == 201
    # Revoking frees the count, but not the rate: three creations a minute at most.
    assert alice.delete(f"/api/v1/tokens/{made[1].get_json()['id']}").status_code == 200
    limited = alice.post("/api/v1/tokens", json={"name": "too fast"})
    assert limited.status_code == 429 and "token_rate_limit" in error_fields(limited)


def test_an_admins_override_in_users_limits_raises_a_quota(
    settings: Settings, users: TestUsers, db_url: str
) -> None:
    app = make_app(settings, max_uploads_per_user=1)
    alice = as_user(app, users.alice)
    assert upload(alice).status_code == 201
    assert upload(alice).status_code == 409
    with transaction(db_url) as s:
        s.get(User, users.alice.id).limits = {"max_uploads_per_user": 3}
    assert upload(alice).status_code == 201


def test_bad_rate_settings_fail_at_start_naming_the_variable(settings: Settings) -> None:
    with pytest.raises(ValueError, match="TRAINYARD_UPLOAD_RATE_LIMIT"):
        make_app(settings, upload_rate_limit="lots")


# ---------------------------------------------------------------- deleting uploads


def test_delete_upload_refused_while_a_queued_job_uses_it(
    app: Flask, settings: Settings, users: TestUsers
) -> None:
    alice, admin = as_user(app, users.alice), as_user(app, users.admin)
    upload_id = upload(alice, CSV + b"0.9,1.0,a\n0.2,0.1,b\n" * 10).get_json()["id"]
    spec = train_spec(
        model={"name": "mlp"},
        dataset={"name": "csv", "params": {"upload_id": upload_id, "target": "label"}},
    )
    job = alice.post("/api/v1/jobs", json=spec)
    assert job.status_code == 201, job.get_json()
    for client in (alice, admin):  # not even an admin: the job would fail
        refused = client.delete(f"/api/v1/uploads/{upload_id}")
        assert refused.status_code == 409, refused.get_json()
        assert str(job.get_json()["id"]) in error_fields(refused)["upload_id"]
    assert alice.post(f"/api/v1/jobs/{job.get_json()['id']}/cancel").status_code == 200
    deleted = admin.delete(f"/api/v1/uploads/{upload_id}")  # an admin may delete anyone's
    assert deleted.status_code == 200 and deleted.get_json()["freed_bytes"] > 0
    assert not any(settings.uploads_dir.glob(f"{upload_id}.*"))
    assert alice.get(f"/api/v1/uploads/{upload_id}").status_code == 404
    assert alice.delete(f"/api/v1/uploads/{upload_id}").status_code == 404
    # The finished job stays; retrying it now fails at submission, naming the upload.
    retry = alice.post(f"/api/v1/jobs/{job.get_json()['id']}/retry")
    assert retry.status_code == 422 and "dataset.params.upload_id" in error_fields(retry)


def test_an_old_csv_upload_is_deleted_too(app: Flask, settings: Settings, users: TestUsers) -> None:
    alice = as_user(app, users.alice)
    upload_id = upload(alice).get_json()["id"]
    (settings.uploads_dir / f"{upload_id}.cols").rename(settings.uploads_dir / f"{upload_id}.csv")
    assert alice.delete(f"/api/v1/uploads/{upload_id}").status_code == 200
    assert not any(settings.uploads_dir.glob(f"{upload_id}.*"))


# ---------------------------------------------------------------- deleting a job's files


def finished_job_with_files(client: Any, settings: Settings, db_url: str) -> int:
    job_id = client.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    directory = job_files.job_dir(settings, job_id)
    (directory / "attempt-1").mkdir(parents=True)
    (directory / "attempt-1" / "best.pt").write_bytes(b"x" * 1000)
    (directory / "export.onnx").write_bytes(b"y" * 10)
    job_files.log_path(settings, job_id).write_text("epoch 1\n")
    with transaction(db_url) as s:
        row = s.get(Job, job_id)
        row.state, row.attempt, row.finished_at = "succeeded", 1, utcnow()
        row.checkpoint_path = str(directory / "attempt-1" / "best.pt")
    return job_id


def test_delete_a_finished_jobs_files_and_every_view_says_so(
    app: Flask, settings: Settings, users: TestUsers, db_url: str
) -> None:
    alice = as_user(app, users.alice)
    queued = alice.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    refused = alice.delete(f"/api/v1/jobs/{queued}/artifacts")
    assert refused.status_code == 409 and "state" in error_fields(refused)

    job_id = finished_job_with_files(alice, settings, db_url)
    deleted = alice.delete(f"/api/v1/jobs/{job_id}/artifacts")
    assert deleted.status_code == 200, deleted.get_json()
    assert deleted.get_json()["freed_bytes"] == 1000 + 10 + len("epoch 1\n")
    assert not job_files.job_dir(settings, job_id).exists()
    when = deleted.get_json()["artifacts_deleted_at"]
    assert alice.get(f"/api/v1/jobs/{job_id}").get_json()["artifacts_deleted_at"] == when
    listing = alice.get(f"/api/v1/jobs/{job_id}/artifacts").get_json()
    assert listing == {"job_id": job_id, "artifacts": [], "artifacts_deleted_at": when}
    gone = alice.get(f"/api/v1/jobs/{job_id}/artifacts/attempt-1/best.pt")
    assert gone.status_code == 410 and gone.get_json()["error"]["code"] == "artifacts_deleted"
    assert alice.get(f"/api/v1/jobs/{job_id}/logs").get_json()["artifacts_deleted_at"] == when
    events = alice.get(f"/api/v1/jobs/{job_id}/events").get_json()["events"]
    assert "artifacts_deleted" in [e["kind"] for e in events]
    # Its checkpoint is gone, so it cannot be evaluated: said at submission.
    evaluate = alice.post("/api/v1/jobs", json=evaluate_spec(job_id))
    assert evaluate.status_code == 422 and "deleted" in error_fields(evaluate)["source_job_id"]
    again = alice.delete(f"/api/v1/jobs/{job_id}/artifacts")  # harmless
    assert again.status_code == 200 and again.get_json()["artifacts_deleted_at"] == when


def test_files_an_evaluation_waits_for_are_not_deleted(
    app: Flask, settings: Settings, users: TestUsers, db_url: str
) -> None:
    alice = as_user(app, users.alice)
    job_id = finished_job_with_files(alice, settings, db_url)
    evaluation = alice.post("/api/v1/jobs", json=evaluate_spec(job_id))
    assert evaluation.status_code == 201, evaluation.get_json()
    refused = alice.delete(f"/api/v1/jobs/{job_id}/artifacts")
    assert refused.status_code == 409 and "job_id" in error_fields(refused)
    assert (job_files.job_dir(settings, job_id) / "attempt-1" / "best.pt").exists()


def _csrf(client: Any, path: str) -> str:
    html = client.get(path).get_data(as_text=True)
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_pages_delete_with_csrf_and_show_the_result(
    app: Flask, settings: Settings, users: TestUsers, db_url: str
) -> None:
    from tests.test_authorization import session_client

    alice_api = as_user(app, users.alice)
    job_id = finished_job_with_files(alice_api, settings, db_url)
    upload_id = upload(alice_api).get_json()["id"]
    page = session_client(app, db_url, users.alice)
    # Without the CSRF token nothing is deleted.
    page.post(f"/jobs/{job_id}/artifacts/delete")
    page.post(f"/uploads/{upload_id}/delete")
    assert job_files.job_dir(settings, job_id).exists()
    assert alice_api.get(f"/api/v1/uploads/{upload_id}").status_code == 200

    html = page.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="action-delete-artifacts"' in html and "data-confirm" in html
    token = _csrf(page, f"/jobs/{job_id}")
    resp = page.post(f"/jobs/{job_id}/artifacts/delete", data={"csrf_token": token})
    assert resp.status_code == 303
    html = page.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert 'id="artifacts-deleted"' in html and 'id="action-delete-artifacts"' not in html

    uploads_html = page.get("/uploads").get_data(as_text=True)
    assert f'id="upload-{upload_id}"' in uploads_html and "data-confirm" in uploads_html
    resp = page.post(f"/uploads/{upload_id}/delete", data={"csrf_token": _csrf(page, "/uploads")})
    assert resp.status_code == 303
    assert f'id="upload-{upload_id}"' not in page.get("/uploads").get_data(as_text=True)
    # Another user's upload: the not-found page, as for one that never existed.
    bob_upload = upload(as_user(app, users.bob)).get_json()["id"]
    resp = page.post(f"/uploads/{bob_upload}/delete", data={"csrf_token": _csrf(page, "/uploads")})
    assert resp.status_code == 404 and "Upload" in resp.get_data(as_text=True)


# ---------------------------------------------------------------- the CLI


def test_cli_uploads_lists_and_deletes(
    app: Flask, live_server: str, settings: Settings, users: TestUsers, db_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from server.cli import main

    env = {"TRAINYARD_URL": live_server, "TRAINYARD_TOKEN": users.alice.token, "COLUMNS": "200"}

    def run(*args: str, stdin: str | None = None):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(main, list(args), env=env, input=stdin)

    path = tmp_path / "houses.csv"
    path.write_bytes(CSV)
    added = run("upload", "add", str(path), "-q")
    assert added.exit_code == 0, added.output
    upload_id = int(added.output.strip())
    listed = run("upload", "list")
    assert listed.exit_code == 0 and "houses.csv" in listed.output and "4 rows" in listed.output
    declined = run("upload", "delete", str(upload_id), stdin="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    deleted = run("upload", "delete", str(upload_id), "--yes")
    assert deleted.exit_code == 0 and f"Deleted upload {upload_id}" in deleted.output
    missing = run("upload", "delete", str(upload_id), "--yes")
    assert missing.exit_code == 1 and "does not exist" in missing.output

    job_id = finished_job_with_files(as_user(app, users.alice), settings, db_url)
    confirmed = run("artifacts", "delete", str(job_id), stdin="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert f"Deleted the files of job {job_id}" in confirmed.output
    assert not job_files.job_dir(settings, job_id).exists()


# ---------------------------------------------------------------- column search


def test_column_search_ranks_exact_then_prefix_then_substring(app: Flask, users: TestUsers) -> None:
    alice = as_user(app, users.alice)
    header = b"xa,ax,x,bxb,y\n1,2,3,4,5\n"
    upload_id = upload(alice, header).get_json()["id"]
    found = alice.get(f"/api/v1/uploads/{upload_id}/columns?q=X").get_json()
    assert found["total"] == 4
    assert [c["name"] for c in found["columns"]] == ["x", "xa", "ax", "bxb"]
    first = alice.get(f"/api/v1/uploads/{upload_id}/columns?q=x&limit=1").get_json()
    assert first["total"] == 4 and [c["name"] for c in first["columns"]] == ["x"]
    bad = alice.get(f"/api/v1/uploads/{upload_id}/columns?limit=0")
    assert bad.status_code == 400 and "limit" in error_fields(bad)
    assert as_user(app, users.bob).get(f"/api/v1/uploads/{upload_id}/columns").status_code == 404


def test_temporary_files_of_a_dead_upload_are_swept(
    app: Flask, settings: Settings, users: TestUsers
) -> None:
    import os

    settings.uploads_dir.mkdir(parents=True)
    stale = settings.uploads_dir / ".incoming.123.abc.tmp"  # a web process killed mid-upload
    fresh = settings.uploads_dir / ".incoming.456.def.tmp"  # one still being received
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y")
    os.utime(stale, (1, 1))
    assert upload(as_user(app, users.alice)).status_code == 201
    assert not stale.exists() and fresh.exists()
