"""Idempotent submission: a retried POST /api/v1/jobs with the same Idempotency-Key
returns the job the first one created, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import threading

import pytest
import redis
import requests
from sqlalchemy import func, select

from shared.db import transaction
from shared.orm import Job
from tests.conftest import as_user
from tests.helpers import train_spec

KEY = "Idempotency-Key"


def job_count(db_url: str) -> int:
    with transaction(db_url) as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


def queued_ids(redis_url: str, queue: str = "cpu") -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(m)["headers"]["id"] for m in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def test_same_key_returns_the_same_job_and_enqueues_once(  # type: ignore[no-untyped-def]
    client, db_url: str, redis_url: str
) -> None:
    first = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: "retry-me-1"})
    assert first.status_code == 201, first.get_json()
    job_id = first.get_json()["id"]

    again = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: "retry-me-1"})
    assert again.status_code == 200, again.get_json()
    assert again.get_json()["id"] == job_id
    assert again.headers["Location"] == f"/api/v1/jobs/{job_id}"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert job_count(db_url) == 1
    assert queued_ids(redis_url) == [f"trainyard-job-{job_id}"]


def test_same_spec_spelled_differently_is_the_same_request(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    spec = train_spec(optimizer={"name": "adam", "lr": 0.001})
    first = client.post("/api/v1/jobs", json=spec, headers={KEY: "k"})
    # Keys in another order and 1e-3 for 0.001: the validated spec is the same.
    body = json.dumps(dict(reversed(list(spec.items())))).replace("0.001", "1e-3")
    again = client.post(
        "/api/v1/jobs", data=body, headers={KEY: "k", "Content-Type": "application/json"}
    )
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert job_count(db_url) == 1


def test_same_key_with_another_spec_is_refused(client, db_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    first = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: "k-1"})
    job_id = first.get_json()["id"]
    other = client.post("/api/v1/jobs", json=train_spec(epochs=9), headers={KEY: "k-1"})
    assert other.status_code == 422
    error = other.get_json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert set(error["fields"]) == {KEY} and str(job_id) in error["fields"][KEY]
    assert job_count(db_url) == 1 and len(queued_ids(redis_url)) == 1


def test_different_keys_and_no_key_create_separate_jobs(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    ids = {
        client.post("/api/v1/jobs", json=train_spec(), headers=headers).get_json()["id"]
        for headers in ({KEY: "a"}, {KEY: "b"}, {}, {})
    }
    assert len(ids) == 4 and job_count(db_url) == 4


@pytest.mark.parametrize("bad", ["", "x" * 201, "caf\u00e9", "tab\there", "del\x7f"])
def test_invalid_key_is_a_400_naming_the_header(client, db_url: str, bad: str) -> None:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: bad})
    assert resp.status_code == 400, resp.get_json()
    body = resp.get_json()["error"]
    assert body["code"] == "invalid_header" and set(body["fields"]) == {KEY}
    assert job_count(db_url) == 0


def test_longest_and_oddest_valid_keys(client) -> None:  # type: ignore[no-untyped-def]
    for key in ("x" * 200, "~!@#$%^&*()_+ {}|:<>?", "550e8400-e29b-41d4-a716-446655440000"):
        resp = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: key})
        assert resp.status_code == 201, (key, resp.get_json())


def test_concurrent_posts_with_one_key_create_one_job(
    live_server: str, db_url: str, redis_url: str, auth_headers: dict[str, str]
) -> None:
    n = 8
    barrier = threading.Barrier(n)
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def post() -> None:
        try:
            barrier.wait()
            resp = requests.post(
                f"{live_server}/api/v1/jobs",
                json=train_spec(),
                headers={KEY: "same-key-under-load", **auth_headers},
                timeout=60,
            )
            results.append((resp.status_code, resp.json()["id"]))
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * (n - 1) + [201], results
    assert len({job_id for _, job_id in results}) == 1
    assert job_count(db_url) == 1
    [job_id] = {job_id for _, job_id in results}
    assert queued_ids(redis_url) == [f"trainyard-job-{job_id}"]


def test_losing_the_insert_race_returns_the_winner(  # type: ignore[no-untyped-def]
    client, db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic version of the race: the first look-up misses (the other request
    has not committed yet), the INSERT then hits the unique index."""
    import server.submission

    winner = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: "race"}).get_json()
    real_lookup = server.submission.job_by_idempotency_key
    calls: list[str] = []

    def miss_once(owner_id: int, key: str):  # type: ignore[no-untyped-def]
        calls.append(key)
        return None if len(calls) == 1 else real_lookup(owner_id, key)

    monkeypatch.setattr(server.submission, "job_by_idempotency_key", miss_once)
    resp = client.post("/api/v1/jobs", json=train_spec(), headers={KEY: "race"})
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["id"] == winner["id"] and calls == ["race", "race"]
    assert job_count(db_url) == 1 and len(queued_ids(redis_url)) == 1


def test_keys_are_per_user_another_users_key_reveals_and_blocks_nothing(  # type: ignore[no-untyped-def]
    app, users, db_url: str
) -> None:
    """A global key let bob learn that alice used "nightly-1", the id of her job and
    whether a guessed spec matched, and let him squat the key so her submission failed."""
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    squatted = bob.post("/api/v1/jobs", json=train_spec(epochs=7), headers={KEY: "nightly-1"})
    assert squatted.status_code == 201
    mine = alice.post("/api/v1/jobs", json=train_spec(), headers={KEY: "nightly-1"})
    assert mine.status_code == 201, mine.get_json()
    assert mine.get_json()["id"] != squatted.get_json()["id"]
    # Probing with alice's key and either spec only ever finds bob's own job.
    probe = bob.post("/api/v1/jobs", json=train_spec(), headers={KEY: "nightly-1"})
    assert probe.status_code == 422
    assert f"job {mine.get_json()['id']}" not in json.dumps(probe.get_json())
    same = bob.post("/api/v1/jobs", json=train_spec(epochs=7), headers={KEY: "nightly-1"})
    assert same.status_code == 200 and same.get_json()["id"] == squatted.get_json()["id"]
    replay = alice.post("/api/v1/jobs", json=train_spec(), headers={KEY: "nightly-1"})
    assert replay.status_code == 200 and replay.get_json()["id"] == mine.get_json()["id"]
    assert job_count(db_url) == 2
