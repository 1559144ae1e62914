"""Who is asking: API tokens, browser sessions, CSRF, and the per-user submission limits.

Every API request is authenticated in `authenticate_api_request` (a before_request hook
on the API blueprints): an `Authorization: Bearer` token, or else the browser's login
session. A session is ambient (the browser sends it to any site's form), so a
state-changing request that rides on a session must carry the CSRF token; a bearer
token is not ambient, so token requests need none. The user is `g.user` (a `Principal`
detached from the database session) for the rest of the request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass

from flask import Flask, current_app, g, request
from flask.typing import ResponseReturnValue
from flask_login import LoginManager, UserMixin, current_user
from flask_wtf.csrf import CSRFError, CSRFProtect
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy import func, select

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


@dataclass(frozen=True)
class Principal(UserMixin):
    """The authenticated user of a request, safe to use after the DB session closes."""

    id: int
    username: str
    role: str
    # Part of the session cookie's user id: changing the password or disabling the
    # account changes it, which logs out every existing browser session.
    session_stamp: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def get_id(self) -> str:
        return f"{self.id}.{self.session_stamp}"


def principal(user: User) -> Principal:
    stamp = hashlib.sha256(f"{user.password_hash}:{user.is_active}".encode()).hexdigest()[:16]
    return Principal(id=user.id, username=user.username, role=user.role, session_stamp=stamp)


@login_manager.user_loader
def _load_session_user(session_id: str) -> Principal | None:
    user_id, _, stamp = session_id.partition(".")
    if not user_id.isdigit():
        return None
    user = get_session().get(User, int(user_id))
    if user is None or not user.is_active:
        return None
    found = principal(user)
    return found if found.session_stamp == stamp else None


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
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=settings.cookies_secure,
    )
    login_manager.login_view = "web.login"
    login_manager.session_protection = "basic"
    login_manager.init_app(app)
    csrf.init_app(app)
    app.extensions["trainyard_submit_limits"] = SubmitLimits(settings)

    @app.errorhandler(CSRFError)
    def _csrf_error(exc: CSRFError) -> ResponseReturnValue:
        return error_response(
            400,
            "csrf_failed",
            f"CSRF check failed: {exc.description}",
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
