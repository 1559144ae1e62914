"""Operator commands for accounts: `trainyard user ...` and `trainyard token ...`.

Unlike the job commands these work on the database directly (TRAINYARD_DATABASE_URL,
or the SQLite file in TRAINYARD_HOME), so they run on the server host: they are how the
first admin and the first API token exist before anyone can authenticate to the API.
Each brings the schema up to date first, as `trainyard db upgrade` does, so they work on
a fresh install.

SQLAlchemy and shared.accounts are imported inside the commands: this module is loaded
by every `trainyard` run (the job commands too), and shared.accounts computes an argon2
hash when imported.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.markup import escape
from rich.table import Table

from server.cli.display import make_console
from server.cli.process_commands import upgrade_database
from server.cli.settings import cli_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.orm import ApiToken, User

# shared.accounts.ROLES, spelled out so that defining the commands imports no SQLAlchemy;
# tests/test_accounts_cli.py checks the two agree.
ROLES = ("admin", "member")
EXIT_FAILED = 1

F = TypeVar("F", bound=Callable[..., Any])


class CommandError(Exception):
    """A refusal of this module's own, reported like shared.accounts.AccountError."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def db_error_text(exc: BaseException) -> str:
    """One line for a database error, without the SQL and its parameters.

    SQLAlchemy's message repeats the statement's parameters, which for `users` include a
    password hash; the driver's own message ("UNIQUE constraint failed: ...",
    "connection refused") is what the operator needs.
    """
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def account_command(func: F) -> F:
    """Report AccountError and database errors as one line on stderr and exit 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        from shared.accounts import AccountError

        try:
            return func(*args, **kwargs)
        except (AccountError, CommandError) as exc:
            click.echo(f"error: {exc.field}: {exc.message}", err=True)
        except SQLAlchemyError as exc:
            click.echo(f"error: database: {db_error_text(exc)}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)

    return wrapper  # type: ignore[return-value]


def _database_url() -> str:
    """The settings' database URL, its schema brought up to date."""
    settings = cli_settings()
    try:
        upgrade_database(settings)
    except Exception as exc:  # noqa: BLE001 - Alembic and drivers raise many kinds
        raise CommandError("database", f"upgrade failed: {db_error_text(exc)}") from None
    return settings.resolved_database_url


def _require_user(session: Session, username: str) -> User:
    from shared.accounts import find_user

    user = find_user(session, username)
    if user is None:
        raise CommandError("username", f"no user {username!r} (see `trainyard user list`)")
    return user


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _read_password(password_stdin: bool, command: str) -> str:
    """The new password: the first line of stdin, or typed twice at a hidden prompt."""
    from shared.accounts import AccountError, check_password

    if password_stdin:
        # Only the line break goes: spaces may be part of the password.
        return check_password(sys.stdin.readline().rstrip("\r\n"))
    if not _stdin_is_tty():
        # A prompt would wait forever (CI) or read a half-written pipe.
        raise CommandError(
            "password",
            "stdin is not a terminal, so there is nobody to prompt; pipe the password in "
            f"with --password-stdin, e.g. printf '%s\\n' \"$PASSWORD\" | trainyard {command} "
            "--password-stdin",
        )

    def check(value: str) -> str:
        try:
            return check_password(value)
        except AccountError as exc:
            raise click.UsageError(f"password {exc.message}") from None  # click asks again

    # err=True: the prompts stay off stdout, which scripts may read.
    return click.prompt(
        "Password", hide_input=True, confirmation_prompt=True, value_proc=check, err=True
    )


def _other_active_admins(session: Session, user: User) -> int:
    from sqlalchemy import func, select

    from shared.orm import User

    return session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == "admin", User.is_active.is_(True), User.id != user.id)
    )


def _refuse_removing_last_admin(session: Session, user: User, action: str) -> None:
    # Without an active admin nobody can see every job or manage accounts from the web.
    if user.role == "admin" and user.is_active and _other_active_admins(session, user) == 0:
        raise CommandError(
            "username",
            f"{user.username!r} is the only active admin, so it cannot be {action}; make "
            "another admin first (`trainyard user create NAME --admin` or "
            "`trainyard user set-role NAME admin`)",
        )


