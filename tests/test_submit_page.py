"""The Submit page (/submit): a form built from the registries, posted as a browser would.

Forms are read from the rendered HTML and sent back as a browser sends them: without JS
every group's inputs go (the server picks the selected choice's), with JS only the
inputs of visible groups (the page disables the rest; the server-rendered `hidden`
attributes are what the page's JS starts from).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from html import unescape
from html.parser import HTMLParser
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import MultiDict
from werkzeug.test import TestResponse

from shared import job_files
from shared.dataset_catalog import DATASETS
from shared.db import transaction, utcnow
from shared.model_catalog import ACTIVATIONS, MODELS
from shared.orm import Job, Upload
from shared.settings import Settings
from tests.conftest import as_user
from tests.helpers import train_spec, without_csrf_token
from tests.test_authorization import session_client

# For what does not depend on the database: the form, its errors, CSRF (each PostgreSQL
# database costs about a second to create and drop).
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}  # fmt: skip
CSV = "x1,x2,label\n" + "".join(f"{i * 0.1:.1f},{i % 3},{'ab'[i % 2]}\n" for i in range(20))


@dataclass
class Control:
    tag: str
    attrs: dict[str, str]
    hidden: bool  # inside an element the server rendered `hidden`
    options: list[tuple[str, bool]] = field(default_factory=list)  # (value, selected)

    @property
    def id(self) -> str:
        return self.attrs.get("id", "")

    @property
    def value(self) -> str:
        if self.tag == "select":
            chosen = [v for v, selected in self.options if selected]
            return chosen[-1] if chosen else (self.options[0][0] if self.options else "")
        return self.attrs.get("value", "")


class FormReader(HTMLParser):
    """The controls of form#submit-form, and every element id on the page."""

    def __init__(self, html: str):
        super().__init__()
        self.stack: list[tuple[str, bool]] = []
        self.controls: list[Control] = []
        self.ids: dict[str, dict[str, str]] = {}
        self._select: Control | None = None
        self._in_form = False
        self.feed(html)

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attr_list}
        hidden = "hidden" in attrs or (bool(self.stack) and self.stack[-1][1])
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
        if tag == "form" and attrs.get("id") == "submit-form":
            self._in_form = True
        if tag == "option" and self._select is not None:
            self._select.options.append((attrs.get("value", ""), "selected" in attrs))
        if self._in_form and tag in ("input", "select"):
            control = Control(tag, attrs, hidden)
            self.controls.append(control)
            if tag == "select":
                self._select = control
        if tag not in VOID:
            self.stack.append((tag, hidden))

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None
        if tag == "form":
            self._in_form = False
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def fields(self, js: bool) -> list[list[str]]:
        """[name, value, id] as a browser submits them, with or without the page's JS."""
        out = []
        for c in self.controls:
            kind = c.attrs.get("type", "text")
            if (js and c.hidden) or kind == "file" or "disabled" in c.attrs:
                continue
            if kind in ("checkbox", "radio") and "checked" not in c.attrs:
                continue
            out.append([c.attrs["name"], c.value, c.id])
        return out

    def control(self, control_id: str) -> Control:
        return next(c for c in self.controls if c.id == control_id)


def page(client: FlaskClient, path: str = "/submit") -> tuple[TestResponse, FormReader]:
    resp = client.get(path)
    return resp, FormReader(resp.get_data(as_text=True))


def set_value(fields: list[list[str]], control_id: str, value: str) -> None:
    for entry in fields:
        if entry[2] == control_id:
            entry[1] = value
            return
    raise AssertionError(f"no submitted input {control_id}")


def set_name(fields: list[list[str]], name: str, value: str) -> None:
    """Every input of that name (a radio group, or every group's copy without JS)."""
    hits = [entry for entry in fields if entry[0] == name]
    assert hits, name
    for entry in hits:
        entry[1] = value


def post(client: FlaskClient, fields: list[list[str]], **files: Any) -> TestResponse:
    data = MultiDict([(name, value) for name, value, _ in fields])
    for name, file in files.items():
        data.add(name, file)
    return client.post("/submit", data=data, content_type="multipart/form-data")


def errors_text(html: str) -> dict[str, str]:
    found = re.findall(r'<p class="field-error" id="([^"]+)-error">([^<]*)</p>', html)
    return {target: unescape(text) for target, text in found}


