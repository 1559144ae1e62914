"""Per-user quotas on stored things (upload bytes, uploads, code bundles, API tokens) and
the rates of uploads (CSVs and bundles) and token creation.

Quotas count what a user keeps: deleting an upload or revoking a token gives its share
back. Rates are moving windows in Redis through the submission limiter's storage
(server/auth.py SubmitLimits), so they hold across every web process. Each limit is a
setting (shared/settings.py); an admin may override one for a single user by putting
the setting's name in users.limits (e.g. {"max_uploads_per_user": 1000}), which
shared/limits.py writes for `PATCH /api/v1/users/{name}/limits` (`max_uploads`).
"""

from __future__ import annotations

import math
import time

from flask import current_app
from limits import RateLimitItem, parse
from sqlalchemy import func, select

from server.auth import Principal, submit_limits
from server.database import get_session
from server.errors import ApiError
from shared.orm import ApiToken, CodeBundle, Upload, User
from shared.settings import Settings

QUOTA_SETTINGS = (
    "max_upload_bytes_per_user",
    "max_uploads_per_user",
    "max_tokens_per_user",
    "max_bundles_per_user",
)


def check_rate_settings(settings: Settings) -> None:
    """Fail at start-up, naming the variable, on a rate `limits` cannot parse."""
    for name in ("upload_rate_limit", "token_rate_limit"):
        try:
            parse(getattr(settings, name))
        except ValueError:
            raise ValueError(
                f"TRAINYARD_{name.upper()}={getattr(settings, name)!r} is not a rate like '30/hour'"
            ) from None


def _settings() -> Settings:
    return current_app.config["TRAINYARD_SETTINGS"]


def user_limit(user: Principal, name: str) -> int:
    """The setting `name` for this user: an admin's override in users.limits, else the default."""
    row = get_session().get(User, user.id)
    override = (row.limits or {}).get(name) if row is not None else None
    if isinstance(override, int) and not isinstance(override, bool) and override > 0:
        return override
    return int(getattr(_settings(), name))


def _rate(user: Principal, action: str, setting: str, what: str) -> None:
    limits = submit_limits()
    item: RateLimitItem = parse(getattr(_settings(), setting))
    if limits.hit(item, action, str(user.id)):
        return
    stats = limits.limiter.get_window_stats(item, action, str(user.id))
    retry_after = max(1, math.ceil(stats.reset_time - time.time()))
    raise ApiError(
        429,
        "rate_limited",
        f"too many {what}: at most {item} per user",
        {setting: f"at most {item}; retry in {retry_after} s"},
        headers={"Retry-After": str(retry_after)},
    )


def upload_usage(user_id: int) -> tuple[int, int]:
    """(uploads kept, their bytes) for a user."""
    count, total = (
        get_session()
        .execute(
            select(func.count(), func.coalesce(func.sum(Upload.size_bytes), 0)).where(
                Upload.owner_id == user_id
            )
        )
        .one()
    )
    return int(count), int(total)


def check_upload_allowed(user: Principal, incoming_bytes: int | None) -> None:
    """Before reading an upload's body: the rate, the count, and the bytes if announced."""
    count, used = upload_usage(user.id)
    max_count = user_limit(user, "max_uploads_per_user")
    if count >= max_count:
        raise ApiError(
            409,
            "quota_exceeded",
            f"you keep {count} uploads, the limit is {max_count}; delete some first",
            {"max_uploads_per_user": f"at most {max_count} uploads per user"},
        )
    if incoming_bytes is not None:
        check_upload_bytes(user, incoming_bytes, used)
    _rate(user, "upload", "upload_rate_limit", "uploads")


def check_upload_bytes(user: Principal, incoming_bytes: int, used: int | None = None) -> None:
    """413 when keeping `incoming_bytes` more would pass the user's byte quota."""
    if used is None:
        used = upload_usage(user.id)[1]
    quota = user_limit(user, "max_upload_bytes_per_user")
    if used + incoming_bytes > quota:
        raise ApiError(
            413,
            "quota_exceeded",
            f"this upload ({incoming_bytes:,} bytes) would take your uploads to "
            f"{used + incoming_bytes:,} bytes; the quota is {quota:,}. Delete some uploads first",
            {"max_upload_bytes_per_user": f"at most {quota:,} bytes of uploads per user"},
        )


def check_bundle_rate(user: Principal) -> None:
    """Before reading a bundle's body: TRAINYARD_UPLOAD_RATE_LIMIT, counted apart from
    CSV uploads (a bundle, like a CSV, is a file a person sends now and then)."""
    _rate(user, "bundle", "upload_rate_limit", "bundle uploads")


def check_bundle_count(user: Principal) -> None:
    """Before keeping a new bundle (a repeated one is not new, so it is checked once the
    content is known): the count of the user's bundles."""
    count = get_session().scalar(
        select(func.count()).select_from(CodeBundle).where(CodeBundle.owner_id == user.id)
    )
    max_count = user_limit(user, "max_bundles_per_user")
    if count is not None and count >= max_count:
        raise ApiError(
            409,
            "quota_exceeded",
            f"you keep {count} code bundles, the limit is {max_count}; delete some first",
            {"max_bundles_per_user": f"at most {max_count} bundles per user"},
        )


def check_token_allowed(user: Principal) -> None:
    """Before creating an API token: the count of unrevoked tokens, then the rate."""
    active = get_session().scalar(
        select(func.count())
        .select_from(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
    )
    max_tokens = user_limit(user, "max_tokens_per_user")
    if active is not None and active >= max_tokens:
        raise ApiError(
            409,
            "quota_exceeded",
            f"you have {active} active API tokens, the limit is {max_tokens}; revoke some first",
            {"max_tokens_per_user": f"at most {max_tokens} active tokens per user"},
        )
    _rate(user, "token", "token_rate_limit", "token creations")