def _fmt_time(value: datetime | None) -> str:
    # Stored as naive UTC (shared.db.utcnow).
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


# ==================================================================== token


@click.group("token")
def token_group() -> None:
    """API tokens (database access needed: run on the server host).

    A token is shown once, when created; only its SHA-256 is stored.
    """


@token_group.command("create")
@click.option("--user", "username", required=True, metavar="NAME", help="Whose token it is.")
@click.option(
    "--admin",
    is_flag=True,
    help="Create the user as an admin if it does not exist (an existing member is refused).",
)
@click.option(
    "--name", "label", default="", metavar="LABEL", help="What the token is for (e.g. ci)."
)
@account_command
def token_create(username: str, admin: bool, label: str) -> None:
    """Create an API token for NAME, creating the user (without a password) if needed.

    The token is printed alone on the last line, so a script can take it with
    `TOKEN=$(trainyard token create --user ci | tail -n1)`.
    """
    from shared.accounts import create_token, create_user, find_user
    from shared.db import transaction

    if len(label) > 100:
        raise CommandError("name", "at most 100 characters")
    url = _database_url()
    created_user = False
    with transaction(url) as session:
        user = find_user(session, username)
        if user is None:
            user = create_user(session, username, role="admin" if admin else "member")
            created_user = True
        elif admin and user.role != "admin":
            # Promotion is a decision of its own, not a side effect of making a token.
            raise CommandError(
                "role",
                f"user {username!r} exists as a {user.role}; --admin does not change an "
                f"existing user's role. Run `trainyard user set-role {username} admin` first, "
                "or create a separate admin with `trainyard user create NAME --admin`",
            )
        elif not user.is_active:
            raise CommandError(
                "username",
                f"user {username!r} is disabled, so its tokens do not work; "
                f"`trainyard user enable {username}` first",
            )
        new = create_token(session, user, label)
        role, token_id = user.role, new.token.id
    # Printed only after the commit: a token shown is a token that exists.
    if created_user:
        click.echo(f"Created user {username!r} ({role}, no password: it uses API tokens).")
    named = f" {label!r}" if label else ""
    click.echo(
        f"Token {token_id}{named} for {username!r} ({role}); shown only now, "
        "only its hash is stored:"
    )
    click.echo(new.secret)


@token_group.command("list")
@click.option("--user", "username", metavar="NAME", help="Only this user's tokens.")
@account_command
def token_list(username: str | None) -> None:
    """List tokens, newest first (never the tokens themselves, only their first characters)."""
    from shared.accounts import list_tokens
    from shared.db import transaction

    url = _database_url()
    with transaction(url) as session:
        owner = _require_user(session, username) if username else None
        rows = list_tokens(session, owner)
    console = make_console()
    if not rows:
        console.print("No tokens.")
        return
    console.print(_tokens_table(rows))


