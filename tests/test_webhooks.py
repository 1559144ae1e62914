"""Webhooks without a dispatcher process: signatures, URL and address rules, the chat
presets, backoff, the outbox written with a job's or a sweep's end, fan-out and leases,
the API and the settings page. The real process, receiver and restarts:
tests/test_webhook_delivery.py."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import func, select, update

from shared import webhook_delivery as wd
from shared import webhooks
from shared.db import transaction, utcnow
from shared.job_states import JobState
from shared.orm import Job, NotificationEvent, Sweep, Webhook, WebhookDelivery
from shared.settings import Settings
from shared.state_machine import claim_job, expire_lease, finish_job, request_cancel
from shared.sweep_controller import controller_pass
from shared.webhook_signing import sign, verify
from tests.conftest import SQLITE_ONLY, as_user
from tests.helpers import train_spec
from tests.test_authorization import SWEEP, page_csrf_token, session_client

# ---------------------------------------------------------------- pure functions


def test_signature_verifies_only_with_the_secret_the_body_and_a_fresh_timestamp() -> None:
    body = b'{"event":"ping"}'
    signature = sign("s3cret", 1_000_000, body)
    assert re.fullmatch(r"v1=[0-9a-f]{64}", signature)
    assert verify("s3cret", "1000000", signature, body, now=1_000_100)
    assert not verify("wrong", "1000000", signature, body, now=1_000_100)
    assert not verify("s3cret", "1000000", signature, body + b" ", now=1_000_100)
    assert not verify("s3cret", "1000001", signature, body, now=1_000_100)  # timestamp signed
    assert not verify("s3cret", "1000000", signature, body, now=1_000_000 + 301)  # replayed late
    assert not verify("s3cret", "soon", signature, body, now=1_000_000)
    assert verify("s3cret", "1000000", f"v1=00, {signature}", body, now=1_000_000)  # rotation


def fake_dns(table: dict[str, list[str]]) -> webhooks.Resolver:
    def resolver(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]

    return resolver


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "must start with http:// or https://"),
        ("file:///etc/passwd", "must start with http:// or https://"),
        ("https://user:pw@example.com/hook", "must not contain credentials"),
        ("https:///nohost", "needs a host"),
        ("http://example.com:99999/", "the port must be a number"),
        ("http://exa mple.com/", "must not contain spaces"),
        ("https://internal.corp/hook", "a private address"),
        ("http://127.0.0.1:8000/hook", "a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "a link-local address"),
        ("http://[::ffff:10.0.0.1]/", "a private address"),
        ("http://[::1]/", "a loopback address"),
        ("http://100.64.1.1/", "100.64.1.1 resolves to a"),
        ("https://rebind.example/", "a private address"),  # one of its answers
        ("https://nowhere.example/", "cannot resolve nowhere.example"),
    ],
)
def test_url_rules_name_what_is_wrong(url: str, message: str) -> None:
    dns = fake_dns({
        "internal.corp": ["10.1.2.3"], "rebind.example": ["93.184.216.34", "192.168.0.5"],
        "127.0.0.1": ["127.0.0.1"], "169.254.169.254": ["169.254.169.254"],
        "::ffff:10.0.0.1": ["::ffff:10.0.0.1"], "::1": ["::1"], "100.64.1.1": ["100.64.1.1"],
    })  # fmt: skip
    with pytest.raises(webhooks.WebhookError) as caught:
        webhooks.check_url(url, allow_private=False, resolver=dns)
    assert caught.value.field == "url" and message in caught.value.message, caught.value.message


def test_public_urls_pass_and_private_ones_pass_where_allowed() -> None:
    dns = fake_dns({"hooks.example.com": ["93.184.216.34", "2606:2800:220:1::1"]})
    assert webhooks.check_url("https://hooks.example.com/x?a=1", False, dns)
    # Allowed: not even resolved (local mode's receivers may come and go).
    assert webhooks.check_url("http://127.0.0.1:9/x", True, fake_dns({}))


def test_the_private_default_follows_the_public_url() -> None:
    assert Settings(url="http://127.0.0.1:8000").webhooks_allow_private
    assert not Settings(url="https://trainyard.example.com").webhooks_allow_private
    assert Settings(url="https://x.example", webhook_allow_private=True).webhooks_allow_private


def test_a_send_to_a_host_that_now_resolves_privately_is_refused_without_connecting() -> None:
    result = wd.post("https://hooks.example.com/x", b"{}", {}, timeout=1, allow_private=False,
                     resolver=fake_dns({"hooks.example.com": ["10.0.0.7"]}))  # fmt: skip
    assert not result.ok and result.status is None
    assert result.error and result.error.startswith(
        "refused: hooks.example.com resolves to a private"
    )


JOB_EVENT = {
    "event": "job.failed", "event_id": "job.failed:42:2", "occurred_at": "2026-12-03T10:00:00.000Z",
    "job": {"id": 42, "name": "mnist <cnn>", "kind": "train", "state": "failed", "queue": "cpu",
            "attempt": 2, "error_type": "ValueError", "error_message": "bad & worse",
            "key_metric": None, "started_at": None, "finished_at": None},
}  # fmt: skip


def test_presets_render_chat_messages_with_a_link() -> None:
    plain = webhooks.render("json", JOB_EVENT, "https://ty.example/")
    assert (
        plain["job"]["url"] == "https://ty.example/jobs/42"
        and plain["event_id"] == "job.failed:42:2"
    )
    assert "url" not in JOB_EVENT["job"]  # the stored payload is left alone
    slack = webhooks.render("slack", JOB_EVENT, "https://ty.example")
    assert slack["text"] == "Job #42 (mnist <cnn>) failed: ValueError: bad & worse"
    block = slack["blocks"][0]["text"]
    assert block["type"] == "mrkdwn"
    assert "mnist &lt;cnn&gt;" in block["text"] and "bad &amp; worse" in block["text"]
    assert "<https://ty.example/jobs/42|Open in Trainyard>" in block["text"]
    teams = webhooks.render("teams", JOB_EVENT, "https://ty.example")
    assert teams["@type"] == "MessageCard" and teams["title"] == "Job #42 (mnist <cnn>) failed"
    assert teams["potentialAction"][0]["targets"][0]["uri"] == "https://ty.example/jobs/42"
    sweep = {"event": "sweep.finished", "sweep": {"id": 7, "name": None, "state": "succeeded",
                                                  "error_message": None, "trials": 4}}  # fmt: skip
    assert webhooks.render("slack", sweep, "http://h")["text"] == "Sweep #7 succeeded: 4 trials"


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    low, high = (lambda: 0.0), (lambda: 1.0)
    assert [wd.backoff_seconds(n, 10, 3600, low) for n in (1, 2, 3)] == [8.0, 16.0, 32.0]
    assert [wd.backoff_seconds(n, 10, 3600, high) for n in (1, 2, 3)] == pytest.approx([12, 24, 48])
    assert wd.backoff_seconds(9, 10, 3600, high) == pytest.approx(3072)
    assert wd.backoff_seconds(10, 10, 3600, high) == 3600.0  # jitter never passes the cap
    assert wd.backoff_seconds(500, 10, 3600, low) == 2880.0
    total = sum(wd.backoff_seconds(n, 10, 3600, lambda: 0.5) for n in range(1, 32))
    assert 20 * 3600 < total < 26 * 3600  # the default 32 attempts span about a day


# ---------------------------------------------------------------- the outbox


def add_webhook(db_url: str, owner: int, events: list[str], **extra: Any) -> int:
    values = {"url": "http://127.0.0.1:9/", "secret": "whsec_test", "format": "json",
              "stall_minutes": 30, "enabled": True, **extra}  # fmt: skip
    with transaction(db_url) as s:
        hook = Webhook(owner_id=owner, events=events, **values)
        s.add(hook)
        s.flush()
        return hook.id


def add_job(db_url: str, owner: int, name: str = "run") -> int:
    with transaction(db_url) as s:
        job = Job(owner_id=owner, kind="train", name=name, queue="cpu", spec=train_spec(name=name))
        s.add(job)
        s.flush()
        return job.id


def outbox(db_url: str) -> list[tuple[str, dict[str, Any]]]:
    with transaction(db_url) as s:
        rows = s.execute(select(NotificationEvent.event_id, NotificationEvent.payload)
                         .order_by(NotificationEvent.id)).all()  # fmt: skip
    return [(r.event_id, r.payload) for r in rows]


def test_a_finishing_job_records_exactly_one_event_in_its_transaction(db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    alice = users.alice.id
    add_webhook(db_url, alice, ["job.succeeded", "job.failed", "job.cancelled"])
    done, queued, lost, bobs = (add_job(db_url, alice, "a"), add_job(db_url, alice, "b"),
                                add_job(db_url, alice, "c"), add_job(db_url, users.bob.id))  # fmt: skip
    with transaction(db_url) as s:
        for job_id in (done, lost, bobs):
            assert claim_job(s, job_id, "w1", 60)
    with transaction(db_url) as s:
        assert finish_job(s, done, 1, JobState.SUCCEEDED,
                          result={"metrics": {"val_accuracy": 0.93, "val_loss": 0.2}})  # fmt: skip
    with transaction(db_url) as s:  # a duplicate finish (a zombie) changes nothing
        assert not finish_job(s, done, 1, JobState.FAILED, error_message="late")
    with pytest.raises(RuntimeError), transaction(db_url) as s:  # rolled back: no event
        assert finish_job(s, bobs, 1, JobState.SUCCEEDED)
        assert finish_job(s, lost, 1, JobState.FAILED)
        raise RuntimeError("the transaction fails after the transition")
    with transaction(db_url) as s:
        assert request_cancel(s, queued) == "cancelled"
        s.execute(
            update(Job).where(Job.id == lost).values(lease_expires_at=utcnow() - timedelta(1))
        )
    with transaction(db_url) as s:
        s.get(Job, lost).max_attempts = 1
    with transaction(db_url) as s:
        assert expire_lease(s, lost, 1, 1, "w1", utcnow())
    with transaction(db_url) as s:
        assert finish_job(s, bobs, 1, JobState.SUCCEEDED)  # bob has no webhook: nothing
    events = outbox(db_url)
    assert [e for e, _ in events] == [
        f"job.succeeded:{done}:1",
        f"job.cancelled:{queued}:0",
        f"job.failed:{lost}:1",
    ]
    payload = events[0][1]
    assert payload["job"]["key_metric"] == {"key": "val_accuracy", "value": 0.93}
    assert payload["event"] == "job.succeeded" and payload["job"]["name"] == "a"
    assert events[2][1]["job"]["error_type"] == "WorkerLost"


def test_an_event_id_is_recorded_once_on_both_databases(db_url: str, users) -> None:  # type: ignore[no-untyped-def]
    with transaction(db_url) as s:
        assert webhooks.record_event(s, "job.failed:1:1", "job.failed", users.alice.id, {})
        assert not webhooks.record_event(s, "job.failed:1:1", "job.failed", users.alice.id, {})
    with transaction(db_url) as s:
        assert not webhooks.record_event(s, "job.failed:1:1", "job.failed", None, {"x": 1})
        assert s.execute(select(func.count()).select_from(NotificationEvent)).scalar() == 1


@SQLITE_ONLY
def test_fan_out_leases_and_outcomes(db_url: str, users, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    alice = users.alice.id
    wants = add_webhook(db_url, alice, ["job.failed"])
    add_webhook(db_url, alice, ["job.succeeded"])  # does not want it
    add_webhook(db_url, alice, ["job.failed"], enabled=False)
    with transaction(db_url) as s:
        webhooks.record_event(s, "job.failed:5:1", "job.failed", alice, {"job": {"id": 5}})
    assert wd.fan_out(db_url) == 1
    assert wd.fan_out(db_url) == 0  # marked: not fanned out twice
    with transaction(db_url) as s:
        rows = s.execute(select(WebhookDelivery.webhook_id, WebhookDelivery.status)).all()
    assert [tuple(r) for r in rows] == [(wants, "pending")]
    now = utcnow()
    first = wd.lease_due(db_url, 60, now)
    assert len(first) == 1 and wd.lease_due(db_url, 60, now) == []  # held by the first
    assert len(wd.lease_due(db_url, 60, now + timedelta(seconds=61))) == 1  # expired: taken over
    assert wd.send_leased(settings, *first[0]) == "lost"  # the old lease sends nothing
    with transaction(db_url) as s:
        assert s.execute(select(WebhookDelivery.attempts)).scalar() == 0


@SQLITE_ONLY
def test_stalled_jobs_are_reported_once_per_attempt_and_per_webhook_threshold(
    db_url: str, users
) -> None:  # type: ignore[no-untyped-def]
    alice = users.alice.id
    quick = add_webhook(db_url, alice, ["job.stalled"])
    slow = add_webhook(db_url, alice, ["job.stalled", "job.failed"], stall_minutes=120)
    job_id = add_job(db_url, alice)
    with transaction(db_url) as s:
        claim_job(s, job_id, "w1", 600)
        s.execute(update(Job).where(Job.id == job_id).values(progress={"step": 10}))
    watch, t0 = wd.StallWatch(), utcnow()
    assert wd.stalled_pass(db_url, watch, t0) == 0  # first sighting: the clock starts
    with transaction(db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(progress={"step": 11}))
    assert wd.stalled_pass(db_url, watch, t0 + timedelta(minutes=29)) == 0  # it moved
    assert wd.stalled_pass(db_url, watch, t0 + timedelta(minutes=60)) == 1  # 31 min still
    assert wd.stalled_pass(db_url, watch, t0 + timedelta(minutes=90)) == 0  # once
    assert wd.stalled_pass(db_url, watch, t0 + timedelta(minutes=150)) == 1  # the 2-hour one
    with transaction(db_url) as s:
        got = s.execute(select(WebhookDelivery.webhook_id, WebhookDelivery.event_id)).all()
    assert sorted(tuple(r) for r in got) == [(quick, f"job.stalled:{job_id}:1"),
                                            (slow, f"job.stalled:{job_id}:1")]  # fmt: skip
    assert outbox(db_url)[0][1]["stalled_minutes"] == 31
    assert wd.fan_out(db_url) == 0  # already fanned out, per webhook


@SQLITE_ONLY
def test_a_finished_sweep_records_its_event(db_url: str, users, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    from shared.sweep_spec import parse_sweep_spec, sweep_to_json

    add_webhook(db_url, users.alice.id, ["sweep.finished"])
    spec = sweep_to_json(parse_sweep_spec({**SWEEP, "max_trials": 1, "time_budget_s": 1}))
    with transaction(db_url) as s:
        sweep = Sweep(owner_id=users.alice.id, name="s", spec=spec, state="running",
                      created_at=utcnow() - timedelta(hours=1))  # fmt: skip
        s.add(sweep)
        s.flush()
        sweep_id = sweep.id
    controller_pass(settings, "test", None)  # the budget is spent: it ends without trials
    [(event_id, payload)] = outbox(db_url)
    assert event_id == f"sweep.finished:{sweep_id}"
    assert payload["sweep"]["state"] == "failed" and payload["sweep"]["trials"] == 0


# ---------------------------------------------------------------- API and page


class Receiver:
    """A loopback HTTP receiver answering `status` (change it at any time); keeps every
    request and, in `answered`, the status each got."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = receiver.status
                receiver.requests.append((dict(self.headers), body))
                receiver.answered.append(status)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@SQLITE_ONLY
