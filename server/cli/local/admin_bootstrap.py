"""The first admin of local mode, so `trainyard up` is usable with no setup.

On first start `up` creates the user `admin` with a random password, keeps the password
in TRAINYARD_HOME/admin-password and an API token for the CLI in TRAINYARD_HOME/cli-token
(both readable by the owner only), so `trainyard submit` works at once. Later starts
create no user; they heal a CLI token file that is missing or no longer valid.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from shared.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.orm import User

ADMIN_USERNAME = "admin"
ADMIN_PASSWORD_FILE = "admin-password"
CLI_TOKEN_NAME = "cli"


@dataclass(frozen=True)
class BootstrapResult:
    """What bootstrap_local_admin did, for `up` to tell the user."""

    password_path: Path
    token_path: Path
    # Set on first start only: the admin account was created with this password.
    created_password: str | None = field(default=None, repr=False)
    # The password file exists and still logs admin in.
    password_file_works: bool = False
    # A new CLI token was created and written to token_path (first start, or healed).
    token_written: bool = False
    warnings: list[str] = field(default_factory=list)


def bootstrap_local_admin(settings: Settings) -> BootstrapResult:
    """Make local mode usable without setup; call after the schema is up to date.

    First start (no user with role admin): create `admin` with a random password, write
    the password to <home>/admin-password and a new API token to the CLI's token file
    (both 0600), so `trainyard submit` works at once. Later starts create no user; they
    only write a fresh CLI token when the file is missing or its token no longer works.
    """
    from sqlalchemy import select

    from shared.accounts import create_token, create_user, find_user
    from shared.db import transaction
    from shared.orm import User
    from shared.settings import write_private_file

    url = settings.resolved_database_url
    password_path = settings.home.resolve() / ADMIN_PASSWORD_FILE
    token_path = settings.cli_token_path.resolve()
    warnings: list[str] = []

    with transaction(url) as session:
        has_admin = session.scalar(select(User.id).where(User.role == "admin").limit(1))
        if has_admin is None:
            if find_user(session, ADMIN_USERNAME) is not None:
                warnings.append(
                    f"there is no admin, and the name {ADMIN_USERNAME!r} is taken by a "
                    f"member; make one with `trainyard user set-role NAME admin`"
                )
            else:
                password = secrets.token_urlsafe(12)
                admin = create_user(session, ADMIN_USERNAME, role="admin", password=password)
                new = create_token(session, admin, CLI_TOKEN_NAME)
                # Files before the commit: if the commit fails, the next start begins
                # again and overwrites them; the other order could commit an admin whose
                # password nobody ever sees.
                write_private_file(password_path, password)
                write_private_file(token_path, new.secret)
                return BootstrapResult(
                    password_path,
                    token_path,
                    created_password=password,
                    password_file_works=True,
                    token_written=True,
                )

    password_file_works = _password_file_works(url, password_path)
    if not password_file_works and password_path.exists():
        warnings.append(
            f"{password_path} no longer holds {ADMIN_USERNAME}'s password (changed with "
            f"`trainyard user set-password {ADMIN_USERNAME}`?); delete the file"
        )
    token_written = False
    if not _token_file_works(url, token_path):
        with transaction(url) as session:
            admin = _an_active_admin(session)
            if admin is None:
                warnings.append(
                    f"no active admin to create a CLI token for, so {token_path} was not "
                    "written; `trainyard user enable NAME` or `trainyard user create NAME --admin`"
                )
            else:
                new = create_token(session, admin, CLI_TOKEN_NAME)
                write_private_file(token_path, new.secret)
                token_written = True
    return BootstrapResult(
        password_path,
        token_path,
        password_file_works=password_file_works,
        token_written=token_written,
        warnings=warnings,
    )


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _password_file_works(url: str, path: Path) -> bool:
    """Whether the file still holds admin's password (it may have been changed since)."""
    from shared.accounts import authenticate
    from shared.db import session_factory

    password = _read_secret(path)
    if password is None:
        return False
    # Never committed: authenticate may rehash, and a check at start-up changes nothing.
    with session_factory(url)() as session:
        return authenticate(session, ADMIN_USERNAME, password) is not None


def _token_file_works(url: str, path: Path) -> bool:
    from shared.accounts import user_for_token
    from shared.db import session_factory

    secret = _read_secret(path)
    if secret is None:
        return False
    # Never committed: `up` looking at the token must not show as its "last used".
    with session_factory(url)() as session:
        return user_for_token(session, secret) is not None


def _an_active_admin(session: Session) -> User | None:
    """The CLI token's owner: `admin` if it is an active admin, else the oldest one."""
    from sqlalchemy import case, select

    from shared.orm import User

    return session.scalars(
        select(User)
        .where(User.role == "admin", User.is_active.is_(True))
        .order_by(case((User.username == ADMIN_USERNAME, 0), else_=1), User.id)
        .limit(1)
    ).first()


def print_login(console: Console, result: BootstrapResult, url: str) -> None:
    """How to log in and where the CLI token is, as `up` prints it once it is running."""
    password_path = escape(str(result.password_path))
    token_path = escape(str(result.token_path))
    if result.created_password is not None:
        console.print(
            f"Created the admin account. Log in at {escape(url)} as [bold]{ADMIN_USERNAME}[/] "
            f"with the password in {password_path}:\n"
            f"    [bold]{escape(result.created_password)}[/]  (printed only now; the file keeps it)\n"
            f"The CLI's API token is in {token_path}; `trainyard submit` uses it."
        )
    else:
        if result.password_file_works:
            console.print(f"Log in as {ADMIN_USERNAME} (password in {password_path}).")
        if result.token_written:
            console.print(
                f"Wrote a new CLI API token to {token_path} (the old one was missing or "
                "no longer valid)."
            )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
