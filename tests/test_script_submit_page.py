"""The "Run your code" page (/submit/script): a plain form whose bundle rides along in
the multipart POST, stored by the bundle API's view; errors named next to the input."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.db import transaction
from shared.orm import CodeBundle, Job
from tests.test_authorization import page_csrf_token, session_client
from tests.test_script_submission import grant

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def bundle_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def post(client: FlaskClient, data: dict[str, Any]) -> Any:
    return client.post(
        "/submit/script",
        data={"csrf_token": page_csrf_token(client), **data},
        content_type="multipart/form-data",
    )


def test_without_the_permission_the_page_names_it_and_takes_nothing(
    app: Flask, db_url: str, users: Any
) -> None:
    client = session_client(app, db_url, users.alice)
    got = client.get("/submit/script")
    assert got.status_code == 403
    assert "can_run_code" in got.get_data(as_text=True)
    assert 'id="script-page-link"' not in client.get("/submit").get_data(as_text=True)
    code = bundle_bytes({"train.py": b"print('hi')\n"})
    got = post(client, {"file": (io.BytesIO(code), "p.tar.gz"), "entry": "train.py"})
    assert got.status_code == 403
    with transaction(db_url) as s:
        assert s.query(Job).count() == 0 and s.query(CodeBundle).count() == 0


def test_a_bundle_and_inputs_become_a_queued_script_job(
    app: Flask, db_url: str, users: Any
) -> None:
    grant(db_url, "alice")
    client = session_client(app, db_url, users.alice)
    assert 'id="script-page-link"' in client.get("/submit").get_data(as_text=True)
    assert client.get("/submit/script").status_code == 200
    code = bundle_bytes({"train.py": b"print('hi')\n", "lib/util.py": b""})
    got = post(client, {
        "file": (io.BytesIO(code), "project.tar.gz"), "entry": "train.py",
        "args": "--lr 0.01 --note 'two words'", "params": '{"width": 64}',
        "priority": "7", "tags": "mine, nas", "name": "from the page", "memory_gb": "2",
    })  # fmt: skip
    assert got.status_code == 303, got.get_data(as_text=True)[-2000:]
    job_id = int(got.headers["Location"].rsplit("/", 1)[1])
    with transaction(db_url) as s:
        job = s.get(Job, job_id)
        bundle = s.query(CodeBundle).one()
        assert job.kind == "script" and job.name == "from the page" and job.priority == 7
        assert job.spec["args"] == ["--lr", "0.01", "--note", "two words"]
        assert job.spec["params"] == {"width": 64} and job.spec["tags"] == ["mine", "nas"]
        assert job.spec["bundle_id"] == bundle.id and job.spec["resources"]["memory_gb"] == 2
        assert sorted(bundle.python_files) == ["lib/util.py", "train.py"]
    # The bundle is offered next time; picking it needs no upload.
    page = client.get("/submit/script").get_data(as_text=True)
    assert f'<option value="{bundle.id}">bundle {bundle.id}: project.tar.gz' in page
    got = post(client, {"bundle_id": str(bundle.id), "entry": "lib/util.py"})
    assert got.status_code == 303


@pytest.mark.parametrize(
    ("inputs", "where", "says"),
    [
        ({"entry": "train.py"}, "file", "choose a .tar.gz or .zip"),
        ({"entry": "missing.py", "upload": True}, "entry", "is not in bundle"),
        ({"entry": "train.py", "upload": True, "params": "{nope"}, "params", "is not JSON"),
        ({"entry": "train.py", "upload": True, "args": "'unclosed"}, "args", "shell"),
        ({"entry": "train.py", "upload": True, "gpus": "two"}, "gpus", "whole number"),
        ({"entry": "train.py", "upload": True, "dataset": "cifar10"}, "dataset", "cifar10"),
        ({"entry": "train.py", "upload": True, "priority": "12"}, "priority", "9"),
        ({"entry": "train.py", "bad_archive": True}, "file", "not a .tar.gz or .zip"),
    ],
)
def test_problems_are_shown_next_to_the_input(
    app: Flask, db_url: str, users: Any, inputs: dict[str, Any], where: str, says: str
) -> None:
    grant(db_url, "alice")
    client = session_client(app, db_url, users.alice)
    data = {k: v for k, v in inputs.items() if k not in ("upload", "bad_archive")}
    if inputs.get("upload"):
        data["file"] = (io.BytesIO(bundle_bytes({"train.py": b""})), "p.tar.gz")
    if inputs.get("bad_archive"):
        data["file"] = (io.BytesIO(b"not an archive at all"), "p.tar.gz")
    got = post(client, data)
    page = got.get_data(as_text=True)
    assert got.status_code in (400, 413, 422), page[-1500:]
    error = page.split(f'id="s-{where}-error">', 1)
    assert len(error) == 2, page[-3000:]
    assert says in error[1].split("</p>", 1)[0]
    with transaction(db_url) as s:
        assert s.query(Job).count() == 0


def test_clone_and_edit_fills_the_page_from_a_script_job(
    app: Flask, db_url: str, users: Any
) -> None:
    grant(db_url, "alice")
    grant(db_url, "bob")
    client = session_client(app, db_url, users.alice)
    code = bundle_bytes({"train.py": b""})
    got = post(client, {
        "file": (io.BytesIO(code), "p.tar.gz"), "entry": "train.py",
        "args": "--note 'two words'", "params": '{"lr": 0.5}', "gpus": "1",
        "memory_gb": "1.5", "priority": "8", "tags": "a, b", "name": "orig",
    })  # fmt: skip
    assert got.status_code == 303
    job_id = int(got.headers["Location"].rsplit("/", 1)[1])
    assert f'href="/submit/script?clone={job_id}"' in client.get(f"/jobs/{job_id}").get_data(
        as_text=True
    )
    listed = client.get("/?kind=script").get_data(as_text=True)
    assert f"#{job_id}</span>" in listed and '<option value="script" selected' in listed
    page = client.get(f"/submit/script?clone={job_id}").get_data(as_text=True)
    for name, value in (("args", "--note &#39;two words&#39;"), ("gpus", "1"),
                        ("memory_gb", "1.5"), ("priority", "8"), ("tags", "a, b"),
                        ("name", "orig")):  # fmt: skip
        assert f'id="s-{name}" name="{name}" value="{value}"' in page, name
    assert "{&#34;lr&#34;: 0.5}</textarea>" in page
    # Someone else's job, a missing one and a train job all read alike.
    bob = session_client(app, db_url, users.bob)
    assert bob.get(f"/submit/script?clone={job_id}").status_code == 404
    assert client.get("/submit/script?clone=99999").status_code == 404
    assert client.get("/submit/script?clone=abc").status_code == 404
