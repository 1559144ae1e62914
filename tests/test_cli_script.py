"""`trainyard submit --code` and `trainyard bundles` against a live server (the real app
on a socket, on both databases): the folder is packed, uploaded once, and the script
job is submitted with its entry, arguments and params."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask, request

from server.cli import main
from shared import accounts
from shared.db import transaction
from tests.conftest import SQLITE_ONLY, TestUsers


@pytest.fixture
def requests_seen(app: Flask) -> list[tuple[str, str]]:
    """(method, path) of every request the app answers, in order."""
    seen: list[tuple[str, str]] = []
    app.before_request(lambda: seen.append((request.method, request.path)) and None)
    return seen


@pytest.fixture
def cli(live_server: str, users: TestUsers):  # type: ignore[no-untyped-def]
    def run(
        *args: str,
        token: str | None = None,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Result:
        env = {
            "TRAINYARD_URL": live_server,
            "TRAINYARD_TOKEN": token or users.alice.token,
            "COLUMNS": "200",
            **(env or {}),
        }
        return CliRunner().invoke(main, list(args), env=env, input=stdin)

    return run


def grant(db_url: str, username: str) -> None:
    with transaction(db_url) as session:
        user = accounts.find_user(session, username)
        assert user is not None
        user.can_run_code = True


def make_project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "train.py").write_text("import sys\nprint(sys.argv)\n")
    (root / "data" / "big.csv").write_text("x\n" * 1000)
    (root / ".trainyardignore").write_text("data/\n")
    return root


def bundle_posts(seen: list[tuple[str, str]]) -> int:
    return seen.count(("POST", "/api/v1/bundles"))


def test_submit_code_uploads_once_and_submits_the_script_job(
    app: Flask,
    requests_seen: list[tuple[str, str]],
    cli: Any,
    users: TestUsers,
    db_url: str,
    tmp_path: Path,
) -> None:
    grant(db_url, "alice")
    project = make_project(tmp_path / "my_project")
    params_file = tmp_path / "params.json"
    params_file.write_text(json.dumps({"depth": 3, "lr": 0.1}))
    args = ("submit", "--code", str(project), "--entry", "train.py", "--param", "lr=0.01",
            "--param", "model=resnet", "--params-file", str(params_file), "--name", "mine",
            "--tag", "cli", "--priority", "7", "--max-runtime", "90m", "--gpus", "0")  # fmt: skip
    first = cli(*args, "--", "--epochs", "3", "--fast")
    assert first.exit_code == 0, first.output
    assert "Uploaded" in first.output and "as bundle" in first.output
    assert "(2 files" in first.output  # train.py, .trainyardignore: data/ left out
    assert "Submitted job" in first.output
    assert bundle_posts(requests_seen) == 1

    bundles = (
        app.test_client()
        .get("/api/v1/bundles", headers={"Authorization": f"Bearer {users.alice.token}"})
        .get_json()["bundles"]
    )
    assert len(bundles) == 1 and bundles[0]["filename"] == "my_project.tar.gz"
    job_id = int(first.output.split("Submitted job ")[1].split()[0])
    job = (
        app.test_client()
        .get(f"/api/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {users.alice.token}"})
        .get_json()
    )
    spec = job["spec"]
    assert job["kind"] == "script" and spec["bundle_id"] == bundles[0]["id"]
    assert spec["entry"] == "train.py" and spec["args"] == ["--epochs", "3", "--fast"]
    assert spec["params"] == {"depth": 3, "lr": 0.01, "model": "resnet"}
    assert spec["name"] == "mine" and spec["tags"] == ["cli"] and spec["priority"] == 7
    assert spec["max_runtime_s"] == 5400 and spec["resources"]["gpus"] == 0

    # Unchanged (a touched file and a new file under an excluded folder do not count):
    # asked by hash, not uploaded again.
    (project / "train.py").touch()
    (project / "data" / "more.csv").write_text("y\n")
    second = cli("submit", "--code", str(project), "--entry", "train.py", "-q")
    assert second.exit_code == 0, second.output
    assert second.output.strip().isdigit() and int(second.output) != job_id
    assert bundle_posts(requests_seen) == 1
    assert ("GET", "/api/v1/bundles") in requests_seen

    # A changed folder is a new bundle.
    (project / "train.py").write_text("print('changed')\n")
    third = cli("submit", "--code", str(project), "--entry", "train.py")
    assert third.exit_code == 0 and "Uploaded" in third.output, third.output
    assert bundle_posts(requests_seen) == 2


def test_submit_code_errors(cli: Any, users: TestUsers, db_url: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p")
    refused = cli("submit", "--code", str(project), "--entry", "train.py")
    assert refused.exit_code == 1 and "can_run_code" in refused.output
    grant(db_url, "alice")
    no_entry = cli("submit", "--code", str(project))
    assert no_entry.exit_code == 2 and "--code needs --entry" in no_entry.output
    missing = cli("submit", "--code", str(project), "--entry", "nope.py")
    assert missing.exit_code == 1 and "entry" in missing.output and "train.py" in missing.output
    stray = cli("submit", "spec.json", "--entry", "train.py")
    assert stray.exit_code == 2 and "--entry need --code" in stray.output
    bad_param = cli("submit", "--code", str(project), "--entry", "train.py", "--param", "x")
    assert bad_param.exit_code == 2 and "KEY=VALUE" in bad_param.output
    (project / "weights.bin").write_bytes(os.urandom(5000))
    # The CLI packs under the limit this machine's environment gives (the server's own
    # variable): a folder too large stops here, before any upload.
    too_big = cli("submit", "--code", str(project), "--entry", "train.py",
                  env={"TRAINYARD_MAX_BUNDLE_BYTES": "2048"})  # fmt: skip
    assert too_big.exit_code == 1 and "packs to more than 2,048 bytes" in too_big.output
    assert "weights.bin (5,000 bytes)" in too_big.output


def test_bundles_commands(cli: Any, users: TestUsers, db_url: str, tmp_path: Path) -> None:
    grant(db_url, "alice")
    project = make_project(tmp_path / "proj")
    added = cli("bundles", "add", str(project), "-q")
    assert added.exit_code == 0, added.output
    bundle_id = int(added.output.strip())
    again = cli("bundles", "add", str(project))
    assert again.exit_code == 0 and f"Bundle {bundle_id} has this code already" in again.output
    listed = cli("bundles", "list")
    assert listed.exit_code == 0 and "proj.tar.gz" in listed.output, listed.output
    shown = cli("bundles", "show", str(bundle_id))
    assert shown.exit_code == 0 and "train.py" in shown.output and "sha256" in shown.output
    as_json = json.loads(cli("bundles", "show", str(bundle_id), "--json").output)
    assert as_json["python_files"] == ["train.py"]
    # An archive made elsewhere goes up as it is.
    import zipfile

    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("main.py", "print(1)\n")
    zipped = cli("bundles", "add", str(archive))
    assert zipped.exit_code == 0 and "other.zip, 1 file " in zipped.output, zipped.output
    # Bob sees none of them.
    assert "No bundles." in cli("bundles", "list", token=users.bob.token).output
    hidden = cli("bundles", "show", str(bundle_id), token=users.bob.token)
    assert hidden.exit_code == 1 and "does not exist" in hidden.output
    declined = cli("bundles", "delete", str(bundle_id), stdin="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    deleted = cli("bundles", "delete", str(bundle_id), "--yes")
    assert deleted.exit_code == 0 and f"Deleted bundle {bundle_id}" in deleted.output


HELLO = """\
import argparse

from worker import sdk

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--steps", type=int, default=sdk.params.get("steps", 50))
args = parser.parse_args()
loss = 1.0
for step in range(1, args.steps + 1):
    loss *= 1 - args.lr
    sdk.log("train_loss", loss, step=step)
sdk.finish({"final_loss": round(loss, 6), "steps": args.steps})
"""


@pytest.mark.integration
@SQLITE_ONLY
def test_submit_code_runs_on_a_real_worker(
    cli: Any, start_worker: Any, users: TestUsers, db_url: str, tmp_path: Path
) -> None:
    """The folder packed here is the folder the worker runs: the CLI's pack, the API's
    check and store, and the worker's unpack agree."""
    grant(db_url, "alice")
    project = tmp_path / "hello"
    project.mkdir()
    (project / "train.py").write_text(HELLO)
    (project / "checkpoints").mkdir()  # what a local run leaves: not packed
    (project / "checkpoints" / "last.pt").write_bytes(b"\0" * 1000)
    start_worker()
    done = cli("submit", "--code", str(project), "--entry", "train.py", "--param", "steps=4",
               "--watch", "--", "--lr", "0.5")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "succeeded" in done.output and "final_loss" in done.output and "0.0625" in done.output
