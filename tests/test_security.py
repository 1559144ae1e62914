"""Security behaviour over HTTP: tokens, browser sessions and CSRF, limits, artifact path
traversal, hostile bodies, security headers, and no code/pickles/import paths anywhere.

Who may call which endpoint is in test_authorization.py (the matrix).
"""

from __future__ import annotations

import ast
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from server.app import create_app
from shared import accounts, job_files
from shared.db import transaction
from shared.orm import Job, User
from shared.settings import Settings
from tests.conftest import as_user
from tests.helpers import train_spec

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery"
GENERIC_LOGIN_ERROR = "Wrong username or password."


@pytest.fixture(autouse=True)
def fast_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    # argon2's production cost is ~0.15 s per hash or check; these tests log in dozens of
    # times. Same code path, cheaper parameters.
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(accounts, "_hasher", cheap)
    dummy = cheap.hash("dummy")
    monkeypatch.setattr(accounts, "dummy_password_hash", lambda: dummy)


def error(resp: TestResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The response's error object, after checking the status and the one error shape."""
    body = resp.get_json(silent=True)
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True)[:300])
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "fields"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def job_count(db_url: str) -> int:
    with transaction(db_url) as s:
        return s.query(Job).count()


def set_password(db_url: str, user_id: int, password: str = PASSWORD) -> None:
    with transaction(db_url) as s:
        accounts.set_password(s.get(User, user_id), password)


class PageParser(HTMLParser):
    """The bits of a page a browser would use: hidden inputs and <meta> tags."""

    def __init__(self, html: str):
        super().__init__()
        self.inputs: dict[str, str] = {}
        self.metas: dict[str, str] = {}
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and "name" in a:
            self.inputs[a["name"]] = a.get("value", "")
        elif tag == "meta" and "name" in a:
            self.metas[a["name"]] = a.get("content", "")


def form_csrf(client: FlaskClient, path: str = "/login", **kw: Any) -> str:
    page = client.get(path, **kw)
    assert page.status_code == 200, page.status_code
    return PageParser(page.get_data(as_text=True)).inputs["csrf_token"]


def meta_csrf(client: FlaskClient, path: str = "/", **kw: Any) -> str:
    page = client.get(path, **kw)
    assert page.status_code == 200, page.status_code
    return PageParser(page.get_data(as_text=True)).metas["csrf-token"]


def login(
    client: FlaskClient, username: str, password: str = PASSWORD, next: str | None = None, **kw: Any
) -> TestResponse:
    """Log in through the real form: fetch it, take its csrf_token, post it back."""
    path = "/login" if next is None else f"/login?next={quote(next, safe='')}"
    token = form_csrf(client, path, **kw)
    return client.post(
        path, data={"csrf_token": token, "username": username, "password": password}, **kw
    )


def logged_in(client: FlaskClient) -> bool:
    resp = client.get("/")
    assert resp.status_code in (200, 302)
    return resp.status_code == 200


def set_cookies(resp: TestResponse, name: str = "trainyard_session") -> list[str]:
    return [c for c in resp.headers.getlist("Set-Cookie") if c.startswith(name + "=")]


# ---------------------------------------------------------------- API tokens