def _tokens_table(rows: list[tuple[ApiToken, User]]) -> Table:
    table = Table(header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("name")
    table.add_column("prefix", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("last used", no_wrap=True)
    table.add_column("revoked", no_wrap=True)
    for token, user in rows:
        who = escape(user.username) + ("" if user.is_active else " [red](disabled)[/]")
        table.add_row(
            str(token.id),
            who,
            escape(token.name or "-"),
            escape(token.prefix) + "…",
            _fmt_time(token.created_at),
            _fmt_time(token.last_used_at),
            f"[red]{_fmt_time(token.revoked_at)}[/]" if token.revoked_at else "-",
        )
    return table


@token_group.command("revoke")
@click.argument("token_id", type=int, metavar="ID")
@account_command
def token_revoke(token_id: int) -> None:
    """Revoke token ID (see `trainyard token list`); requests with it get 401 from now on."""
    from shared.accounts import revoke_token
    from shared.db import transaction
    from shared.orm import ApiToken, User

    url = _database_url()
    with transaction(url) as session:
        token = session.get(ApiToken, token_id)
        if token is None:
            raise CommandError("id", f"no token with id {token_id} (see `trainyard token list`)")
        revoked_before = token.revoked_at
        revoke_token(session, token_id)
        owner = session.get(User, token.user_id)
        what = f"{token_id} ({owner.username if owner else '?'}, {token.prefix}…)"
    if revoked_before is not None:
        click.echo(f"Token {what} was already revoked at {_fmt_time(revoked_before)} UTC.")
    else:
        click.echo(f"Revoked token {what}.")


# ==================================================================== user


@click.group("user")
def user_group() -> None:
    """Users and their roles (database access needed: run on the server host).

    An admin sees and acts on every job; a member only on their own.
    """


_password_stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of stdin instead of prompting.",
)


@user_group.command("create")
@click.argument("username", metavar="NAME")
@click.option("--admin", is_flag=True, help="Role admin (default: member).")
@_password_stdin_option
@account_command
def user_create(username: str, admin: bool, password_stdin: bool) -> None:
    """Create user NAME with a password for the web UI.

    Prompts for the password twice, or reads it from stdin with --password-stdin.
    For a user that only uses API tokens, `trainyard token create --user NAME` is enough.
    """
    from shared.accounts import check_username, create_user, find_user
    from shared.db import transaction

    check_username(username)
    url = _database_url()
    with transaction(url) as session:
        # Before the prompt: typing a password twice to then learn the name is taken is no fun.
        if find_user(session, username) is not None:
            raise CommandError("username", f"user {username!r} already exists")
    password = _read_password(password_stdin, f"user create {username}")
    role = "admin" if admin else "member"
    with transaction(url) as session:
        create_user(session, username, role=role, password=password)
    click.echo(f"Created user {username!r} ({role}).")


@user_group.command("set-password")
@click.argument("username", metavar="NAME")
@_password_stdin_option
@account_command
def user_set_password(username: str, password_stdin: bool) -> None:
    """Set NAME's password (prompted twice, or the first line of stdin); logs NAME out of
    every browser."""
    from shared.accounts import set_password
    from shared.db import transaction

    url = _database_url()
    with transaction(url) as session:
        _require_user(session, username)
    password = _read_password(password_stdin, f"user set-password {username}")
    with transaction(url) as session:
        set_password(_require_user(session, username), password)
    click.echo(f"Password set for {username!r}.")


@user_group.command("set-role")
@click.argument("username", metavar="NAME")
@click.argument("role", type=click.Choice(ROLES))
@account_command
def user_set_role(username: str, role: str) -> None:
    """Make NAME an admin or a member (logs NAME out of every browser)."""
    from shared.accounts import set_role
    from shared.db import transaction

    url = _database_url()
    with transaction(url) as session:
        user = _require_user(session, username)
        before = user.role
        if before != role:
            if role != "admin":
                _refuse_removing_last_admin(session, user, f"made a {role}")
            set_role(user, role)
    if before == role:
        click.echo(f"{username!r} is already {'an' if role == 'admin' else 'a'} {role}.")
    else:
        click.echo(f"{username!r} is now {'an' if role == 'admin' else 'a'} {role} (was {before}).")


def _set_code_permission(username: str, allowed: bool) -> None:
    from shared.accounts import set_can_run_code
    from shared.db import transaction

    with transaction(_database_url()) as session:
        user = _require_user(session, username)
        before, role = bool(user.can_run_code), user.role
        set_can_run_code(user, allowed)
    state = "may" if allowed else "may not"
    unchanged = " (unchanged)" if before == allowed else ""
    note = " (an admin, who may anyway)" if role == "admin" and not allowed else ""
    click.echo(f"{username!r} {state} submit script jobs{unchanged}{note}.")


@user_group.command("grant-code")
@click.argument("username", metavar="NAME")
@account_command
def user_grant_code(username: str) -> None:
    """Let NAME submit script jobs: their own code, run by the workers with the
    workers' OS user and network (README, "Script jobs: trust model")."""
    _set_code_permission(username, True)


@user_group.command("revoke-code")
@click.argument("username", metavar="NAME")
@account_command
def user_revoke_code(username: str) -> None:
    """Take back NAME's permission to submit script jobs (running ones go on)."""
    _set_code_permission(username, False)


@user_group.command("disable")
@click.argument("username", metavar="NAME")
@account_command
def user_disable(username: str) -> None:
    """Stop NAME from logging in and using any of their tokens; their jobs are kept."""
    _set_active(username, False)


@user_group.command("enable")
@click.argument("username", metavar="NAME")
@account_command
def user_enable(username: str) -> None:
    """Let a disabled user log in again; their unrevoked tokens work again too."""
    _set_active(username, True)


def _set_active(username: str, active: bool) -> None:
    from shared.accounts import set_active
    from shared.db import transaction

    url = _database_url()
    with transaction(url) as session:
        user = _require_user(session, username)
        changed = user.is_active != active
        if changed:
            if not active:
                _refuse_removing_last_admin(session, user, "disabled")
            set_active(user, active)
    state = "enabled" if active else "disabled"
    click.echo(f"User {username!r} {'is now' if changed else 'was already'} {state}.")


@user_group.command("list")
@account_command
def user_list() -> None:
    """List users: role, whether active, whether they have a password, live tokens."""
    from sqlalchemy import func, select

    from shared.db import transaction
    from shared.orm import ApiToken, User

    url = _database_url()
    with transaction(url) as session:
        users = list(session.scalars(select(User).order_by(User.id)))
        live = dict(
            session.execute(
                select(ApiToken.user_id, func.count())
                .where(ApiToken.revoked_at.is_(None))
                .group_by(ApiToken.user_id)
            ).all()
        )
    console = make_console()
    if not users:
        console.print("No users.")
        return
    table = Table(header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("user", no_wrap=True)
    table.add_column("role", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("password", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("code", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    for user in users:
        table.add_row(
            str(user.id),
            escape(user.username),
            "[bold]admin[/]" if user.role == "admin" else escape(user.role),
            "active" if user.is_active else "[red]disabled[/]",
            "set" if user.password_hash else "-",
            str(live.get(user.id, 0)),
            "yes" if user.role == "admin" or user.can_run_code else "-",
            _fmt_time(user.created_at),
        )
    console.print(table)


def _limit_options(func: F) -> F:
    from shared.limits import LIMITS

    for limit in reversed(LIMITS.values()):
        func = click.option(
            f"--{limit.name.replace('_', '-')}",
            limit.name,
            metavar="N|default",
            help=f"{limit.description} ('default': the role's)",
        )(func)
    return func


def _fmt_limit(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


@user_group.command("limits")
@click.argument("username", metavar="NAME")
@_limit_options
@click.option("--reset", is_flag=True, help="Drop every override: the role's limits apply.")
@account_command
def user_limits(username: str, reset: bool, **changes: str | None) -> None:
    """Show NAME's limits, or raise/lower them: `trainyard user limits alice --max-params 5e9`.

    Limits not named keep their value; `default` puts one back to the role's setting
    (TRAINYARD_<LIMIT>_PER_USER for members, ..._PER_ADMIN for admins).
    """
    from shared.db import transaction
    from shared.limits import (
        LimitsError,
        apply_changes,
        effective_limits,
        overrides_by_name,
        role_limits,
    )

    wanted = {
        name: None if value.strip().lower() == "default" else value
        for name, value in changes.items()
        if value is not None
    }
    settings = cli_settings()
    url = _database_url()
    with transaction(url) as session:
        user = _require_user(session, username)
        limits = None if reset else user.limits
        try:
            limits = apply_changes(limits, wanted)
        except LimitsError as exc:
            raise CommandError(exc.field, exc.message) from None
        if reset or wanted:
            user.limits = limits
        role = user.role
    in_force = effective_limits(settings, role, limits)
    defaults = role_limits(settings, role)
    overrides = overrides_by_name(limits)
    table = Table(header_style="bold", title=f"{username} ({role})")
    table.add_column("limit", no_wrap=True)
    table.add_column("in force", justify="right", no_wrap=True)
    table.add_column(f"{role} default", justify="right", no_wrap=True)
    table.add_column("override", justify="right", no_wrap=True)
    for name, value in in_force.items():
        table.add_row(
            name, _fmt_limit(value), _fmt_limit(defaults[name]), _fmt_limit(overrides.get(name))
        )
    make_console().print(table)
