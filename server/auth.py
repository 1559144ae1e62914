"""Who is asking: API tokens, browser sessions, CSRF, and the per-user submission limits.

Every API request is authenticated in `authenticate_api_request` (a before_request hook
on the API blueprints): an `Authorization: Bearer` token, or else the browser's login
session. A session is ambient (the browser sends it to any site's form), so a
state-changing request that rides on a session must carry the CSRF token; a bearer
token is not ambient, so token requests need none. The user is `g.user` (a `Principal`
detached from the database session) for the rest of the request.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from flask import Flask, current_app, g, request
from flask import session as flask_session
from flask.typing import ResponseReturnValue
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf.csrf import CSRFError, CSRFProtect
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import func, select

from server import login_throttle
from server.database import get_session
from server.errors import ApiError, error_response
from shared import accounts
from shared.broker import redis_client
from shared.orm import Job, User
from shared.settings import Settings

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRFToken"

login_manager = LoginManager()
csrf = CSRFProtect()


# The clock sessions are dated by; a test moves it to see a session expire.
clock: Callable[[], float] = time.time


@dataclass(frozen=True)
class Principal(UserMixin):
    """The authenticated user of a request, safe to use after the DB session closes."""

    id: int
    username: str
    role: str
    # users.session_version when the session began, and when (Unix seconds): both are
    # part of the session cookie's user id, so bumping the version (logout, password,
    # role, disable) ends every session, and a session ends `session_hours` after login.
    session_version: int
    issued_at: int
    # users.can_run_code as of this request (admins may anyway: see may_run_code).
    can_run_code: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def may_run_code(self) -> bool:
        """May submit script jobs and upload code bundles: docs/architecture.md,
        "Script jobs" (running code on the workers is a privilege)."""
        return self.is_admin or self.can_run_code

    def get_id(self) -> str:
        return f"{self.id}.{self.session_version}.{self.issued_at}"


def principal(user: User, issued_at: int | None = None) -> Principal:
    return Principal(
        id=user.id,
        username=user.username,
        role=user.role,
        session_version=user.session_version or 0,
        issued_at=int(clock()) if issued_at is None else issued_at,
        can_run_code=bool(user.can_run_code),
    )


@login_manager.user_loader
def _load_session_user(session_id: str) -> Principal | None:
    parts = session_id.split(".")
    # Anything else is a session from before versions (or not ours): logged out.
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    user_id, version, issued_at = (int(p) for p in parts)
    lifetime = current_app.config["PERMANENT_SESSION_LIFETIME"].total_seconds()
    if clock() - issued_at > lifetime:
        return None
    user = get_session().get(User, user_id)
    if user is None or not user.is_active or (user.session_version or 0) != version:
        return None
    return principal(user, issued_at)


def start_session(user: User) -> None:
    """Log `user` in: a new session (and CSRF token) replaces whatever the browser had.

    Starting from an empty session means nothing chosen before login carries into it:
    not a CSRF token an attacker read or planted on the login page (fixation), not
    anything else.
    """
    flask_session.clear()
    g.pop("csrf_token", None)  # Flask-WTF's per-request cache of the old token
    flask_session.permanent = True  # the cookie expires with the session
    login_user(principal(user))


def end_session(user: User) -> None:
    """Log out: end every session of `user` (the caller commits), then this browser's."""
    accounts.end_sessions(user)
    logout_user()
    flask_session.clear()
    g.pop("csrf_token", None)


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return secret.strip()


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        message,
        {"Authorization": "send 'Authorization: Bearer <token>' or log in"},
        headers={"WWW-Authenticate": 'Bearer realm="trainyard"'},
    )


def authenticate_api_request() -> None:
    """before_request for the API: set g.user, or answer 401 (or 400 for a missing CSRF token)."""
    secret = _bearer_token()
    if secret is not None:
        session = get_session()
        user = accounts.user_for_token(session, secret)
        if user is None:
            raise _unauthorized("invalid or revoked API token")
        g.user = principal(user)
        g.auth_method = "token"
        # user_for_token may have stamped last_used_at; keep that write short and separate.
        session.commit()
        return
    if current_user.is_authenticated:
        g.user = current_user._get_current_object()
        g.auth_method = "session"
        if request.method not in SAFE_METHODS:
            csrf.protect()
        return
    raise _unauthorized("authentication required")


