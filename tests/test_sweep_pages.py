"""The sweep pages (server/web/sweep_pages.py): the form creates through the API's own
checks (a bad space refused naming the parameter, the text kept), a sweep's page ranks
its trials by the metric with the parameters as columns, the buttons cancel and resume,
and another user's sweep reads as missing. The live redraw and the charts are in
tests/browser/test_sweep_page.py."""

from __future__ import annotations

import html as html_lib
import json
import re
from datetime import timedelta
from typing import Any

import pytest
import yaml
from flask import Flask
from flask.testing import FlaskClient
from markupsafe import escape

from shared.db import transaction, utcnow
from shared.orm import Job, Sweep, SweepTrial
from shared.settings import Settings
from shared.sweep_controller import tick
from tests.conftest import TestUsers, as_user
from tests.helpers import train_spec
from tests.test_authorization import page_csrf_token, session_client

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

YAML_SPEC = """\
name: from the form
method: grid
metric: val_accuracy
parallelism: 4
base:
  kind: train
  dataset: {name: digits}
  model: {name: mlp}
  optimizer: {name: adam}
  epochs: 2
space:
  optimizer.lr: choice([0.001, 0.01])
  model.params.activation: choice([relu, gelu])
"""


def post_form(client: FlaskClient, text: str) -> Any:
    return client.post("/sweeps/new", data={"csrf_token": page_csrf_token(client), "spec": text})


def finish(db_url: str, job_id: int, value: float | None, state: str = "succeeded",
           ago_s: float = 0.0, **metrics: float) -> None:  # fmt: skip
    """A trial's job ended with `value` as its val_accuracy (as finish_job writes it)."""
    with transaction(db_url) as s:
        job = s.get(Job, job_id)
        job.state = state
        job.finished_at = utcnow() - timedelta(seconds=ago_s)
        if value is not None:
            job.result = {"metrics": {"val_accuracy": value, **metrics}}


def grid_with_trials(app: Flask, users: TestUsers, settings: Settings) -> tuple[int, list[int]]:
    alice = as_user(app, users.alice)
    body = {
        "name": "lr x act", "method": "grid", "metric": "val_accuracy", "parallelism": 4,
        "base": train_spec(epochs=2, optimizer={"name": "adam"}),
        "space": {"optimizer.lr": "choice([0.001, 0.01])",
                  "model.params.activation": "choice([relu, gelu])"},
    }  # fmt: skip
    got = alice.post("/api/v1/sweeps", json=body)
    assert got.status_code == 201, got.json
    sweep_id = got.json["id"]
    assert tick(settings, sweep_id, "test", lambda job: None).created == [0, 1, 2, 3]
    trials = alice.get(f"/api/v1/sweeps/{sweep_id}").json["trials"]
    return sweep_id, [t["job_id"] for t in trials]


def test_the_form_creates_a_sweep_through_the_api_checks(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    client = session_client(app, db_url, users.alice)
    form = client.get("/sweeps/new")
    assert form.status_code == 200
    assert "loguniform(1e-4, 1e-1)" in form.get_data(as_text=True)  # the example to edit
    got = post_form(client, YAML_SPEC)
    assert got.status_code == 303, got.get_data(as_text=True)[-3000:]
    sweep_id = int(got.headers["Location"].rsplit("/", 1)[1])
    with transaction(db_url) as s:
        sweep = s.get(Sweep, sweep_id)
        assert (sweep.owner_id, sweep.name, sweep.state) == (
            users.alice.id,
            "from the form",
            "running",
        )
        assert sweep.spec["max_trials"] == 4  # a grid's size
    page = client.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    assert f"Sweep #{sweep_id} created" in page and "No trials yet" in page
    assert 'id="sweep-cancel"' in page
    listing = client.get("/sweeps").get_data(as_text=True)
    assert f'data-sweep-id="{sweep_id}"' in listing and "from the form" in listing
    # JSON is YAML too.
    spec = {"method": "random", "metric": "val_loss", "max_trials": 2,
            "base": train_spec(epochs=2), "space": {"epochs": "int(1, 3)"}}  # fmt: skip
    assert post_form(client, json.dumps(spec)).status_code == 303


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (YAML_SPEC.replace("choice([relu, gelu])", "choice([relu, swish])"),
         "space.model.params.activation", "swish"),
        (YAML_SPEC + "  model.params.layers: int(0, 3)\n", "space.model.params.layers",
         "can produce 0"),
        (YAML_SPEC.replace("method: grid", "method: annealing"), "method", "grid"),
        ("base: [unclosed", "spec", "line 1"),
        ("- just\n- a list\n", "spec", "must be a mapping"),
    ],
)  # fmt: skip
def test_the_form_refuses_a_bad_spec_naming_the_field_and_keeps_the_text(
    app: Flask, db_url: str, users: TestUsers, text: str, field: str, words: str
) -> None:
    client = session_client(app, db_url, users.alice)
    got = post_form(client, text)
    html = got.get_data(as_text=True)
    assert got.status_code == 422, html[-2000:]
    match = re.search(rf'<li class="field-error" data-field="{re.escape(field)}">(.*?)</li>', html)
    assert match, html[-3000:]
    assert words in match.group(1)
    assert 'aria-invalid="true"' in html
    # What the user wrote comes back to fix, escaped.
    assert str(escape(text.splitlines()[0])) in html
    with transaction(db_url) as s:
        assert s.query(Sweep).count() == 0