def job_from(resp: TestResponse, db_url: str) -> Job:
    assert resp.status_code == 302, resp.get_data(as_text=True)[:3000]
    match = re.fullmatch(r"/jobs/(\d+)", resp.headers["Location"])
    assert match, resp.headers["Location"]
    with transaction(db_url) as s:
        job = s.get(Job, int(match.group(1)))
        assert job is not None
        s.expunge(job)
    return job


@pytest.fixture
def alice(app: Flask, db_url: str, users) -> FlaskClient:  # type: ignore[no-untyped-def]
    return session_client(app, db_url, users.alice)


def succeeded_train_job(app: Flask, settings: Settings, db_url: str, user: Any) -> int:
    resp = as_user(app, user).post("/api/v1/jobs", json=train_spec(name=f"{user.username}-run"))
    assert resp.status_code == 201, resp.get_json()
    job_id = resp.get_json()["id"]
    with transaction(db_url) as s:
        row = s.get(Job, job_id)
        row.state, row.attempt, row.finished_at = "succeeded", 1, utcnow()
        row.checkpoint_path = str(job_files.job_dir(settings, job_id) / "attempt-1/best.pt")
        row.result = {"metrics": {"val_accuracy": 0.97}}
    return job_id


# ---------------------------------------------------------------- the form


@SQLITE_ONLY
def test_form_is_built_from_the_registries(alice: FlaskClient) -> None:
    resp, form = page(alice)
    assert resp.status_code == 200
    assert "Content-Security-Policy" in resp.headers
    names = {c.attrs.get("name") for c in form.controls}
    # Every model's parameters, each in its own group with ids from the spec path: a
    # model added to the registry shows up here without a change to the page.
    for model, entry in MODELS.items():
        assert f"g-train-model-{model}" in form.ids, model
        for param in entry.params.model_fields:
            assert f"f-train-model-{model}-params-{param}" in form.ids, (model, param)
            assert f"model.params.{param}" in names
    datasets = dict(form.control("f-train-dataset-name").options)
    for dataset, entry in DATASETS.items():
        assert dataset in datasets, dataset
        for param in entry.params.model_fields:
            assert f"f-train-dataset-{dataset}-params-{param}" in form.ids, (dataset, param)
            assert f"f-evaluate-dataset-{dataset}-params-{param}" in form.ids, (dataset, param)
    for key in ("optimizer.lr", "schedule.name", "epochs", "batch_size", "seed", "resources.gpus",
                "priority", "tags", "early_stopping.patience", "loss.name", "dataset.val_fraction",
                "dataset.augment.hflip", "source_job_id", "checkpoint", "dataset.split"):  # fmt: skip
        assert key in names, key

    # Labels, help, ranges and types come from the schema.
    epochs = form.control("f-train-epochs").attrs
    assert (epochs["type"], epochs["value"], epochs["min"], epochs["max"]) == (
        "number",
        "10",
        "1",
        "10000",
    )
    assert form.ids["f-train-epochs-help"] is not None
    assert form.control("f-train-model-cnn-params-batch_norm").attrs["type"] == "checkbox"
    assert [v for v, _ in form.control("f-train-precision").options] == ["fp32", "bf16", "fp16"]

    # The defaults make a good first job: train a CNN on digits.
    assert "checked" in form.control("f-kind-train").attrs
    assert form.control("f-train-dataset-name").value == "digits"
    assert form.control("f-train-model-name").value == "cnn"
    assert not form.control("f-train-model-cnn-params-hidden").hidden
    assert form.control("f-train-model-mlp-params-hidden").hidden
    assert form.control("f-evaluate-batch_size").hidden