def api_user() -> Principal:
    """The authenticated user of this API request (set by authenticate_api_request)."""
    return g.user


def init_app(app: Flask, settings: Settings) -> None:
    # Made here, not at the first login, so even that login takes the usual time.
    accounts.dummy_password_hash()
    app.config.update(
        SECRET_KEY=settings.resolved_secret_key,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.cookies_secure,
        SESSION_COOKIE_NAME="trainyard_session",
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SECURE=settings.cookies_secure,
        # CSRF is checked where it applies (session-authenticated writes, and every
        # form through Flask-WTF), not on token requests, which carry no ambient credential.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_HEADERS=[CSRF_HEADER, "X-CSRF-Token"],
        # A login's absolute lifetime is checked in the user loader (from the session's
        # login time); this bounds the cookie's own signature and Expires too.
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        WTF_CSRF_TIME_LIMIT=max(1, math.ceil(settings.csrf_hours * 3600)),
        WTF_CSRF_SSL_STRICT=settings.cookies_secure,
    )
    login_manager.login_view = "web.login"
    login_manager.session_protection = "basic"
    login_manager.init_app(app)
    csrf.init_app(app)
    app.extensions["trainyard_submit_limits"] = SubmitLimits(settings)
    login_throttle.init_app(app, settings)

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> ResponseReturnValue:
        message = f"CSRF check failed: {exc.description}"
        if "expired" in exc.description:
            message = (
                "CSRF check failed: the page's security token expired; "
                "reload the page and try again"
            )
        return error_response(
            400,
            "csrf_failed",
            message,
            {CSRF_HEADER: "send the page's CSRF token with every state-changing request"},
        )


class SubmitLimits:
    """Per-user submission limits: a rate (moving window in Redis) and a queued-job cap."""

    def __init__(self, settings: Settings):
        self.max_queued = settings.max_queued_per_user
        self.rate: RateLimitItem = parse(settings.submit_rate_limit)
        # Redis, so the limit holds across every web process; memory only when there is
        # no Redis at all (an app built for a test without a broker). The client comes
        # from shared/broker.py: `limits` alone understands neither kombu's
        # redis+socket:// nor the TLS options of a rediss:// broker URL.
        if settings.redis_url:
            pool = redis_client(settings.redis_url).connection_pool
            storage = storage_from_string("redis://", connection_pool=pool)
        else:
            storage = storage_from_string("memory://")
        self.limiter = MovingWindowRateLimiter(storage)

    def hit(self, item: RateLimitItem, *identifiers: str) -> bool:
        """Count one request; False when over the limit."""
        try:
            return self.limiter.hit(item, *identifiers)
        except Exception:  # noqa: BLE001 - any storage failure
            # Fail open: with Redis down a job is still stored and the reconciler enqueues
            # it later (docs/architecture.md, "Reliability"); refusing it would lose a
            # submission.
            log.warning("rate limit %s not checked: Redis failed", identifiers[0], exc_info=True)
            return True

    def check(self, user: Principal) -> None:
        """Raise 429 with Retry-After when `user` may not submit another job now."""
        if not self.hit(self.rate, "submit", str(user.id)):
            stats = self.limiter.get_window_stats(self.rate, "submit", str(user.id))
            retry_after = max(1, math.ceil(stats.reset_time - time.time()))
            raise ApiError(
                429,
                "rate_limited",
                f"too many submissions: at most {self.rate} per user",
                {},
                headers={"Retry-After": str(retry_after)},
            )
        queued = get_session().scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == user.id, Job.state == "queued")
        )
        if queued is not None and queued >= self.max_queued:
            raise ApiError(
                429,
                "too_many_queued_jobs",
                f"you already have {queued} queued jobs (limit {self.max_queued}); "
                "wait for some to start or cancel some",
                {},
                # Not a precise time: a queued job starts when a worker frees up.
                headers={"Retry-After": "30"},
            )


def submit_limits() -> SubmitLimits:
    return current_app.extensions["trainyard_submit_limits"]
