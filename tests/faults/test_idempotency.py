"""Concurrent submissions with one Idempotency-Key (issue 4, scenario 10)."""

from __future__ import annotations

import threading

import pytest
import requests

from shared.celery_app import task_id_for
from tests.faults.conftest import Cluster, small_spec, token

pytestmark = pytest.mark.integration

CLIENTS = 8


def test_concurrent_posts_with_one_key_create_one_job(cluster: Cluster) -> None:
    """Eight clients retry the same submission at the same instant over real HTTP (each
    on its own connection, so the threaded server handles them in parallel): one job,
    one 201, and every other answer names that job."""
    key = f"retry-{token()}"
    spec = small_spec()
    start = threading.Barrier(CLIENTS)
    answers: list[tuple[int, dict]] = []
    errors: list[BaseException] = []

    def client() -> None:
        try:
            with requests.Session() as http:
                start.wait(10)
                resp = http.post(
                    f"{cluster.url}/api/v1/jobs",
                    json=spec,
                    headers={
                        "Idempotency-Key": key,
                        "Authorization": cluster.http.headers["Authorization"],
                    },
                    timeout=30,
                )
                answers.append((resp.status_code, resp.json()))
        except BaseException as exc:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(answers) == CLIENTS
    statuses = sorted(code for code, _ in answers)
    assert statuses == [200] * (CLIENTS - 1) + [201], answers
    ids = {body["id"] for _, body in answers}
    assert len(ids) == 1, answers
    (job_id,) = ids
    assert [j.id for j in cluster.jobs()] == [job_id]
    assert cluster.broker_task_ids().count(task_id_for(job_id)) == 1

    # A later retry still finds it; another key makes another job.
    again = cluster.post_job(spec, headers={"Idempotency-Key": key})
    assert (again.status_code, again.json()["id"]) == (200, job_id)
    other = cluster.submit(spec, headers={"Idempotency-Key": f"other-{token()}"})
    assert other != job_id and len(cluster.jobs()) == 2