def test_submitting_creates_a_job_owned_by_the_user(alice: FlaskClient, db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    for js in (False, True):
        _, form = page(alice)
        fields = form.fields(js=js)
        set_value(fields, "f-name", f"defaults, js={js}")
        set_value(fields, "f-tags", "web, first")
        job = job_from(post(alice, fields), db_url)
        assert job.owner_id == users.alice.id
        assert (job.kind, job.model_name, job.dataset_name, job.state) == (
            "train", "cnn", "digits", "queued",
        )  # fmt: skip
        assert job.spec["name"] == f"defaults, js={js}" and job.spec["tags"] == ["web", "first"]
        assert job.spec["epochs"] == 10 and job.spec["model"]["params"]["dropout"] == 0.5
        assert job.spec["optimizer"] == {"name": "adam", "lr": 0.001, "weight_decay": 0.0,
                                         "betas": [0.9, 0.999]}  # fmt: skip
        assert f"Job {job.id} submitted." in alice.get("/submit").get_data(as_text=True)

    # Without JS every group's inputs arrive: the chosen model's and optimizer's count.
    fields = form.fields(js=False)
    set_name(fields, "dataset.name", "iris")
    set_name(fields, "model.name", "mlp")
    set_value(fields, "f-train-model-mlp-params-hidden", "48")
    set_value(fields, "f-train-model-cnn-params-hidden", "999")  # not the chosen model's
    set_name(fields, "optimizer.name", "sgd")
    set_value(fields, "f-train-optimizer-sgd-momentum", "0.9")
    nesterov = "f-train-optimizer-sgd-nesterov"
    fields.append(["optimizer.nesterov", nesterov, nesterov])  # a checked box sends its id
    fields.append(["early_stopping", "f-train-early_stopping", "f-train-early_stopping"])
    set_value(fields, "f-train-early_stopping-patience", "3")
    set_value(fields, "f-train-grad_clip_norm", "1.5")
    spec = job_from(post(alice, fields), db_url).spec
    assert spec["model"]["name"] == "mlp" and spec["model"]["params"]["hidden"] == 48
    assert spec["dataset"]["name"] == "iris"
    assert spec["optimizer"] == {"name": "sgd", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9,
                                 "nesterov": True}  # fmt: skip
    assert spec["early_stopping"]["patience"] == 3 and spec["grad_clip_norm"] == 1.5
    assert spec["max_runtime_s"] == 6 * 3600  # left empty: a member's default (shared/limits.py)


@SQLITE_ONLY
def test_every_model_offers_each_activation(alice: FlaskClient, db_url: str) -> None:
    resp, form = page(alice)
    html = resp.get_data(as_text=True)
    for model in MODELS:
        control = form.control(f"f-train-model-{model}-params-activation")
        # The RNNs' head had no activation: "none" (null) is their default.
        rnn = model in ("lstm", "gru")
        assert [v for v, _ in control.options] == [""] * rnn + list(ACTIVATIONS), model
        assert control.value == ("" if rnn else "relu"), model
    assert re.search(r'<option value="leaky_relu"[^>]*>\s*Leaky ReLU\s*</option>', html)
    assert re.search(r'<option value=""[^>]*>\s*none\s*</option>', html)

    for chosen, expected in (("gelu", "gelu"), ("", None)):
        fields = form.fields(js=False)
        set_name(fields, "dataset.name", "synthetic_sequences")
        set_name(fields, "model.name", "lstm")
        set_value(fields, "f-train-model-lstm-params-activation", chosen)
        set_value(fields, "f-train-model-cnn-params-activation", "tanh")  # not the chosen model's
        spec = job_from(post(alice, fields), db_url).spec
        assert spec["model"]["name"] == "lstm"
        assert spec["model"]["params"]["activation"] == expected


@SQLITE_ONLY
def test_bad_values_come_back_next_to_their_inputs(alice: FlaskClient, db_url: str) -> None:
    _, form = page(alice)
    fields = form.fields(js=True)
    set_value(fields, "f-train-epochs", "0")
    set_value(fields, "f-train-optimizer-adam-lr", "abc")
    set_value(fields, "f-train-model-cnn-params-hidden", "12.5")
    set_value(fields, "f-name", "kept <b>as typed</b>")
    resp = post(alice, fields)
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    after = FormReader(html)
    errors = errors_text(html)
    assert errors["f-train-epochs"].startswith("Input should be greater than or equal to 1")
    assert errors["f-train-optimizer-adam-lr"] == "Must be a number"
    assert errors["f-train-model-cnn-params-hidden"] == "Must be a whole number"
    epochs = after.control("f-train-epochs").attrs
    assert epochs["value"] == "0" and epochs["aria-invalid"] == "true"
    assert "f-train-epochs-error" in epochs["aria-describedby"].split()
    assert "has-error" in after.ids["w-f-train-epochs"]["class"]
    assert after.control("f-train-optimizer-adam-lr").attrs["value"] == "abc"
    assert after.control("f-name").attrs["value"] == "kept <b>as typed</b>"  # escaped, kept
    # The summary links to each input, in page order.
    links = re.findall(r'<a href="#([^"]+)" data-focus', html)
    assert links == [
        "f-train-model-cnn-params-hidden",
        "f-train-epochs",
        "f-train-optimizer-adam-lr",
    ]
    with transaction(db_url) as s:
        assert s.query(Job).count() == 0

    fields = form.fields(js=True)
    set_value(fields, "f-train-model-name", "no-such-model")
    resp = post(alice, fields)
    assert resp.status_code == 422
    after = FormReader(resp.get_data(as_text=True))
    assert (
        "Unknown model 'no-such-model'"
        in errors_text(resp.get_data(as_text=True))["f-train-model-name"]
    )
    assert after.control("f-train-model-name").value == "no-such-model"  # the input is kept


@SQLITE_ONLY
def test_errors_without_an_input_of_their_own_are_placed(alice: FlaskClient) -> None:
    _, form = page(alice)
    fields = form.fields(js=True)
    set_value(fields, "f-train-optimizer-adam-betas", "0.9, 1.5")
    resp = post(alice, fields)
    assert resp.status_code == 422
    assert "betas" in errors_text(resp.get_data(as_text=True))["f-train-optimizer-adam-betas"]

    fields = form.fields(js=False)
    fields.append(["dataset.augment.hflip", "f-train-dataset-augment-hflip", ""])
    set_name(fields, "dataset.name", "iris")  # augmentation on tabular data: the group's error
    set_name(fields, "model.name", "mlp")
    resp = post(alice, fields)
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    assert "Augmentation applies to image data" in errors_text(html)["g-train-dataset-augment"]
    assert '<a href="#g-train-dataset-augment" data-focus' in html


def test_clone_prefills_every_input(app: Flask, alice: FlaskClient, db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    spec = train_spec(
        name="to-clone", tags=["a", "b"], epochs=7, batch_size=24,
        model={"name": "cnn", "params": {"channels": 8, "batch_norm": True}},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
        schedule={"name": "step", "step_epochs": 3, "gamma": 0.5},
        early_stopping={"metric": "val_accuracy", "patience": 2}, max_runtime_s=600,
        resources={"gpus": 0}, priority=7,
    )  # fmt: skip
    resp = as_user(app, users.alice).post("/api/v1/jobs", json=spec)
    original = resp.get_json()
    resp, form = page(alice, f"/submit?clone={original['id']}")
    assert resp.status_code == 200
    assert f'href="/jobs/{original["id"]}"' in resp.get_data(as_text=True)
    assert form.control("f-name").value == "to-clone"
    assert form.control("f-tags").value == "a, b"
    assert form.control("f-train-optimizer-name").value == "sgd"
    assert form.control("f-train-optimizer-sgd-momentum").value == "0.8"
    assert "checked" in form.control("f-train-optimizer-sgd-nesterov").attrs
    assert "checked" in form.control("f-train-model-cnn-params-batch_norm").attrs
    assert form.control("f-train-schedule-step-gamma").value == "0.5"
    assert "checked" in form.control("f-train-early_stopping").attrs
    assert form.control("f-train-early_stopping-metric").value == "val_accuracy"
    assert (form.control("f-max_runtime_s").value, form.control("f-priority").value) == ("600", "7")
    # Submitted unchanged, the clone is the same job again (a new one).
    job = job_from(post(alice, form.fields(js=True)), db_url)
    assert job.id != original["id"] and job.spec == original["spec"]

    # Another user's job is a 404 that reads like a missing one; an admin may clone it.
    bob = session_client(app, db_url, users.bob)
    theirs = bob.get(f"/submit?clone={job.id}")
    missing = bob.get("/submit?clone=999999")
    assert theirs.status_code == missing.status_code == 404
    assert "to-clone" not in theirs.get_data(as_text=True)
    assert without_csrf_token(theirs.get_data(as_text=True)).replace(
        f"Job {job.id} ", "Job N "
    ) == without_csrf_token(missing.get_data(as_text=True)).replace("Job 999999 ", "Job N ")
    assert bob.get("/submit?clone=abc").status_code == 404
    admin = session_client(app, db_url, users.admin)
    assert 'value="to-clone"' in admin.get(f"/submit?clone={job.id}").get_data(as_text=True)


def test_evaluate_a_succeeded_train_job(
    app: Flask, settings: Settings, alice: FlaskClient, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    source = succeeded_train_job(app, settings, db_url, users.alice)
    _, form = page(alice)
    assert str(source) in dict(form.control("f-evaluate-source_job_id").options)
    fields = form.fields(js=False)
    set_name(fields, "kind", "evaluate")
    set_value(fields, "f-evaluate-source_job_id", str(source))
    set_value(fields, "f-evaluate-dataset-split", "val")
    job = job_from(post(alice, fields), db_url)
    assert (job.kind, job.source_job_id, job.owner_id) == ("evaluate", source, users.alice.id)
    assert job.spec["dataset"]["split"] == "val" and job.spec["batch_size"] == 256

    # Bob is not offered alice's job, and naming it reads as a job that does not exist.
    bob = session_client(app, db_url, users.bob)
    _, bobs = page(bob)
    assert [v for v, _ in bobs.control("f-evaluate-source_job_id").options] == [""]
    fields = bobs.fields(js=False)
    set_name(fields, "kind", "evaluate")
    set_value(fields, "f-evaluate-source_job_id", str(source))
    resp = post(bob, fields)
    assert resp.status_code == 422
    assert errors_text(resp.get_data(as_text=True))["f-evaluate-source_job_id"] == (
        f"Job {source} does not exist"
    )


def test_csv_upload_in_the_form_without_js(alice: FlaskClient, db_url: str) -> None:
    _, form = page(alice)
    fields = form.fields(js=False)
    set_name(fields, "dataset.name", "csv")
    set_name(fields, "model.name", "mlp")
    csv = (io.BytesIO(CSV.encode()), "points.csv", "text/csv")

    # No target yet: the file is stored, its id filled in, its columns offered.
    resp = post(alice, fields, file=csv)
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    after = FormReader(html)
    upload_id = after.control("f-train-dataset-csv-params-upload_id").value
    assert upload_id.isdigit()
    target = after.control("f-train-dataset-csv-params-target")
    assert target.tag == "select"
    assert [v for v, _ in target.options] == ["", "x1", "x2", "label"]
    assert f"Stored points.csv as upload {upload_id} (20 rows)." in html
    assert errors_text(html)["f-train-dataset-csv-params-target"] == "Required"

    # Choosing the target column submits the job on that upload.
    fields = after.fields(js=True)
    set_value(fields, "f-train-dataset-csv-params-target", "label")
    job = job_from(post(alice, fields), db_url)
    assert job.dataset_name == "csv"
    assert job.spec["dataset"]["params"] == {"upload_id": int(upload_id), "target": "label",
                                             "task": "classification", "features": None}  # fmt: skip

    # A file and its target in one go; a broken file is an error at the file input.
    set_value(fields, "f-train-dataset-csv-params-upload_id", "")
    job = job_from(post(alice, fields, file=(io.BytesIO(CSV.encode()), "again.csv")), db_url)
    assert job.spec["dataset"]["params"]["upload_id"] > int(upload_id)
    resp = post(alice, fields, file=(io.BytesIO(b"a,a\n1,2\n"), "bad.csv"))
    assert resp.status_code == 422
    assert "unique" in errors_text(resp.get_data(as_text=True))["f-train-dataset-csv-params-file"]
    with transaction(db_url) as s:
        assert s.query(Upload).count() == 2


@SQLITE_ONLY
def test_refused_posts_keep_the_form(app: Flask, alice: FlaskClient, db_url: str) -> None:
    _, form = page(alice)
    fields = [f for f in form.fields(js=True) if f[0] != "csrf_token"]
    resp = post(alice, fields)
    assert resp.status_code == 400
    assert 'id="form-message"' in resp.get_data(as_text=True)
    with transaction(db_url) as s:
        assert s.query(Job).count() == 0
    # Over a limit: the reason above the form, which keeps its input.
    app.extensions["trainyard_submit_limits"].max_queued = 0
    fields = form.fields(js=True)
    set_value(fields, "f-train-epochs", "3")
    resp = post(alice, fields)
    assert resp.status_code == 429
    html = resp.get_data(as_text=True)
    assert "You already have 0 queued jobs (limit 0)" in html
    assert FormReader(html).control("f-train-epochs").value == "3"

    anonymous = app.test_client().get("/submit?clone=1")
    assert anonymous.status_code == 302 and anonymous.headers["Location"].startswith("/login")


def test_preemptible_is_yes_no_or_the_queues_default(
    app: Flask, alice: FlaskClient, db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    """A nullable boolean is a three-way select: an unchecked box would store False
    where the spec said "the queue decides" (None)."""
    for stored, shown in ((None, ""), (True, "true"), (False, "false")):
        original = (
            as_user(app, users.alice)
            .post("/api/v1/jobs", json=train_spec(preemptible=stored))
            .get_json()
        )
        resp, form = page(alice, f"/submit?clone={original['id']}")
        control = form.control("f-preemptible")
        assert control.value == shown
        job = job_from(post(alice, form.fields(js=True)), db_url)
        assert job.spec["preemptible"] is stored
