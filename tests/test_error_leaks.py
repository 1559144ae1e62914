"""A failed job shows its member no server paths and no tracebacks (issue 11, "Leaks").

A job fails with an exception whose message holds absolute paths (the artifacts
directory, site-packages, a system path), after the training code logged another
exception with its traceback. Its owner, a member, reads it through the API (job,
list, log, timeline), the job page and its live stream: a clear message, paths
replaced by labels, tracebacks folded away. An admin sees the detail everywhere, and
the log file on disk keeps all of it.
"""

from __future__ import annotations

import json
import logging
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from shared.job_files import log_path
from shared.redaction import HIDDEN_NOTICE
from shared.settings import Settings
from tests.conftest import SQLITE_ONLY, as_user, settings_env
from tests.helpers import train_spec
from tests.test_authorization import session_client
from tests.test_job_page import sse
from worker import runner
from worker.runner import run_job

REPO = Path(__file__).resolve().parents[1]
SITE = site.getsitepackages()[0]


def leaky_failure(settings: Settings) -> Any:
    secret = settings.resolved_artifacts_dir / "jobs" / "private" / "weights.bin"
    system = "/srv/cluster/secrets/node-7/token.txt"

    def train_job(*_a: Any, **_k: Any) -> None:
        try:
            open(secret, "rb")  # noqa: SIM115 - fails: the file does not exist
        except OSError:
            logging.getLogger("worker.training.data").exception("could not read the weights")
        raise RuntimeError(
            f"shape mismatch loading {secret} (from {SITE}/torch/serialization.py, config {system})"
        )

    return train_job, str(secret), system


def failed_job(
    client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> tuple[int, list[str]]:  # type: ignore[no-untyped-def]
    broken, secret, system = leaky_failure(settings)
    monkeypatch.setattr(runner, "train_job", broken)
    resp = client.post("/api/v1/jobs", json=train_spec(name="leaky"))
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["id"]
    assert run_job(job_id, settings) == "failed"
    # What must not reach a member: every absolute path involved, and Python's traceback.
    secrets = [secret, system, SITE, str(settings.resolved_artifacts_dir), str(settings.home),
               "Traceback", 'File "', "site-packages"]  # fmt: skip
    return job_id, secrets


def assert_clean(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown to a member:\n{text[:3000]}"


def read_stream(client, job_id: int) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    cursor = json.dumps({"log": 0, "event": 0, "metrics": {}})
    resp = client.get(f"/jobs/{job_id}/stream?cursor={cursor}")
    assert resp.status_code == 200
    return sse(resp.get_data(as_text=True))


def test_a_member_sees_no_paths_or_tracebacks_an_admin_sees_the_detail(
    app: Flask, client, settings: Settings, db_url: str, users, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    job_id, secrets = failed_job(client, settings, monkeypatch)

    # The member who owns the job: API.
    job = client.get(f"/api/v1/jobs/{job_id}").get_json()
    assert job["error"]["type"] == "RuntimeError"
    message = job["error"]["message"]
    assert message.startswith("shape mismatch loading <artifacts>/jobs/private/weights.bin")
    assert "<python>/torch/serialization.py" in message and "<path>/token.txt" in message
    assert "detail" not in job["error"] and job["result"] is None
    assert_clean(json.dumps(job), secrets)
    assert_clean(client.get("/api/v1/jobs").get_data(as_text=True), secrets)
    assert_clean(client.get(f"/api/v1/jobs/{job_id}/events").get_data(as_text=True), secrets)
    logs = client.get(f"/api/v1/jobs/{job_id}/logs?tail=200").get_json()["lines"]
    assert_clean("\n".join(logs), secrets)
    assert any(line.endswith(HIDDEN_NOTICE) for line in logs)
    assert any("failed: RuntimeError: shape mismatch loading <artifacts>/" in x for x in logs)
    assert any("could not read the weights" in line for line in logs)

    # The job page and its live stream.
    member = session_client(app, db_url, users.alice)
    page = member.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "shape mismatch loading &lt;artifacts&gt;/jobs/private/weights.bin" in page
    assert_clean(page, secrets)
    messages = read_stream(member, job_id)
    assert {m.get("event") for m in messages} >= {"job", "log", "timeline", "end"}
    assert_clean(json.dumps(messages), secrets)

    # An admin: the detail, in the API, the log, the page and the stream.
    admin = as_user(app, users.admin)
    job = admin.get(f"/api/v1/jobs/{job_id}").get_json()
    assert secrets[0] in job["error"]["detail"] and "Traceback" in job["error"]["detail"]
    assert "error_detail" not in json.dumps(job["result"])
    logs = admin.get(f"/api/v1/jobs/{job_id}/logs?tail=200").get_json()["lines"]
    assert any("| Traceback (most recent call last):" in line for line in logs)
    assert any(secrets[0] in line for line in logs)
    page = session_client(app, db_url, users.admin).get(f"/jobs/{job_id}").get_data(as_text=True)
    assert "Traceback" in page and secrets[0] in page
    streamed = json.dumps(read_stream(session_client(app, db_url, users.admin), job_id))
    assert "Traceback" in streamed and secrets[0] in streamed

    # The log file keeps everything: both tracebacks, every path.
    on_disk = log_path(settings, job_id).read_text()
    assert on_disk.count("Traceback (most recent call last):") == 2
    assert all(s in on_disk for s in secrets[:3])


@SQLITE_ONLY
def test_the_cli_shows_a_member_the_redacted_error(
    app: Flask, client, live_server: str, settings: Settings, users, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    job_id, secrets = failed_job(client, settings, monkeypatch)
    env = settings_env(settings) | {"TRAINYARD_URL": live_server,
                                    "TRAINYARD_TOKEN": users.alice.token}  # fmt: skip
    for command in (["show", str(job_id)], ["show", str(job_id), "--json"],
                    ["watch", str(job_id)]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", *command],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode in (0, 1), done.stderr  # watch: 1 for a failed job
        assert_clean(done.stdout + done.stderr, secrets)
        assert "shape mismatch loading" in done.stdout + done.stderr, done.stdout
    # An admin's `show` adds the detail: the traceback and the real paths.
    env["TRAINYARD_TOKEN"] = users.admin.token
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "show", str(job_id)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" in done.stdout and "token.txt" in done.stdout
