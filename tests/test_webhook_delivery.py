"""Webhook deliveries through real processes: a loopback receiver that fails the first
attempts, the web (`trainyard web`'s gunicorn) SIGKILLed mid-retry and started again,
the dispatcher in a real `trainyard reconcile` process killed with SIGKILL mid-retry
and started again, and in the end exactly one accepted, correctly signed delivery per
event id (docs/architecture.md, "Webhooks")."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from shared.db import transaction
from shared.job_states import JobState
from shared.orm import Job, WebhookDelivery
from shared.settings import Settings
from shared.state_machine import claim_job, finish_job
from shared.webhook_signing import verify
from tests.conftest import REPO, SQLITE_ONLY, settings_env
from tests.helpers import train_spec
from tests.test_web_availability import Gunicorn
from tests.test_webhooks import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(status=500)  # until the test says otherwise
    yield r
    r.close()


def wait_until(what: str, ok: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.05)
    raise TimeoutError(f"not within {timeout}s: {what}")


def deliveries(db_url: str) -> list[tuple[str, str, int, bool]]:
    """(event id, status, attempts, leased now) of each delivery."""
    with transaction(db_url) as s:
        rows = s.execute(select(WebhookDelivery.event_id, WebhookDelivery.status,
                                WebhookDelivery.attempts, WebhookDelivery.lease_token)).all()  # fmt: skip
    return sorted((r.event_id, r.status, r.attempts, r.lease_token is not None) for r in rows)


def between_retries(db_url: str, receiver: Receiver) -> bool:
    """Every delivery failed at least once, some were retried, and none is being sent
    this moment (a kill now leaves no lease to wait out; one left anyway only delays)."""
    rows = deliveries(db_url)
    return (len(rows) == 3 and all(a >= 1 and not leased for _, _, a, leased in rows)
            and len(receiver.requests) >= 4)  # fmt: skip


@SQLITE_ONLY
def test_one_signed_delivery_per_event_through_kills_and_restarts(
    settings: Settings, users, receiver: Receiver, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    db_url = settings.resolved_database_url
    # `trainyard web`'s own gunicorn: webhooks are made and read over HTTP.
    web = Gunicorn(settings, tmp_path, "web-1.log")
    api, headers = f"{web.url}/api/v1", users.alice.headers
    made = requests.post(f"{api}/webhooks", headers=headers, timeout=30, json={
        "url": receiver.url, "events": ["job.succeeded", "job.failed"],
    })  # fmt: skip
    assert made.status_code == 201, made.text
    secret, hook_id = made.json()["secret"], made.json()["id"]

    # Two jobs really finishing (the state machine on real rows), and a test ping.
    with transaction(db_url) as s:
        jobs = [Job(owner_id=users.alice.id, kind="train", name=f"j{i}", queue="cpu",
                    spec=train_spec()) for i in range(2)]  # fmt: skip
        s.add_all(jobs)
        s.flush()
        ok, bad = (j.id for j in jobs)
    with transaction(db_url) as s:
        assert claim_job(s, ok, "w", 60) and claim_job(s, bad, "w", 60)
    with transaction(db_url) as s:
        assert finish_job(s, ok, 1, JobState.SUCCEEDED, result={"metrics": {"val_accuracy": 0.9}})
        assert finish_job(s, bad, 1, JobState.FAILED, error_type="ValueError", error_message="x")
    ping = requests.post(f"{api}/webhooks/{hook_id}/test", headers=headers, timeout=30)
    expected = {f"job.succeeded:{ok}:1", f"job.failed:{bad}:1", ping.json()["event_id"]}

    env = {**settings_env(settings), "TRAINYARD_WEBHOOK_POLL_SECONDS": "0.1",
           "TRAINYARD_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
           "TRAINYARD_WEBHOOK_RETRY_MAX_SECONDS": "0.4",
           "TRAINYARD_WEBHOOK_TIMEOUT_SECONDS": "1", "TRAINYARD_WEBHOOK_LEASE_SECONDS": "1"}  # fmt: skip

    def dispatcher(n: int) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"reconcile-{n}.log", "wb")  # noqa: SIM115 - the process owns it
        return subprocess.Popen([sys.executable, "-m", "server.cli", "reconcile"], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def attempts() -> int:
        return sum(tries for _, _, tries, _ in deliveries(db_url))

    first = dispatcher(1)
    try:
        wait_until("each delivery failed once", lambda: between_retries(db_url, receiver))
        # The web dies mid-retry (SIGKILL to its whole process group); retries go on.
        web.kill()
        before = attempts()
        wait_until("a retry after the web died", lambda: attempts() > before)
        wait_until("between retries again", lambda: between_retries(db_url, receiver))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert set(receiver.answered) == {500}

    # The web starts again (nothing of the delivery lived in it) and reports the log.
    web = Gunicorn(settings, tmp_path, "web-2.log")
    try:
        log = requests.get(f"{web.url}/api/v1/webhooks/{hook_id}/deliveries", headers=headers,
                           timeout=30).json()  # fmt: skip
    finally:
        web.stop()
    assert {d["status"] for d in log["deliveries"]} == {"pending"}
    assert all(d["last_error"] == "HTTP 500" for d in log["deliveries"]), log

    receiver.status = 200
    second = dispatcher(2)
    try:
        wait_until("all delivered", lambda: {r[1] for r in deliveries(db_url)} == {"delivered"})
        time.sleep(1.0)  # ten more polls: nothing delivered is sent again
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(20)

    accepted = [
        r for r, status in zip(receiver.requests, receiver.answered, strict=True) if status == 200
    ]
    ids = [h["Trainyard-Event-Id"] for h, _ in accepted]
    assert sorted(ids) == sorted(expected), ids  # exactly one accepted per event id
    for headers, body in accepted:
        stamp, signature = headers["Trainyard-Timestamp"], headers["Trainyard-Signature"]
        assert verify(secret, stamp, signature, body), headers
        # A receiver holding another secret sees the signature is not for it.
        assert not verify(secret + "x", stamp, signature, body)
        assert not verify("whsec_someone-else", stamp, signature, body)
        event = json.loads(body)
        assert event["event_id"] == headers["Trainyard-Event-Id"]
        assert event["event"] == headers["Trainyard-Event"]
        assert int(headers["Trainyard-Attempt"]) >= 2
    succeeded = next(json.loads(b) for h, b in accepted if h["Trainyard-Event"] == "job.succeeded")
    assert succeeded["job"]["key_metric"] == {"key": "val_accuracy", "value": 0.9}
    assert succeeded["job"]["url"].endswith(f"/jobs/{ok}")
    for n in (1, 2):
        assert "webhook dispatch pass failed" not in (tmp_path / f"reconcile-{n}.log").read_text()