def test_api_create_list_change_test_and_deliveries(
    app: Flask, users, settings: Settings, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    resp = alice.post("/api/v1/webhooks", json={"url": receiver.url, "events": ["job.failed"],
                                                "format": "slack"})  # fmt: skip
    assert resp.status_code == 201, resp.get_json()
    made = resp.get_json()
    secret, hook_id = made["secret"], made["id"]
    assert secret.startswith("whsec_") and resp.headers["Location"] == f"/api/v1/webhooks/{hook_id}"
    listed = alice.get("/api/v1/webhooks").get_json()["webhooks"]
    assert [h["id"] for h in listed] == [hook_id] and "secret" not in listed[0]
    assert secret not in json.dumps(alice.get(f"/api/v1/webhooks/{hook_id}").get_json())
    assert bob.get(f"/api/v1/webhooks/{hook_id}").status_code == 404
    assert bob.get("/api/v1/webhooks").get_json()["webhooks"] == []

    bad = alice.post("/api/v1/webhooks", json={"url": "ftp://x", "events": ["job.exploded"]})
    assert bad.status_code == 422 and set(bad.get_json()["error"]["fields"]) == {"events.0"}
    bad = alice.post("/api/v1/webhooks", json={"url": "ftp://x", "events": ["job.failed"]})
    assert bad.get_json()["error"]["fields"] == {"url": "must start with http:// or https://"}
    bad = alice.patch(f"/api/v1/webhooks/{hook_id}", json={"stall_minutes": 0, "enabled": None})
    assert set(bad.get_json()["error"]["fields"]) == {"stall_minutes"}
    bad = alice.patch(f"/api/v1/webhooks/{hook_id}", json={"enabled": None})
    assert bad.get_json()["error"]["fields"] == {"enabled": "must not be null"}

    changed = alice.patch(f"/api/v1/webhooks/{hook_id}",
                          json={"rotate_secret": True, "format": "json"}).get_json()  # fmt: skip
    assert changed["secret"] != secret and changed["format"] == "json"
    ping = alice.post(f"/api/v1/webhooks/{hook_id}/test")
    assert ping.status_code == 202
    report = wd.run_once(settings)
    assert (report.fanned_out, report.delivered) == (1, 1), report
    [(headers, body)] = receiver.requests
    assert headers["Trainyard-Event-Id"] == ping.get_json()["event_id"]
    assert headers["Trainyard-Event"] == "ping"
    assert verify(changed["secret"], headers["Trainyard-Timestamp"],
                  headers["Trainyard-Signature"], body)  # fmt: skip
    assert json.loads(body)["webhook"] == {"id": hook_id}
    log = alice.get(f"/api/v1/webhooks/{hook_id}/deliveries").get_json()["deliveries"]
    assert [(d["event"], d["status"], d["attempts"], d["last_status_code"]) for d in log] == [
        ("ping", "delivered", 1, 200)
    ]

    receiver.status = 302  # a redirect is a failure, never followed
    alice.post(f"/api/v1/webhooks/{hook_id}/test")
    wd.run_once(settings)
    log = alice.get(f"/api/v1/webhooks/{hook_id}/deliveries").get_json()["deliveries"]
    assert log[0]["status"] == "pending" and log[0]["next_attempt_at"]
    assert log[0]["last_error"] == "HTTP 302: redirects are not followed"

    assert alice.delete(f"/api/v1/webhooks/{hook_id}").status_code == 200
    assert alice.get(f"/api/v1/webhooks/{hook_id}").status_code == 404
    with transaction(settings.resolved_database_url) as s:
        assert s.execute(select(func.count()).select_from(WebhookDelivery)).scalar() == 0


@SQLITE_ONLY
def test_private_addresses_are_refused_when_the_site_is_https(app: Flask, users) -> None:  # type: ignore[no-untyped-def]
    app.config["TRAINYARD_SETTINGS"] = app.config["TRAINYARD_SETTINGS"].model_copy(
        update={"url": "https://trainyard.example"}
    )
    resp = as_user(app, users.alice).post(
        "/api/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.failed"]}
    )
    assert resp.status_code == 422
    assert "a loopback address" in resp.get_json()["error"]["fields"]["url"]


