"""Submitting prune, quantize and export jobs (server/submission.py): the source must be
a succeeded train (or prune) job of the caller's with its files, each refusal names
the field; the row carries the source's model and dataset, the lineage shows on both
job pages, and the job page compares before and after. The jobs themselves run in
tests/test_derive.py (the model code) and tests/faults/test_derived_jobs.py (workers)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from flask import Flask

from shared.db import transaction, utcnow
from shared.orm import Job
from tests.conftest import TestUsers, as_user
from tests.job_rows import add_jobs
from tests.test_authorization import page_csrf_token, session_client

pytestmark = pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)


def trained(db_url: str, owner: int, **row: Any) -> int:
    [job_id] = add_jobs(db_url, [{"owner": owner, "checkpoint_path": "/nowhere/attempt-1", **row}])
    return job_id


def test_each_kind_is_queued_from_a_succeeded_train_job(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    source = trained(db_url, users.alice.id)
    alice = as_user(app, users.alice)
    specs = [
        {"kind": "prune", "source_job_id": source, "sparsity": 0.5},
        {"kind": "prune", "source_job_id": source, "sparsity": 0.3, "scope": "layer",
         "structured": True, "fine_tune_epochs": 2},
        {"kind": "quantize", "source_job_id": source},
        {"kind": "export", "source_job_id": source, "formats": ["onnx"]},
    ]  # fmt: skip
    for spec in specs:
        got = alice.post("/api/v1/jobs", json=spec)
        assert got.status_code == 201, got.json
        with transaction(db_url) as s:
            job = s.get(Job, got.json["id"])
            assert (job.kind, job.source_job_id, job.model_name, job.dataset_name) == (
                spec["kind"], source, "cnn", "digits")  # fmt: skip
    # A prune job's model can be pruned again, quantized or exported.
    [pruned] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "prune", "source_job_id": source,
                                  "checkpoint_path": "/nowhere/attempt-1",
                                  "spec": {"kind": "prune", "source_job_id": source,
                                           "sparsity": 0.5}}])  # fmt: skip
    for kind in ("prune", "quantize", "export"):
        spec = {
            "kind": kind,
            "source_job_id": pruned,
            **({"sparsity": 0.2} if kind == "prune" else {}),
        }
        assert alice.post("/api/v1/jobs", json=spec).status_code == 201


def test_a_bad_source_or_field_is_refused_naming_it(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    alice = as_user(app, users.alice)
    good = trained(db_url, users.alice.id)
    running = trained(db_url, users.alice.id, state="running")
    deleted = trained(db_url, users.alice.id, artifacts_deleted_at=utcnow())
    bobs = trained(db_url, users.bob.id)
    [evaluation] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "evaluate",
                                      "source_job_id": good}])  # fmt: skip
    [quantized] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "quantize", "source_job_id": good,
                                     "checkpoint_path": "/nowhere/attempt-1",
                                     "spec": {"kind": "quantize", "source_job_id": good}}])  # fmt: skip
    cases = [
        ({"kind": "prune", "source_job_id": running, "sparsity": 0.5}, "source_job_id", "running"),
        ({"kind": "prune", "source_job_id": deleted, "sparsity": 0.5}, "source_job_id", "deleted"),
        ({"kind": "prune", "source_job_id": bobs, "sparsity": 0.5}, "source_job_id", "does not exist"),
        ({"kind": "quantize", "source_job_id": evaluation}, "source_job_id", "evaluate job"),
        ({"kind": "export", "source_job_id": quantized}, "source_job_id", "quantize job"),
        ({"kind": "prune", "source_job_id": good, "sparsity": 1.0}, "sparsity", "less than 1"),
        ({"kind": "prune", "source_job_id": good}, "sparsity", "required"),
        ({"kind": "prune", "source_job_id": good, "sparsity": 0.5, "structured": True},
         "scope", "use scope: layer"),
        ({"kind": "export", "source_job_id": good, "formats": ["tflite"]}, "formats.0", "Input should be"),
        ({"kind": "export", "source_job_id": good, "formats": []}, "formats", "at least 1"),
        ({"kind": "quantize", "source_job_id": good, "method": "int4"}, "method", "Input should be"),
        ({"kind": "quantize", "source_job_id": good, "resources": {"gpus": 2}}, "resources.gpus", "one GPU"),
    ]  # fmt: skip
    for spec, field, words in cases:
        got = alice.post("/api/v1/jobs", json=spec)
        assert got.status_code == 422, (spec, got.json)
        assert words in got.json["error"]["fields"].get(field, ""), (spec, got.json)
    # Over the account's epoch limit: fine-tuning is training.
    admin = as_user(app, users.admin)
    admin.patch("/api/v1/users/alice/limits", json={"max_epochs": 5})
    got = alice.post("/api/v1/jobs", json={"kind": "prune", "source_job_id": good,
                                           "sparsity": 0.5, "fine_tune_epochs": 50})  # fmt: skip
    assert got.status_code == 422 and "fine_tune_epochs" in got.json["error"]["fields"]


def test_the_job_pages_show_lineage_before_and_after_and_the_form(
    app: Flask, db_url: str, users: TestUsers
) -> None:
    source = trained(db_url, users.alice.id, name="base")
    metrics = {"before_size_bytes": 400_000, "after_size_bytes": 100_000,
               "before_accuracy": 0.95, "after_accuracy": 0.94, "sparsity_achieved": 0.5}  # fmt: skip
    [pruned] = add_jobs(db_url, [{"owner": users.alice.id, "kind": "prune", "source_job_id": source,
                                  "name": "pruned", "metrics": metrics,
                                  "checkpoint_path": "/nowhere/attempt-1",
                                  "spec": {"kind": "prune", "source_job_id": source,
                                           "sparsity": 0.5}}])  # fmt: skip
    client = session_client(app, db_url, users.alice)
    page = client.get(f"/jobs/{pruned}").get_data(as_text=True)
    assert f'id="source-job-link" href="/jobs/{source}"' in page and "Made from" in page
    table = re.search(r'<table id="before-after".*?</table>', page, re.S).group(0)  # type: ignore[union-attr]
    row = re.search(r'data-key="size_bytes">(.*?)</tr>', table, re.S).group(1)  # type: ignore[union-attr]
    assert "400,000" in row and "100,000" in row and "-75.0%" in row
    assert 'data-key="accuracy"' in table and "sparsity_achieved" in page
    # The source's page lists what was made from it and offers the form.
    page = client.get(f"/jobs/{source}").get_data(as_text=True)
    assert re.search(rf'id="job-derived".*data-job-id="{pruned}"', page, re.S)
    assert 'id="derive-form"' in page
    # The form queues a job.
    got = client.post(f"/jobs/{source}/derive", data={
        "csrf_token": page_csrf_token(client), "kind": "prune", "sparsity": "0.7",
        "scope": "layer", "fine_tune_epochs": "1"})  # fmt: skip
    assert got.status_code == 303
    new_id = int(got.headers["Location"].rsplit("/", 1)[1])
    with transaction(db_url) as s:
        job = s.get(Job, new_id)
        assert job.kind == "prune" and job.spec["sparsity"] == 0.7 and job.spec["scope"] == "layer"
    got = client.post(f"/jobs/{source}/derive", data={
        "csrf_token": page_csrf_token(client), "kind": "prune", "sparsity": "2"})  # fmt: skip
    assert got.status_code == 303
    assert "sparsity: Input should be less than 1" in client.get(f"/jobs/{source}").get_data(
        as_text=True
    )
    # Bob sees neither the page nor can he use the form.
    bob = session_client(app, db_url, users.bob)
    assert bob.post(f"/jobs/{source}/derive", data={"csrf_token": page_csrf_token(bob),
                                                    "kind": "quantize"}).status_code == 404  # fmt: skip