def test_an_expired_form_is_refused_and_keeps_the_text(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    client = session_client(app, db_url, users.alice)
    got = client.post("/sweeps/new", data={"spec": YAML_SPEC})
    assert got.status_code == 400
    assert "from the form" in got.get_data(as_text=True)
    with transaction(db_url) as s:
        assert s.query(Sweep).count() == 0


def test_the_page_ranks_trials_best_first_with_parameters_as_columns(
    app: Flask, db_url: str, users: TestUsers, settings: Settings
) -> None:
    sweep_id, jobs = grid_with_trials(app, users, settings)
    finish(db_url, jobs[0], 0.5, ago_s=30, num_parameters=9034, samples_per_s=41210.5)
    finish(db_url, jobs[1], 0.9, ago_s=20)
    finish(db_url, jobs[2], 0.7, ago_s=10)
    with transaction(db_url) as s:  # trial 3 is still running
        s.get(Job, jobs[3]).state = "running"
    client = session_client(app, db_url, users.alice)
    html = client.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    order = [int(n) for n in re.findall(r'class="trial-row[^"]*" data-trial="(\d+)"', html)]
    assert order == [1, 2, 0, 3]  # 0.9, 0.7, 0.5, then the one without a value
    assert re.search(r'class="trial-row is-best" data-trial="1"', html)
    assert f'id="best-trial-link" href="/jobs/{jobs[1]}"' in html
    columns = re.findall(r'<th scope="col" class="param-col" data-path="([^"]+)"', html)
    with transaction(db_url) as s:  # in the space's order (the test client sorts JSON keys)
        assert columns == list(s.get(Sweep, sweep_id).spec["space"])
    assert sorted(columns) == ["model.params.activation", "optimizer.lr"]
    row0 = re.search(r'data-trial="0".*?</tr>', html, re.S).group(0)  # type: ignore[union-attr]
    assert ">0.001<" in row0 and ">relu<" in row0 and ">9,034<" in row0 and ">41,210<" in row0
    counts = dict(re.findall(r'<li data-count="(\w+)"><span class="count-n">(\d+)</span>', html))
    assert counts == {"queued": "0", "running": "1", "succeeded": "3", "pruned": "0",
                      "failed": "0", "cancelled": "0"}  # fmt: skip
    # The page hands its script the API's JSON and the chart axes.
    block = re.search(r'<script type="application/json" id="sweep-data">(.*?)</script>', html, re.S)
    data = json.loads(block.group(1))  # type: ignore[union-attr]
    assert data["sweep"]["best"]["number"] == 1 and len(data["sweep"]["trials"]) == 4
    assert {"path": "optimizer.lr", "type": "choice", "values": [0.001, 0.01]} in data["axes"]
    assert all(t["finished_at"] for t in data["sweep"]["trials"][:3])
    # A trial's job page links back to its sweep.
    job_page = client.get(f"/jobs/{jobs[1]}").get_data(as_text=True)
    assert f'id="sweep-link" href="/sweeps/{sweep_id}"' in job_page
    assert "trial 1 of lr x act" in job_page


def test_a_pruned_trial_says_so_and_a_minimizing_sweep_ranks_low_first(
    app: Flask, db_url: str, users: TestUsers, settings: Settings
) -> None:
    alice = as_user(app, users.alice)
    body = {"method": "grid", "metric": "val_loss", "parallelism": 3,
            "base": train_spec(epochs=2), "space": {"epochs": "choice([1, 2, 3])"}}  # fmt: skip
    sweep_id = alice.post("/api/v1/sweeps", json=body).json["id"]
    tick(settings, sweep_id, "test", lambda job: None)
    jobs = [t["job_id"] for t in alice.get(f"/api/v1/sweeps/{sweep_id}").json["trials"]]
    for job_id, loss in zip(jobs, (0.3, 0.1, None), strict=True):
        with transaction(db_url) as s:
            job = s.get(Job, job_id)
            job.state, job.finished_at = (
                ("succeeded", utcnow()) if loss else ("cancelled", utcnow())
            )
            job.result = {"metrics": {"val_loss": loss}} if loss else None
            if loss is None:
                trial = s.query(SweepTrial).filter_by(job_id=job_id).one()
                trial.pruned_at_epoch, trial.prune_reason = 1, "pruned by the sweep at epoch 1"
    html = (
        session_client(app, db_url, users.alice).get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    )
    order = [int(n) for n in re.findall(r'class="trial-row[^"]*" data-trial="(\d+)"', html)]
    assert order == [1, 0, 2]
    assert "pruned at epoch 1" in html and "badge state-pruned" in html


def test_cancel_and_resume_buttons(
    app: Flask, db_url: str, users: TestUsers, settings: Settings
) -> None:
    sweep_id, jobs = grid_with_trials(app, users, settings)
    client = session_client(app, db_url, users.alice)
    token = page_csrf_token(client)
    got = client.post(f"/sweeps/{sweep_id}/cancel", data={"csrf_token": token})
    assert got.status_code == 303 and got.headers["Location"] == f"/sweeps/{sweep_id}"
    page = client.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    assert f"Sweep #{sweep_id} cancelled" in page and 'id="sweep-resume"' in page
    with transaction(db_url) as s:
        assert s.get(Sweep, sweep_id).state == "cancelled"
        assert {s.get(Job, j).state for j in jobs} == {"cancelled"}  # they were queued
    # Again: it says why nothing happened.
    client.post(f"/sweeps/{sweep_id}/cancel", data={"csrf_token": token})
    assert "it cannot be cancelled" in client.get(f"/sweeps/{sweep_id}").get_data(as_text=True)
    got = client.post(f"/sweeps/{sweep_id}/resume", data={"csrf_token": token})
    assert got.status_code == 303
    with transaction(db_url) as s:
        assert s.get(Sweep, sweep_id).state == "running"
    # No token: nothing changes.
    client.post(f"/sweeps/{sweep_id}/cancel", data={})
    with transaction(db_url) as s:
        assert s.get(Sweep, sweep_id).state == "running"


def test_another_users_sweep_reads_as_missing(
    app: Flask, db_url: str, users: TestUsers, settings: Settings
) -> None:
    sweep_id, _ = grid_with_trials(app, users, settings)
    bob = session_client(app, db_url, users.bob)
    got = bob.get(f"/sweeps/{sweep_id}")
    assert got.status_code == 404 and f"Sweep #{sweep_id} not found" in got.get_data(as_text=True)
    assert bob.get("/sweeps/999999").get_data(as_text=True).count("not found") >= 1
    token = page_csrf_token(bob)
    assert bob.post(f"/sweeps/{sweep_id}/cancel", data={"csrf_token": token}).status_code == 404
    with transaction(db_url) as s:
        assert s.get(Sweep, sweep_id).state == "running"
    assert f'data-sweep-id="{sweep_id}"' not in bob.get("/sweeps").get_data(as_text=True)
    admin = session_client(app, db_url, users.admin)
    assert f'data-sweep-id="{sweep_id}"' in admin.get("/sweeps").get_data(as_text=True)
    assert admin.get(f"/sweeps/{sweep_id}").status_code == 200


def test_a_sweep_from_a_job_starts_from_its_spec(app: Flask, db_url: str, users: TestUsers) -> None:
    alice = as_user(app, users.alice)
    job_id = alice.post("/api/v1/jobs", json=train_spec(name="base run", epochs=3)).json["id"]
    client = session_client(app, db_url, users.alice)
    job_page = client.get(f"/jobs/{job_id}").get_data(as_text=True)
    assert f'id="action-sweep" class="btn" href="/sweeps/new?from_job={job_id}"' in job_page
    form = client.get(f"/sweeps/new?from_job={job_id}")
    assert form.status_code == 200
    text = re.search(
        r'<textarea id="sweep-spec"[^>]*>(.*?)</textarea>', form.get_data(as_text=True), re.S
    )
    spec = yaml.safe_load(html_lib.unescape(text.group(1)))  # type: ignore[union-attr]
    assert spec["base"]["epochs"] == 3 and spec["base"]["optimizer"]["name"]
    assert "name" not in spec["base"] and spec["space"] == {
        "optimizer.lr": "loguniform(1e-4, 1e-1)"
    }
    # As written, it creates a sweep.
    assert post_form(client, html_lib.unescape(text.group(1))).status_code == 303  # type: ignore[union-attr]
    bob = session_client(app, db_url, users.bob)
    assert bob.get(f"/sweeps/new?from_job={job_id}").status_code == 404
    assert bob.get("/sweeps/new?from_job=abc").status_code == 404
