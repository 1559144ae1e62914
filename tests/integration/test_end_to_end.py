"""The whole slice on real parts: HTTP API on a socket, real Redis, a real `celery worker`
subprocess training with PyTorch, results in PostgreSQL (SQLite: tests/browser)."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import DB_PARAMS, wait_for_state
from tests.helpers import evaluate_spec, train_spec

pytestmark = pytest.mark.integration
PG_OR_SQLITE = DB_PARAMS[-1]  # postgresql unless TRAINYARD_TEST_SKIP_PG=1


# PostgreSQL, the production database; the browser tests run the same story on SQLite.
@pytest.mark.parametrize("db_url", [PG_OR_SQLITE], indirect=True)
def test_train_then_evaluate_on_a_real_worker(live_server: str, start_worker, auth_headers) -> None:  # type: ignore[no-untyped-def]
    worker = start_worker("cpu")
    http = requests.Session()
    http.headers.update(auth_headers)

    def get_json(path: str) -> dict:
        resp = http.get(live_server + path, timeout=10)
        resp.raise_for_status()
        return resp.json()

    resp = http.post(f"{live_server}/api/v1/jobs", json=train_spec(epochs=3), timeout=10)
    assert resp.status_code == 201, resp.text
    job_id = resp.json()["id"]

    job = wait_for_state(get_json, job_id, {"succeeded", "failed", "cancelled"}, timeout=120)
    assert job["state"] == "succeeded", (job, worker.log_tail())
    metrics = job["result"]["metrics"]
    assert metrics["val_accuracy"] >= 0.9, metrics
    assert metrics["epochs_run"] == 3 and metrics["samples_per_s"] > 0
    assert job["attempt"] == 1 and job["worker"] and job["progress"]["epoch"] == 3

    series = get_json(f"/api/v1/jobs/{job_id}/metrics")["series"]
    assert series["val_loss"]["epoch"] == [1, 2, 3]
    assert len(series["train_loss"]["value"]) == 3 and len(series["val_accuracy"]["value"]) == 3

    resp = http.post(f"{live_server}/api/v1/jobs", json=evaluate_spec(job_id), timeout=10)
    assert resp.status_code == 201, resp.text
    evaluation = wait_for_state(
        get_json, resp.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=60
    )
    assert evaluation["state"] == "succeeded", (evaluation, worker.log_tail())
    scores = evaluation["result"]["metrics"]
    assert scores["accuracy"] >= 0.9
    for key in ("precision", "recall", "f1", "loss"):
        assert 0 <= scores[key] <= (1 if key != "loss" else 10), key
    matrix = scores["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    digits = get_json("/api/v1/datasets")["datasets"][0]
    assert sum(map(sum, matrix)) == digits["splits"]["test"] == 360


@pytest.mark.parametrize("db_url", [PG_OR_SQLITE], indirect=True)
def test_failed_job_reports_its_error(
    live_server: str, start_worker, db_url: str, auth_headers
) -> None:  # type: ignore[no-untyped-def]
    from shared.db import transaction
    from shared.orm import Job

    start_worker("cpu")
    tiny = train_spec(model={"name": "mlp", "params": {"hidden": 16, "layers": 1}}, epochs=1)
    source = requests.post(
        f"{live_server}/api/v1/jobs", json=tiny, headers=auth_headers, timeout=10
    ).json()["id"]

    def get_json(path: str) -> dict:
        return requests.get(live_server + path, headers=auth_headers, timeout=10).json()

    assert wait_for_state(get_json, source, {"succeeded", "failed"})["state"] == "succeeded"
    # The checkpoint vanished (disk cleaned up): the evaluate job must fail, with the reason shown.
    with transaction(db_url) as s:
        s.get(Job, source).checkpoint_path = "/nonexistent/ckpt"
    evaluation = requests.post(
        f"{live_server}/api/v1/jobs", json=evaluate_spec(source), headers=auth_headers, timeout=10
    ).json()["id"]
    job = wait_for_state(get_json, evaluation, {"succeeded", "failed"})
    assert job["state"] == "failed"
    # The reason without the server's path (a member's view; shared/redaction.py).
    assert job["error"]["type"] == "UserError" and "not found: <path>/" in job["error"]["message"]
    assert job["attempt"] == 1 and job["finished_at"]