@SQLITE_ONLY
def test_settings_page_creates_shows_the_secret_once_tests_and_deletes(
    app: Flask, users, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    page = session_client(app, db_url, users.alice)
    html = page.get("/settings/webhooks").get_data(as_text=True)
    assert 'id="webhooks-empty"' in html and 'href="/settings/webhooks" aria-current="page"' in html
    form = {"csrf_token": page_csrf_token(page), "url": "http://127.0.0.1:9/in",
            "events": ["job.failed", "sweep.finished"], "format": "teams",
            "stall_minutes": "30", "enabled": "y"}  # fmt: skip
    resp = page.post("/settings/webhooks", data=form)
    assert resp.status_code == 201
    secret = re.search(r'id="webhook-secret">([^<]+)<', resp.get_data(as_text=True)).group(1)
    with transaction(db_url) as s:
        hook = s.scalars(select(Webhook)).one()
    assert (hook.secret, hook.events, hook.format) == (
        secret,
        ["job.failed", "sweep.finished"],
        "teams",
    )
    assert secret not in page.get("/settings/webhooks").get_data(as_text=True)

    bad = page.post("/settings/webhooks", data={**form, "url": "gopher://x", "events": []})
    assert bad.status_code == 422 and "must start with http:// or https://" in bad.get_data(
        as_text=True
    )

    token = page_csrf_token(page)
    tested = page.post(f"/settings/webhooks/{hook.id}/test", data={"csrf_token": token})
    assert tested.status_code == 303
    wd.fan_out(db_url)  # the dispatcher's first step: the ping's delivery row
    html = page.get("/settings/webhooks").get_data(as_text=True)
    assert f"ping:{hook.id}:" in html and "delivery-pending" in html
    bob = session_client(app, db_url, users.bob)
    assert bob.post(f"/settings/webhooks/{hook.id}/delete",
                    data={"csrf_token": page_csrf_token(bob)}).status_code == 404  # fmt: skip
    deleted = page.post(f"/settings/webhooks/{hook.id}/delete", data={"csrf_token": token})
    assert deleted.status_code == 303
    assert 'id="webhooks-empty"' in page.get("/settings/webhooks").get_data(as_text=True)


def test_the_readme_receiver_snippet_checks_a_real_signature() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("#### Checking a delivery") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code
    check = scope["verify_trainyard"]
    body, now = b'{"event":"ping"}', int(time.time())
    headers = wd.signed_headers("whsec_abc", "ping:1:x", "ping", body, 1)
    stamp, signature = headers["Trainyard-Timestamp"], headers["Trainyard-Signature"]
    assert abs(int(stamp) - now) <= 1
    assert check("whsec_abc", stamp, signature, body)
    assert not check("whsec_abd", stamp, signature, body)
    assert not check("whsec_abc", str(now - 301), sign("whsec_abc", now - 301, body), body)


def test_a_send_connects_to_the_checked_address_with_the_url_host_name(receiver: Receiver) -> None:
    """DNS rebinding: the address checked is the address connected to; the request
    still names the URL's host."""
    port = receiver.server.server_port
    asked: list[str] = []

    def dns(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    result = wd.post(f"http://hooks.invalid:{port}/in?x=1", b"{}", {"X-Test": "1"}, timeout=20,
                     allow_private=True, resolver=dns)  # fmt: skip
    assert result.ok and asked == ["hooks.invalid"]
    [(headers, _)] = receiver.requests
    assert headers["Host"] == f"hooks.invalid:{port}" and headers["X-Test"] == "1"


def test_https_is_verified_against_the_host_name(tmp_path: Path) -> None:
    import ssl
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=hooks.invalid", "-keyout", str(tmp_path / "key.pem"), "-out",
         str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    r = Receiver()
    r.server.socket = context.wrap_socket(r.server.socket, server_side=True)
    try:
        result = wd.post(f"https://hooks.invalid:{r.server.server_port}/", b"{}", {}, timeout=20,
                         allow_private=True, resolver=lambda h, p: ["127.0.0.1"])  # fmt: skip
    finally:
        r.close()
    assert not result.ok and r.requests == []
    assert result.error and result.error.startswith("TLS error: CERTIFICATE_VERIFY_FAILED")


def test_two_dispatchers_send_each_delivery_once(
    db_url: str, users, settings: Settings, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    """Several reconcilers may run: the lease gives each delivery to one of them."""
    add_webhook(db_url, users.alice.id, ["job.failed"], url=receiver.url)
    with transaction(db_url) as s:
        for i in range(12):
            webhooks.record_event(s, f"job.failed:{i}:1", "job.failed", users.alice.id,
                                  {"job": {"id": i}})  # fmt: skip
    assert wd.fan_out(db_url) == 12
    reports = [wd.DispatchReport(), wd.DispatchReport()]
    threads = [threading.Thread(target=wd.send_due, args=(settings, r)) for r in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = sorted(h["Trainyard-Event-Id"] for h, _ in receiver.requests)
    assert ids == sorted(f"job.failed:{i}:1" for i in range(12))  # each once
    assert reports[0].delivered + reports[1].delivered == 12


def test_a_receiver_trickling_its_answer_is_cut_off() -> None:
    import socket as sockets

    server = sockets.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():  # a header byte at a time, each within the timeout
                try:
                    conn.sendall(b"X")
                except OSError:
                    return
                stop.wait(0.1)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        result = wd.post(f"http://127.0.0.1:{server.getsockname()[1]}/", b"{}", {}, timeout=0.5,
                         allow_private=True)  # fmt: skip
    finally:
        stop.set()
        server.close()
    assert not result.ok and result.error == "no complete answer within 1 s"
    assert time.monotonic() - started < 3


@SQLITE_ONLY
def test_cli_create_list_test_deliveries_delete(
    live_server: str, users, settings: Settings, receiver: Receiver
) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from server.cli import main

    env = {"TRAINYARD_URL": live_server, "TRAINYARD_TOKEN": users.alice.token, "COLUMNS": "200"}

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, list(args), env=env)
        assert result.exit_code == 0, result.output
        return result.output

    made = cli("webhook", "create", receiver.url, "-e", "job.failed", "-e", "sweep.finished",
               "--format", "teams")  # fmt: skip
    hook_id = int(re.search(r"Created webhook (\d+)", made).group(1))
    secret = made.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    assert receiver.url in cli("webhook", "list") and secret not in cli("webhook", "list")
    event_id = cli("webhook", "test", str(hook_id)).split()[1].rstrip(".")
    wd.run_once(settings)
    assert re.search(rf"{re.escape(event_id)}\s*│\s*delivered\s*│\s*1\s*│\s*HTTP 200",
                     cli("webhook", "deliveries", str(hook_id)))  # fmt: skip
    [(headers, body)] = receiver.requests
    assert verify(secret, headers["Trainyard-Timestamp"], headers["Trainyard-Signature"], body)
    assert json.loads(body)["@type"] == "MessageCard"
    bad = CliRunner().invoke(main, ["webhook", "create", "ftp://x", "-e", "job.failed"], env=env)
    assert bad.exit_code == 1 and "must start with http:// or https://" in bad.output
    assert cli("webhook", "delete", str(hook_id)).strip() == f"Deleted webhook {hook_id}."
    assert cli("webhook", "list").strip() == "No webhooks."