def test_token_lifecycle(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    alice = as_user(app, users.alice)
    created = alice.post("/api/v1/tokens", json={"name": "ci"})
    assert created.status_code == 201
    token = created.get_json()
    secret = token.pop("token")
    assert secret.startswith("ty_") and token["name"] == "ci" and token["user"] == "alice"
    assert secret.startswith(token["prefix"]) and len(token["prefix"]) < 16

    # Listed, never with the secret (or its hash).
    listing = alice.get("/api/v1/tokens")
    assert listing.status_code == 200
    listed = {t["id"]: t for t in listing.get_json()["tokens"]}
    assert listed[token["id"]]["name"] == "ci"
    assert all(set(t) == set(token) for t in listed.values())
    assert secret not in listing.get_data(as_text=True)

    # Used.
    bearer = {"Authorization": f"Bearer {secret}"}
    me = app.test_client().get("/api/v1/me", headers=bearer)
    assert me.status_code == 200 and me.get_json()["username"] == "alice"
    assert alice.get("/api/v1/tokens").get_json()["tokens"][0]["last_used_at"] is not None

    # Revoked: refused from then on; alice's other token still works.
    revoked = alice.delete(f"/api/v1/tokens/{token['id']}")
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"] is not None
    refused = app.test_client().get("/api/v1/me", headers=bearer)
    assert error(refused, 401, "unauthorized")["message"] == "invalid or revoked API token"
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert (
        app.test_client().post("/api/v1/jobs", json=train_spec(), headers=bearer).status_code == 401
    )
    assert job_count(db_url) == 0
    assert alice.get("/api/v1/me").status_code == 200
    # Revoking twice is harmless.
    assert alice.delete(f"/api/v1/tokens/{token['id']}").status_code == 200


def test_disabled_users_token_is_refused(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    alice = as_user(app, users.alice)
    assert alice.get("/api/v1/me").status_code == 200
    with transaction(db_url) as s:
        s.get(User, users.alice.id).is_active = False
    error(alice.get("/api/v1/me"), 401, "unauthorized")
    error(alice.post("/api/v1/jobs", json=train_spec()), 401, "unauthorized")
    assert as_user(app, users.bob).get("/api/v1/me").status_code == 200


def test_malformed_authorization_headers_are_401_never_500(app: Flask, users) -> None:  # type: ignore[no-untyped-def]
    token = users.alice.token
    bad = {
        "empty": "",
        "no scheme": token,
        "basic": "Basic YWxpY2U6cGFzc3dvcmQ=",
        "scheme only": "Bearer",
        "scheme and space": "Bearer ",
        "other scheme": f"Token {token}",
        "trailing junk": f"Bearer {token} extra",
        "two tokens": f"Bearer {token}, Bearer {token}",
        "not a token": "Bearer not-a-token",
        "right prefix, wrong secret": "Bearer ty_" + "A" * 43,
        "NUL": f"Bearer {token[:10]}\x00{token[10:]}",
        "latin-1": "Bearer ty_\xe9\xe9\xe9",
        "huge": "Bearer ty_" + "a" * 200_000,
        "huge, no scheme": "x" * 200_000,
    }
    client = app.test_client()
    for label, value in bad.items():
        resp = client.get("/api/v1/me", headers={"Authorization": value})
        assert resp.status_code == 401, (label, resp.status_code)
        error(resp, 401, "unauthorized")
    # The scheme is case-insensitive (RFC 9110 11.1).
    assert client.get("/api/v1/me", headers={"Authorization": f"bearer {token}"}).status_code == 200


# ---------------------------------------------------------------- browser sessions


def test_login_sets_a_locked_down_session_cookie(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    client = app.test_client()
    assert not logged_in(client)
    resp = login(client, "alice")
    assert resp.status_code == 302 and resp.headers["Location"] == "/"
    cookies = set_cookies(resp)
    assert cookies, resp.headers
    for cookie in cookies:
        flags = [f.strip().lower() for f in cookie.split(";")[1:]]
        assert "httponly" in flags and "samesite=lax" in flags, cookie
        assert "secure" not in flags, cookie  # plain-http settings: a Secure cookie would be lost
    home = client.get("/")
    assert home.status_code == 200 and "alice" in home.get_data(as_text=True)
    assert client.get("/api/v1/me").get_json()["username"] == "alice"


def test_session_cookie_is_secure_over_https(settings: Settings, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    https = {"base_url": "https://trainyard.example"}
    for update in ({"secure_cookies": True}, {"url": "https://trainyard.example"}):
        client = create_app(settings.model_copy(update=update), {"TESTING": True}).test_client()
        resp = login(client, "alice", **https)
        assert resp.status_code == 302, (update, resp.get_data(as_text=True))
        cookies = set_cookies(resp)
        assert cookies and all("; Secure" in c and "HttpOnly" in c for c in cookies), cookies
        assert client.get("/api/v1/me", **https).get_json()["username"] == "alice"


def test_wrong_password_and_unknown_user_answer_alike(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    answers = []
    for username, password in (("alice", "not her password"), ("nobody-here", PASSWORD)):
        client = app.test_client()
        resp = login(client, username, password)
        assert resp.status_code == 401
        html = resp.get_data(as_text=True)
        errors = re.findall(r'<p class="field-error"[^>]*>([^<]*)</p>', html)
        assert errors == [GENERIC_LOGIN_ERROR], errors
        assert not set_cookies(resp) or not logged_in(client)
        # The whole page, less the echoed username and the CSRF token, is the same.
        answers.append(re.sub(r'(value|content)="[^"]*"', r'\1=""', html.replace(username, "<u>")))
    assert answers[0] == answers[1]
    # Disabled users and users without a password read the same too.
    with transaction(db_url) as s:
        s.get(User, users.alice.id).is_active = False
    # So do names no account can have: a NUL byte used to reach PostgreSQL as a query
    # parameter, which refuses it (a 500).
    for username in ("alice", "bob", "al\x00ice", "\x00"):  # bob has no password at all
        resp = login(app.test_client(), username, PASSWORD)
        assert resp.status_code == 401, (username, resp.status_code)
        assert GENERIC_LOGIN_ERROR in resp.get_data(as_text=True)


OFFSITE_NEXT = [
    "//evil.example", "https://evil.example/", "/\\evil.example", "///evil.example",
    "/\t/evil.example", "javascript:alert(1)", "http:/evil.example",
    "/x\r\nSet-Cookie: planted=1",  # header injection: was a 500 (Werkzeug refused it)
]  # fmt: skip


def test_login_follows_next_only_within_the_site(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    for target in OFFSITE_NEXT:
        resp = login(app.test_client(), "alice", next=target)
        assert resp.status_code == 302, (target, resp.status_code)
        assert resp.headers["Location"] == "/", (target, resp.headers["Location"])
    resp = login(app.test_client(), "alice", next="/api/v1/me?x=1")
    assert resp.headers["Location"] == "/api/v1/me?x=1"


def test_session_writes_need_the_csrf_token(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    set_password(db_url, users.bob.id)
    client = app.test_client()
    login(client, "alice")
    # Reads ride on the session alone.
    assert client.get("/api/v1/jobs").status_code == 200

    # A write without the header, or with a wrong or someone else's token: refused.
    bob = app.test_client()
    login(bob, "bob")
    for headers in ({}, {"X-CSRFToken": "forged"}, {"X-CSRFToken": meta_csrf(bob)}):
        refused = client.post("/api/v1/jobs", json=train_spec(), headers=headers)
        err = error(refused, 400, "csrf_failed")
        assert "X-CSRFToken" in err["fields"], err
    tokens = client.get("/api/v1/tokens").get_json()["tokens"]
    error(client.delete(f"/api/v1/tokens/{tokens[0]['id']}"), 400, "csrf_failed")
    error(client.post("/api/v1/tokens", json={}), 400, "csrf_failed")
    assert job_count(db_url) == 0

    # With the token the page gives it (<meta name="csrf-token">): accepted.
    token = meta_csrf(client)
    created = client.post("/api/v1/jobs", json=train_spec(), headers={"X-CSRFToken": token})
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["owner"] == "alice" and job_count(db_url) == 1


def test_logout_needs_the_csrf_token(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    client = app.test_client()
    login(client, "alice")
    # A cross-site form (no token) cannot log the user out.
    resp = client.post("/logout")
    assert resp.status_code == 302 and logged_in(client)
    resp = client.post("/logout", data={"csrf_token": "forged"})
    assert logged_in(client)
    resp = client.post("/logout", data={"csrf_token": meta_csrf(client)})
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    assert not logged_in(client)
    error(client.get("/api/v1/me"), 401, "unauthorized")


def test_login_form_without_csrf_token_is_refused(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    client = app.test_client()
    client.get("/login")  # a session exists, but the post does not carry its token
    for data in (
        {"username": "alice", "password": PASSWORD},
        {"username": "alice", "password": PASSWORD, "csrf_token": "forged"},
    ):
        resp = client.post("/login", data=data)
        assert resp.status_code == 400
        assert "The form expired" in resp.get_data(as_text=True)
        assert not logged_in(client)
    # A token from another browser's session does not work either.
    other = form_csrf(app.test_client())
    resp = client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "csrf_token": other}
    )
    assert resp.status_code == 400 and not logged_in(client)


def test_password_change_or_disabling_ends_existing_sessions(
    app: Flask, users, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    # The session holds the users.session_version it was issued under; changing the
    # password bumps it, and a disabled user's sessions are refused outright.
    new_password = "a brand new password"
    for change in ("password", "disable"):
        set_password(db_url, users.alice.id)
        browsers = [app.test_client(), app.test_client()]
        for browser in browsers:
            login(browser, "alice")
            assert logged_in(browser)
        with transaction(db_url) as s:
            user = s.get(User, users.alice.id)
            if change == "password":
                accounts.set_password(user, new_password)
            else:
                user.is_active = False
        for browser in browsers:
            assert not logged_in(browser), change
            error(browser.get("/api/v1/me"), 401, "unauthorized")
        if change == "password":
            fresh = app.test_client()
            assert login(fresh, "alice", new_password).status_code == 302
            assert logged_in(fresh)


def copied_session(source: FlaskClient, app: Flask) -> FlaskClient:
    """Another browser holding a copy of `source`'s session cookie: a stolen cookie."""
    cookie = source.get_cookie("trainyard_session")
    assert cookie is not None
    thief = app.test_client()
    thief.set_cookie("trainyard_session", cookie.value)
    return thief


def assert_logged_out(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 302 and page.headers["Location"].startswith("/login"), page.status
    error(client.get("/api/v1/me"), 401, "unauthorized")


def test_logout_ends_the_session_on_the_server(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    # The attack: copy the session cookie (a shared machine, a proxy log, malware), wait
    # for the owner to log out, use the copy. A signed cookie alone stayed valid 31 days.
    set_password(db_url, users.alice.id)
    browser, laptop = app.test_client(), app.test_client()
    login(browser, "alice")
    login(laptop, "alice")
    thief = copied_session(browser, app)
    assert logged_in(thief) and thief.get("/api/v1/me").get_json()["username"] == "alice"

    resp = browser.post("/logout", data={"csrf_token": meta_csrf(browser)})
    assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    # Every session of alice's ends: the copy, the browser, her other machine.
    for client in (thief, browser, laptop):
        assert_logged_out(client)
    # A new login works and is not ended by the old copy's existence.
    assert login(browser, "alice").status_code == 302 and logged_in(browser)
    assert_logged_out(thief)


def test_sessions_expire_after_the_session_lifetime(
    settings: Settings, users, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from server import auth

    set_password(db_url, users.alice.id)
    app = create_app(settings.model_copy(update={"session_hours": 2.0}), {"TESTING": True})
    client = app.test_client()
    resp = login(client, "alice")
    # A persistent cookie that the browser drops when the session would end anyway.
    assert any("Expires=" in c for c in set_cookies(resp)), set_cookies(resp)
    start = auth.clock()
    monkeypatch.setattr(auth, "clock", lambda: start + 1.9 * 3600)
    assert logged_in(client)  # using the session does not extend it past its lifetime...
    monkeypatch.setattr(auth, "clock", lambda: start + 2.1 * 3600)
    assert_logged_out(client)  # ...which is absolute, counted from the login


def test_csrf_token_is_rotated_at_login(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    # A token learned before login (a fixation: the attacker planted or read the login
    # page's token) must not authorize anything in the logged-in session.
    set_password(db_url, users.alice.id)
    client = app.test_client()
    before = form_csrf(client)
    assert login(client, "alice").status_code == 302
    after = meta_csrf(client)
    assert after != before
    refused = client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRFToken": before})
    error(refused, 400, "csrf_failed")
    client.post("/logout", data={"csrf_token": before})
    assert logged_in(client)
    ok = client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRFToken": after})
    assert ok.status_code == 201, ok.get_json()


def shift_signed_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Move the clock that signs and checks CSRF tokens `seconds` ahead."""
    import itsdangerous.timed

    real = itsdangerous.timed.TimestampSigner.get_timestamp
    monkeypatch.setattr(
        itsdangerous.timed.TimestampSigner,
        "get_timestamp",
        lambda self: int(real(self) + seconds),
    )


def test_csrf_tokens_expire_with_a_clear_message(
    settings: Settings, users, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    app = create_app(settings.model_copy(update={"csrf_hours": 1.0}), {"TESTING": True})
    client = app.test_client()
    stale = form_csrf(client)
    shift_signed_clock(monkeypatch, 3700)
    # The login form left open too long: said on the page, which carries a fresh token.
    resp = client.post(
        "/login", data={"csrf_token": stale, "username": "alice", "password": PASSWORD}
    )
    assert resp.status_code == 400 and "The form expired" in resp.get_data(as_text=True)
    fresh = PageParser(resp.get_data(as_text=True)).inputs["csrf_token"]
    data = {"csrf_token": fresh, "username": "alice", "password": PASSWORD}
    assert client.post("/login", data=data).status_code == 302 and logged_in(client)

    # A page's token (API calls from the page, the logout button) after an hour.
    stale = meta_csrf(client)
    shift_signed_clock(monkeypatch, 2 * 3700)
    err = error(client.post("/api/v1/tokens", json={}, headers={"X-CSRFToken": stale}), 400)
    assert err["code"] == "csrf_failed" and "expired" in err["message"]
    assert "reload" in err["message"]
    resp = client.post("/submit", data={"csrf_token": stale})
    assert resp.status_code == 400 and "The form expired" in resp.get_data(as_text=True)
    resp = client.post("/logout", data={"csrf_token": stale}, follow_redirects=True)
    assert "expired" in resp.get_data(as_text=True) and "reload" in resp.get_data(as_text=True)
    assert logged_in(client)  # not logged out by a stale (possibly forged) request


ATTACKER, OWNER = "198.51.100.7", "203.0.113.9"


def from_address(app: Flask, address: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


@pytest.fixture
def throttle_clock(app: Flask, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The login throttle's clock, frozen: a test moves it by hand (no sleeping)."""
    return frozen_throttle_clock(app, monkeypatch)


def frozen_throttle_clock(app: Flask, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    from server.login_throttle import login_throttle

    with app.app_context():
        throttle = login_throttle()
    now = [throttle.clock()]
    monkeypatch.setattr(throttle, "clock", lambda: now[0])
    return now


def assert_throttled(resp: TestResponse) -> int:
    assert resp.status_code == 429, resp.status_code
    html = resp.get_data(as_text=True)
    assert "Too many failed logins" in html and "try again in" in html, html
    retry_after = resp.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) > 0, retry_after
    return int(retry_after)


def test_failed_logins_cannot_lock_the_owner_out(
    app: Flask, users, db_url: str, throttle_clock
) -> None:  # type: ignore[no-untyped-def]
    # The attack: fail on purpose for someone else's name until the limit locks them out.
    # It used to take 11 wrong passwords from one address to lock `alice` out for
    # everyone, for as long as the attacker kept going.
    set_password(db_url, users.alice.id)
    attacker = from_address(app, ATTACKER)
    answers = [login(attacker, "alice", "guess").status_code for _ in range(20)]
    assert answers.count(401) == 6 and set(answers[6:]) == {429}, answers
    # The owner, from an address that has not failed, logs in at once.
    owner = from_address(app, OWNER)
    assert login(owner, "alice").status_code == 302 and logged_in(owner)
    # The attacker's address waits, even with the right password (or the wait would not
    # slow guessing), and is told how long.
    retry_after = assert_throttled(login(attacker, "alice"))
    assert not logged_in(attacker)
    # The wait expires; the next failure doubles it.
    throttle_clock[0] += retry_after
    assert login(attacker, "alice", "guess").status_code == 401
    assert assert_throttled(login(attacker, "alice", "guess")) == 2 * retry_after
    throttle_clock[0] += 2 * retry_after
    assert login(attacker, "alice").status_code == 302 and logged_in(attacker)


def test_backoff_is_capped_and_forgotten_after_a_success(
    app: Flask, settings: Settings, users, db_url: str, redis_url: str, throttle_clock
) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    client = from_address(app, ATTACKER)
    waits = []
    for _ in range(32):
        resp = login(client, "alice", "guess")
        if resp.status_code == 429:
            wait = assert_throttled(resp)
            waits.append(wait)
            throttle_clock[0] += wait
    assert waits[:4] == [1, 2, 4, 8] and max(waits) == waits[-1] == 900, waits
    # Counted in Redis: every web process makes this address wait.
    assert redis.Redis.from_url(redis_url).keys("trainyard:login-failures:*")
    other_process = from_address(create_app(settings, {"TESTING": True}), ATTACKER)
    assert_throttled(login(other_process, "alice"))
    throttle_clock[0] += 900
    assert login(client, "alice").status_code == 302
    client.post("/logout", data={"csrf_token": meta_csrf(client)})
    # A success clears that name's count: the next typo is a free one again.
    assert login(client, "alice", "typo").status_code == 401
    assert login(client, "alice").status_code == 302


def test_one_address_guessing_many_names_is_slowed(
    app: Flask, users, db_url: str, throttle_clock
) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    sprayer = from_address(app, ATTACKER)
    answers = [login(sprayer, f"user{i}", "guess").status_code for i in range(25)]
    assert answers.count(401) == 21 and set(answers[21:]) == {429}, answers
    # A name this address never tried: the address itself waits.
    assert_throttled(login(sprayer, "alice"))
    # Other addresses are not affected.
    assert login(from_address(app, OWNER), "alice").status_code == 302


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_forwarded_for_is_ignored_without_a_trusted_proxy(
    app: Flask, users, db_url: str, throttle_clock
) -> None:  # type: ignore[no-untyped-def]
    # With TRAINYARD_TRUSTED_PROXIES=0 (no proxy in front), X-Forwarded-For is whatever
    # the client wrote: a new made-up address per attempt must not reset its count.
    set_password(db_url, users.alice.id)
    attacker = from_address(app, ATTACKER)
    answers = [
        login(attacker, "alice", "guess", headers={"X-Forwarded-For": f"10.0.{i}.1"}).status_code
        for i in range(8)
    ]
    assert answers == [401] * 6 + [429] * 2, answers


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_trusted_proxy_supplies_the_client_address(
    settings: Settings, users, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    app = create_app(settings.model_copy(update={"trusted_proxies": 1}), {"TESTING": True})
    frozen_throttle_clock(app, monkeypatch)
    proxy = "10.0.0.2"  # every request arrives from the proxy's address

    def via_proxy(forwarded_for: str, password: str) -> TestResponse:
        return login(
            from_address(app, proxy), "alice", password,
            headers={"X-Forwarded-For": forwarded_for},
        )  # fmt: skip

    # The proxy appends the address it saw; what the client wrote before it is not trusted.
    for i in range(6):
        assert via_proxy(f"10.9.{i}.9, {ATTACKER}", "guess").status_code == 401
    assert_throttled(via_proxy(f"1.2.3.4, {ATTACKER}", "guess"))
    # Another client behind the same proxy is another address.
    assert via_proxy(OWNER, PASSWORD).status_code == 302


# ---------------------------------------------------------------- submission limits


def assert_429(resp: TestResponse, code: str) -> int:
    error(resp, 429, code)
    retry_after = resp.headers.get("Retry-After", "")
    assert retry_after.isdigit() and int(retry_after) > 0, retry_after
    return int(retry_after)


def test_submission_rate_limit(settings: Settings, users, db_url: str, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    limited = settings.model_copy(update={"submit_rate_limit": "3/minute"})
    app = create_app(limited, {"TESTING": True})
    alice = as_user(app, users.alice)
    for _ in range(3):
        assert alice.post("/api/v1/jobs", json=train_spec()).status_code == 201
    assert assert_429(alice.post("/api/v1/jobs", json=train_spec()), "rate_limited") <= 60
    assert job_count(db_url) == 3
    # Per user: bob is not affected.
    assert as_user(app, users.bob).post("/api/v1/jobs", json=train_spec()).status_code == 201
    # Counted in Redis, so every web process shares it: a second app sees alice's count.
    other_process = as_user(create_app(limited, {"TESTING": True}), users.alice)
    assert_429(other_process.post("/api/v1/jobs", json=train_spec()), "rate_limited")
    keys = redis.Redis.from_url(redis_url).keys("*submit*")
    assert keys, "no rate-limit counters in Redis"


def test_queued_jobs_cap(settings: Settings, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"max_queued_per_user": 2}), {"TESTING": True})
    alice = as_user(app, users.alice)
    first = alice.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    assert alice.post("/api/v1/jobs", json=train_spec()).status_code == 201
    assert_429(alice.post("/api/v1/jobs", json=train_spec()), "too_many_queued_jobs")
    assert as_user(app, users.bob).post("/api/v1/jobs", json=train_spec()).status_code == 201
    assert alice.post(f"/api/v1/jobs/{first}/cancel").status_code == 200
    assert alice.post("/api/v1/jobs", json=train_spec()).status_code == 201
    assert job_count(db_url) == 4


def test_retry_is_subject_to_the_limits(settings: Settings, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    def finished_job(client: FlaskClient) -> int:
        job_id = client.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
        with transaction(db_url) as s:
            s.get(Job, job_id).state = "failed"
        return job_id

    # Queued cap: alice has one queued job, her limit.
    capped = create_app(settings.model_copy(update={"max_queued_per_user": 1}), {"TESTING": True})
    alice = as_user(capped, users.alice)
    done = finished_job(alice)
    assert alice.post("/api/v1/jobs", json=train_spec()).status_code == 201
    assert_429(alice.post(f"/api/v1/jobs/{done}/retry"), "too_many_queued_jobs")
    # Rate: bob's submission and first retry use his 2/minute.
    rated = create_app(
        settings.model_copy(update={"submit_rate_limit": "2/minute"}), {"TESTING": True}
    )
    bob = as_user(rated, users.bob)
    done = finished_job(bob)
    assert bob.post(f"/api/v1/jobs/{done}/retry").status_code == 201
    assert_429(bob.post(f"/api/v1/jobs/{done}/retry"), "rate_limited")
    assert job_count(db_url) == 4


# ---------------------------------------------------------------- artifacts


def test_artifact_names_cannot_escape_the_job_directory(
    app: Flask, settings: Settings, users
) -> None:  # type: ignore[no-untyped-def]
    alice, bob = as_user(app, users.alice), as_user(app, users.bob)
    job = alice.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    bobs = bob.post("/api/v1/jobs", json=train_spec()).get_json()["id"]
    mine, theirs = job_files.job_dir(settings, job), job_files.job_dir(settings, bobs)
    root = settings.resolved_artifacts_dir
    # Real files to download...
    (mine / "attempt-1").mkdir(parents=True)
    (mine / "attempt-1" / "best.pt").write_bytes(b"weights")
    (mine / "nested" / "deeper").mkdir(parents=True)
    (mine / "nested" / "deeper" / "report.txt").write_text("report")
    (mine / "page.html").write_text("<script>alert(1)</script>")
    # ...and secrets next to them that no name may reach.
    secrets_ = {
        root / "secret.txt": "ROOT-SECRET",
        theirs / "attempt-1" / "best.pt": "BOBS-SECRET",
        settings.home / "secret-key": None,  # the app's signing key, written at start
    }
    for path, content in secrets_.items():
        if content is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    secret_texts = [p.read_text().strip() for p in secrets_]
    (mine / "link.txt").symlink_to(root / "secret.txt")
    (mine / "linkdir").symlink_to(theirs, target_is_directory=True)
    (mine / "attempt-1" / "up").symlink_to(root, target_is_directory=True)

    relative = {  # from the job directory (artifacts/jobs/<id>/) to each secret
        "root": "../../secret.txt",
        "bob": f"../{bobs}/attempt-1/best.pt",
        "home": f"../../../{settings.home.name}/secret-key",
    }
    names = []
    for rel in relative.values():
        names += [
            rel,
            rel.replace("../", "..%2f"),
            rel.replace("../", "..%2F"),
            rel.replace("../", "%2e%2e/"),
            rel.replace("../", "%2e%2e%2f"),
            rel.replace("../", "%252e%252e%252f"),  # double-encoded
            rel.replace("../", "....//"),
            rel.replace("../", ".../"),
            rel.replace("../", "..\\"),
            rel.replace("../", "..%5c"),
            "attempt-1/../" + rel,
            "./" + rel,
            "nested/deeper/../../" + rel,
            rel + "%00",
            rel + "%00attempt-1/best.pt",
        ]
    names += [
        "attempt-1/best.pt%00",
        "attempt-1/best.pt%00.txt",
        "attempt-1%00/best.pt",
        "attempt-1\\best.pt",
        "C:%5csecret.txt",
        "link.txt",
        "linkdir/attempt-1/best.pt",
        "attempt-1/up/secret.txt",
        "attempt-1/./best.pt",
        "attempt-1//best.pt",
        ".",
        "..",
        "%2e",
    ]
    absolute = [str(root / "secret.txt"), quote(str(root / "secret.txt"), safe="")]
    base = f"/api/v1/jobs/{job}/artifacts/"
    for name in names + absolute:
        resp = alice.get(base + name)
        if resp.status_code == 308:
            # Werkzeug merges the "//" of an absolute name before routing; the redirect
            # stays inside this job's artifacts (answered the same for any job id).
            assert resp.headers["Location"].split("localhost", 1)[-1].startswith(base), name
            resp = alice.get(base + name, follow_redirects=True)
        assert resp.status_code in (400, 404), (name, resp.status_code)
        body = resp.get_data(as_text=True)
        assert not any(secret in body for secret in secret_texts), name
        assert resp.is_json, name
    # Listing skips the symlinks too.
    listed = {a["path"] for a in alice.get(base.rstrip("/")).get_json()["artifacts"]}
    assert listed == {"attempt-1/best.pt", "nested/deeper/report.txt", "page.html"}

    # The real files download, as attachments that a browser will not sniff or render.
    for name, content in (
        ("attempt-1/best.pt", b"weights"),
        ("nested/deeper/report.txt", b"report"),
        ("page.html", b"<script>alert(1)</script>"),
    ):
        resp = alice.get(base + name)
        assert resp.status_code == 200 and resp.data == content, name
        disposition = resp.headers["Content-Disposition"]
        assert disposition.startswith("attachment") and Path(name).name in disposition
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    # Bob cannot download alice's artifact by name either.
    assert bob.get(base + "attempt-1/best.pt").status_code == 404


# ---------------------------------------------------------------- hostile bodies


def test_oversized_and_malformed_bodies(settings: Settings, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    app = create_app(
        settings.model_copy(update={"max_body_bytes": 1024, "max_upload_bytes": 4096}),
        {"TESTING": True},
    )
    alice = as_user(app, users.alice)

    def post(path: str, data: bytes | str, content_type: str | None) -> TestResponse:
        return alice.post(path, data=data, content_type=content_type)

    big = train_spec(name="x" * 2000)
    error(alice.post("/api/v1/jobs", json=big), 413, "body_too_large")
    error(alice.post("/api/v1/tokens", json={"name": "x" * 2000}), 413, "body_too_large")
    # Uploads have their own, larger limit.
    csv = b"a,b\n" + b"1,2\n" * 700  # 2.8 kB: over the body limit, under the upload limit
    assert post("/api/v1/uploads", csv, "text/csv").status_code == 201
    error(post("/api/v1/uploads", b"a,b\n" + b"1,2\n" * 1500, "text/csv"), 413, "body_too_large")
    huge_file = {"file": (__import__("io").BytesIO(b"a,b\n" + b"1,2\n" * 1500), "big.csv")}
    resp = alice.post("/api/v1/uploads", data=huge_file, content_type="multipart/form-data")
    error(resp, 413, "body_too_large")

    json_type = "application/json"
    error(post("/api/v1/jobs", b'{"kind": "train", ', json_type), 400, "invalid_json")
    error(post("/api/v1/jobs", b"\xff\xfe\x00{}", json_type), 400, "invalid_json")
    error(post("/api/v1/jobs", b'{"kind": "\xff"}', json_type), 400, "invalid_json")
    for not_an_object in (b"[]", b"[1, 2]", b'"train"', b"3", b"true"):
        err = error(post("/api/v1/jobs", not_an_object, json_type), 422)
        assert "body" in err["fields"], (not_an_object, err)
    for wrong_type in ("text/plain", "application/x-www-form-urlencoded", None):
        error(post("/api/v1/jobs", b'{"kind": "train"}', wrong_type), 415)
    error(post("/api/v1/tokens", b'{"name": "x"}', "text/plain"), 415)
    error(post("/api/v1/uploads", b"a,b\n1,2\n", "application/json"), 415)
    err = error(post("/api/v1/uploads", b"a,b\n\xff\xfe,2\n", "text/csv"), 422)
    assert "file" in err["fields"]
    assert job_count(db_url) == 0


def test_hostile_json_is_a_4xx_never_a_500(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    alice = as_user(app, users.alice)
    # 10k levels of nesting (20 kB, under max_body_bytes): json.loads raises RecursionError,
    # which get_json(silent=True) does not catch; it was a 500 (fixed in server/params.py).
    deep = "[" * 10_000 + "]" * 10_000
    for path in ("/api/v1/jobs", "/api/v1/tokens"):
        resp = alice.post(path, data=deep, content_type="application/json")
        assert 400 <= resp.status_code < 500, (path, resp.status_code)
        error(resp, resp.status_code)

    # POST /tokens read any non-object or non-JSON body as {} and made a token (fixed).
    before = len(alice.get("/api/v1/tokens").get_json()["tokens"])
    for body in (b"{not json", b"\xff\xfe", b"null", b"[]", b"0", b"false", b'""'):
        resp = alice.post("/api/v1/tokens", data=body, content_type="application/json")
        assert resp.status_code in (400, 422), (body, resp.status_code)
    assert len(alice.get("/api/v1/tokens").get_json()["tokens"]) == before

    # NUL bytes: SQLite stores them, PostgreSQL refuses them (was a 500 there). Refused,
    # or stored without the NUL; never a 500.
    for label, resp, stored_as in (
        ("job", alice.post("/api/v1/jobs", json=train_spec(name="a\x00b", tags=["t\x00"])), "name"),
        ("token", alice.post("/api/v1/tokens", json={"name": "a\x00b"}), "name"),
        ("upload", alice.post("/api/v1/uploads?filename=a%00.csv", data=b"a,b\n1,2\n3,4\n",
                              content_type="text/csv"), "filename"),
    ):  # fmt: skip
        assert resp.status_code < 500, (label, resp.status_code)
        if resp.status_code < 300:
            assert "\x00" not in resp.get_json()[stored_as], (label, resp.get_json())
    assert job_count(db_url) == 0


# ---------------------------------------------------------------- security headers


def csp(resp: TestResponse) -> dict[str, list[str]]:
    policy = resp.headers.get("Content-Security-Policy", "")
    directives = (d.split() for d in policy.split(";") if d.strip())
    return {d[0]: d[1:] for d in directives}


def test_security_headers(app: Flask, users, db_url: str) -> None:  # type: ignore[no-untyped-def]
    set_password(db_url, users.alice.id)
    client = app.test_client()
    pages = [client.get("/login")]
    login(client, "alice")
    pages.append(client.get("/"))
    if any(rule.rule == "/api/docs" for rule in app.url_map.iter_rules()):
        pages.append(client.get("/api/docs"))  # Swagger UI: still no inline script
    for resp in pages:
        assert resp.status_code == 200 and resp.mimetype == "text/html"
        policy = csp(resp)
        scripts = policy.get("script-src", policy.get("default-src"))
        assert scripts == ["'self'"], policy
        assert policy["default-src"] == ["'self'"] and policy["object-src"] == ["'none'"]
        assert policy["frame-ancestors"] == ["'none'"], policy
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        html = resp.get_data(as_text=True)
        # The CSP forbids inline script, so the pages must not need any.
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline <script> in page"
        assert not re.search(r"\son[a-z]+\s*=", html), "inline event handler in page"
    # The login redirect is HTML too (a framed redirect is still a frame).
    redirect = app.test_client().get("/")
    assert redirect.status_code == 302 and csp(redirect)["frame-ancestors"] == ["'none'"]

    # JSON answers, successes and errors alike, are never sniffed into something else.
    alice, anonymous = as_user(app, users.alice), app.test_client()
    for resp in (
        alice.get("/api/v1/me"),
        alice.get("/api/v1/jobs/12345"),
        anonymous.get("/api/v1/jobs"),
        anonymous.get("/healthz"),
        anonymous.get("/no/such/page"),
    ):
        assert resp.is_json, resp.headers
        assert resp.headers["X-Content-Type-Options"] == "nosniff"


# ---------------------------------------------------------------- no code, pickles, imports


PICKLE_B64 = "gASVKAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAJpZJSFlFKULg=="  # os.system("id")


def test_specs_cannot_name_code_or_carry_pickles(client, db_url: str) -> None:  # type: ignore[no-untyped-def]
    cases = {
        "model.name": train_spec(model={"name": "torch.nn.Linear"}),
        "dataset.name": train_spec(dataset={"name": "os.system"}),
        "optimizer.name": train_spec(optimizer={"name": "__import__('os')"}),
        "model.params.__class__": train_spec(
            model={"name": "cnn", "params": {"__class__": "torch.nn.Module"}}
        ),
        "epochs": train_spec(epochs=PICKLE_B64),
        "optimizer.lr": train_spec(optimizer={"name": "adam", "lr": PICKLE_B64}),
        "model.params.dropout": train_spec(
            model={"name": "cnn", "params": {"dropout": PICKLE_B64}}
        ),
        "loss": train_spec(loss="torch.nn.functional.nll_loss"),
        "__reduce__": train_spec(__reduce__=PICKLE_B64),
    }
    for field, spec in cases.items():
        err = error(client.post("/api/v1/jobs", json=spec), 422, "invalid_spec")
        assert any(k == field or k.startswith(field + ".") for k in err["fields"]), (field, err)
    assert job_count(db_url) == 0


def python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]


def test_checkpoints_are_only_loaded_with_weights_only() -> None:
    found, bad = 0, []
    for path in python_files("worker", "shared"):
        tree = ast.parse(path.read_text(), str(path))
        torch_load_names = {"torch.load"} | {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "torch"
            for alias in node.names
            if alias.name == "load"
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or ast.unparse(node.func) not in torch_load_names:
                continue
            found += 1
            weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)
    assert found, "no torch.load call found: is the scan looking in the right place?"


UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "__import__", "importlib.import_module", "import_module"}


def test_web_side_never_unpickles_or_imports_by_name() -> None:
    """server/ and shared/ (what the web process runs) take no code from a request."""
    bad = []
    for path in python_files("server", "shared"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                bad += [f"{where}: import {a.name}" for a in node.names if a.name in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and node.module in UNSAFE_MODULES:
                bad.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in UNSAFE_CALLS:
                bad.append(f"{where}: {ast.unparse(node)[:80]}")
    assert not bad, "code or pickles loaded on the web side:\n" + "\n".join(bad)
