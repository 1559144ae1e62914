"""Users, passwords and API tokens: the one place that creates, checks and revokes them.

Passwords are hashed with argon2id (argon2-cffi's defaults follow RFC 9106). API tokens
are 256 random bits, so a fast SHA-256 of the token is enough to store (nobody can
brute-force that space) and lets a request find its token with one indexed lookup.
Functions take the caller's session and never commit: the caller owns the transaction.
Password, role and active changes go through set_password/set_role/set_active, which
also end the user's browser sessions.
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import utcnow
from shared.orm import ApiToken, User

ROLES = ("admin", "member")
TOKEN_PREFIX = "ty_"
USERNAME_PATTERN = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}")
MIN_PASSWORD_LENGTH = 8
# Writing last_used_at on every request would turn each API read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_hasher = PasswordHasher()


@functools.cache
def dummy_password_hash() -> str:
    """Verified against when the user does not exist, so a login takes as long either way
    and its timing does not tell which usernames exist. Made on first use: an argon2 hash
    costs ~170 ms and 64 MB, which every process importing this module (CLI commands,
    workers) would otherwise pay at start-up."""
    return _hasher.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A bad username, role or password; `field` names what to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class NewToken:
    """A token as created: `secret` is shown once and never stored."""

    token: ApiToken
    secret: str


def check_username(username: str) -> str:
    if not USERNAME_PATTERN.fullmatch(username):
        raise AccountError(
            "username",
            "1-64 characters: letters, digits, '_', '.', '-', starting with a letter or digit",
        )
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > 1024:
        raise AccountError("password", "must be at most 1024 characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def find_user(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.username == username)).one_or_none()


def create_user(
    session: Session, username: str, role: str = "member", password: str | None = None
) -> User:
    check_username(username)
    if role not in ROLES:
        raise AccountError("role", f"one of: {', '.join(ROLES)}")
    if find_user(session, username) is not None:
        raise AccountError("username", f"user {username!r} already exists")
    user = User(
        username=username,
        role=role,
        password_hash=hash_password(password) if password is not None else None,
        is_active=True,
    )
    session.add(user)
    session.flush()
    return user


def end_sessions(user: User) -> None:
    """Log the user out everywhere: every browser session issued before now stops working.

    Sessions carry the users.session_version they were issued under (server/auth.py);
    each change here leaves no way back to an old version, so no later change (enabling
    the account again) revives a session. API tokens are not sessions and are untouched.
    """
    user.session_version = (user.session_version or 0) + 1


def set_password(user: User, password: str) -> None:
    user.password_hash = hash_password(password)
    end_sessions(user)


def set_role(user: User, role: str) -> None:
    """Make the user `role`; a change ends their sessions (they carry the old rights)."""
    if role not in ROLES:
        raise AccountError("role", f"one of: {', '.join(ROLES)}")
    if user.role != role:
        user.role = role
        end_sessions(user)


def set_can_run_code(user: User, allowed: bool) -> None:
    """Whether the user may submit script jobs. Not a session change: the permission is
    read from the row on every request, so it takes effect on the next one."""
    user.can_run_code = allowed


def set_active(user: User, active: bool) -> None:
    """Enable or disable the account; any change ends its sessions, so a session from
    before `disable` stays dead after `enable`."""
    if user.is_active != active:
        user.is_active = active
        end_sessions(user)


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this username and password, or None."""
    user = find_user(session, username)
    stored = user.password_hash if user is not None else None
    try:
        _hasher.verify(stored or dummy_password_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or stored is None or not user.is_active:
        return None
    if _hasher.check_needs_rehash(stored):
        user.password_hash = _hasher.hash(password)
    return user


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, user: User, name: str = "") -> NewToken:
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        user_id=user.id,
        name=name[:100],
        token_hash=_digest(secret),
        prefix=secret[:10],
        created_at=utcnow(),
    )
    session.add(token)
    session.flush()
    return NewToken(token=token, secret=secret)


def user_for_token(session: Session, secret: str) -> User | None:
    """The active user a valid, unrevoked token belongs to, or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    row = session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.token_hash == _digest(secret))
    ).one_or_none()
    if row is None:
        return None
    token, user = row
    if token.revoked_at is not None or not user.is_active:
        return None
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        token.last_used_at = now
    return user


def list_tokens(session: Session, user: User | None = None) -> list[tuple[ApiToken, User]]:
    """Tokens (newest first) with their users; every user's when `user` is None."""
    stmt = select(ApiToken, User).join(User, User.id == ApiToken.user_id)
    if user is not None:
        stmt = stmt.where(ApiToken.user_id == user.id)
    return [(t, u) for t, u in session.execute(stmt.order_by(ApiToken.id.desc()))]


def revoke_token(session: Session, token_id: int, owner: User | None = None) -> ApiToken | None:
    """Revoke a token (idempotent). With `owner`, only that user's token is found."""
    token = session.get(ApiToken, token_id)
    if token is None or (owner is not None and token.user_id != owner.id):
        return None
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token
