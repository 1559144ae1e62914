"""`trainyard user` / `trainyard token`, the bootstrap of `trainyard up`, and the CLI's token.

The account commands run in-process (click's CliRunner) against a real database on each
backend; the client side is checked against a stdlib HTTP server that records headers.
Argon2 makes every password hash cost tens of milliseconds, so passwords are set only
where the test is about them.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from rich.console import Console
from sqlalchemy import delete, func, select

from server.cli import account_commands, main
from server.cli.api_client import ApiClient, ApiError
from server.cli.local.admin_bootstrap import bootstrap_local_admin, print_login
from shared import accounts
from shared.db import get_engine, transaction
from shared.migrate import upgrade_database
from shared.orm import ApiToken, User
from shared.settings import Settings
from tests.conftest import DB_PARAMS, PG_ADMIN_URL

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module", params=DB_PARAMS)
def migrated_db(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for the module, built by the migrations as on a fresh
    install (conftest's db_url makes one per test, and PostgreSQL's CREATE DATABASE would
    then be most of this file's run time)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('accounts') / 'trainyard.db'}"
        upgrade_database(url)
        yield url
        get_engine(url).dispose()
        return
    name = f"trainyard_test_{os.urandom(4).hex()}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    upgrade_database(url)
    yield url
    get_engine(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def db(migrated_db: str) -> str:
    """The module's database with no users or tokens."""
    with transaction(migrated_db) as session:
        session.execute(delete(ApiToken))
        session.execute(delete(User))
    return migrated_db


@pytest.fixture
def env(db: str, tmp_path: Path) -> dict[str, str | None]:
    """The commands' environment: this database and home, nothing from the caller's shell."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRAINYARD_")}
    return {
        **clean,
        "TRAINYARD_DATABASE_URL": db,
        "TRAINYARD_HOME": str(tmp_path / "home"),
        "COLUMNS": "200",
    }


def run(env: dict[str, str | None], *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, input=stdin)


def lookup(db: str, secret: str) -> User | None:
    with transaction(db) as session:
        return accounts.user_for_token(session, secret)


def get_user(db: str, username: str) -> User | None:
    with transaction(db) as session:
        return accounts.find_user(session, username)


def count(db: str, model: type) -> int:
    with transaction(db) as session:
        return session.scalar(select(func.count()).select_from(model))


# ==================================================================== token


def test_token_create_prints_the_token_alone_on_the_last_line(
    env: dict[str, str | None], db: str
) -> None:
    result = run(env, "token", "create", "--user", "ci", "--name", "deploy")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    secret = lines[-1]
    assert secret.startswith("ty_") and secret == secret.strip() and " " not in secret
    assert any("Created user 'ci' (member" in line for line in lines[:-1])
    assert result.stderr == ""
    user = lookup(db, secret)
    assert user is not None and user.username == "ci" and user.role == "member"
    assert user.password_hash is None
    with transaction(db) as session:
        [(token, _)] = accounts.list_tokens(session)
        assert token.name == "deploy" and secret not in (token.token_hash, token.prefix)


def test_token_create_admin_creates_an_admin_and_reuses_a_user(
    env: dict[str, str | None], db: str
) -> None:
    first = run(env, "token", "create", "--user", "boss", "--admin")
    assert first.exit_code == 0, first.output
    assert get_user(db, "boss").role == "admin"

    # An existing admin gets another token, with or without --admin, and no new user.
    second = run(env, "token", "create", "--user", "boss")
    assert second.exit_code == 0, second.output
    assert "Created user" not in second.stdout and "(admin)" in second.stdout
    assert lookup(db, second.stdout.splitlines()[-1]).username == "boss"
    assert count(db, User) == 1 and count(db, ApiToken) == 2


def test_token_create_admin_refuses_an_existing_member(env: dict[str, str | None], db: str) -> None:
    assert run(env, "token", "create", "--user", "ci").exit_code == 0

    result = run(env, "token", "create", "--user", "ci", "--admin")

    assert result.exit_code == 1
    assert result.stderr.startswith("error: role: user 'ci' exists as a member")
    assert "trainyard user set-role ci admin" in result.stderr
    assert result.stdout == ""  # no token printed
    assert get_user(db, "ci").role == "member"
    assert count(db, ApiToken) == 1


def test_token_list(env: dict[str, str | None], db: str) -> None:
    assert run(env, "token", "list").stdout.strip() == "No tokens."
    ci = run(env, "token", "create", "--user", "ci", "--name", "deploy").stdout.splitlines()[-1]
    run(env, "token", "create", "--user", "boss", "--admin")

    result = run(env, "token", "list")

    assert result.exit_code == 0, result.output
    header, ci_row = (
        line for line in result.stdout.splitlines() if "┃ id" in line or "│ ci" in line[5:]
    )
    for column in ("id", "user", "name", "prefix", "created (UTC)", "last used", "revoked"):
        assert column in header
    assert "deploy" in ci_row and ci[:10] + "…" in ci_row
    assert ci not in result.stdout  # only the prefix, never the token
    assert "boss" in result.stdout

    only_ci = run(env, "token", "list", "--user", "ci")
    assert "deploy" in only_ci.stdout and "boss" not in only_ci.stdout
    missing = run(env, "token", "list", "--user", "nobody")
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: username: no user 'nobody'")


def test_token_revoke(env: dict[str, str | None], db: str) -> None:
    secret = run(env, "token", "create", "--user", "ci").stdout.splitlines()[-1]
    assert lookup(db, secret) is not None
    with transaction(db) as session:
        token_id = session.scalar(select(ApiToken.id))

    result = run(env, "token", "revoke", str(token_id))

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Revoked token {token_id} (ci, {secret[:10]}…)")
    assert lookup(db, secret) is None
    again = run(env, "token", "revoke", str(token_id))
    assert again.exit_code == 0 and "already revoked" in again.stdout
    row = next(line for line in run(env, "token", "list").stdout.splitlines() if "│ ci" in line)
    revoked_cell = [cell.strip() for cell in row.split("│") if cell.strip()][-1]
    assert revoked_cell.startswith("20")  # a time, where an unrevoked token has "-"

    unknown = run(env, "token", "revoke", str(token_id + 1000))
    assert unknown.exit_code == 1
    assert unknown.stderr.startswith(f"error: id: no token with id {token_id + 1000}")


def test_commands_work_on_a_fresh_install(tmp_path: Path) -> None:
    # No database yet: the command brings the schema up itself (SQLite in TRAINYARD_HOME).
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRAINYARD_")}
    env["TRAINYARD_HOME"] = str(tmp_path / "fresh")
    try:
        result = run(env, "token", "create", "--user", "ci")
        assert result.exit_code == 0, result.output
        url = f"sqlite:///{(tmp_path / 'fresh' / 'trainyard.db').resolve()}"
        assert lookup(url, result.stdout.splitlines()[-1]).username == "ci"
    finally:
        get_engine(f"sqlite:///{(tmp_path / 'fresh' / 'trainyard.db').resolve()}").dispose()


# ==================================================================== user


def test_user_create_with_password_stdin(env: dict[str, str | None], db: str) -> None:
    result = run(env, "user", "create", "alice", "--password-stdin", stdin=PASSWORD + "\n")

    assert result.exit_code == 0, result.output
    assert result.stdout == "Created user 'alice' (member).\n"
    assert PASSWORD not in result.output
    with transaction(db) as session:
        user = accounts.authenticate(session, "alice", PASSWORD)
        assert user is not None and user.role == "member"

    taken = run(env, "user", "create", "alice", "--admin", "--password-stdin", stdin="")
    assert taken.exit_code == 1
    assert taken.stderr == "error: username: user 'alice' already exists\n"


def test_user_create_without_a_tty_or_password_stdin_fails_cleanly(
    env: dict[str, str | None], db: str
) -> None:
    result = run(env, "user", "create", "alice")  # CliRunner's stdin is no terminal

    assert result.exit_code == 1
    assert result.stderr.startswith("error: password: stdin is not a terminal")
    assert "--password-stdin" in result.stderr and "Traceback" not in result.output
    assert get_user(db, "alice") is None


def test_short_password_is_refused_with_the_field_named(
    env: dict[str, str | None], db: str
) -> None:
    result = run(env, "user", "create", "alice", "--password-stdin", stdin="short\n")

    assert result.exit_code == 1
    assert result.stderr == "error: password: must be at least 8 characters\n"
    assert "short" not in result.output
    assert get_user(db, "alice") is None
    bad_name = run(env, "user", "create", "bad name", "--password-stdin", stdin=PASSWORD)
    assert bad_name.exit_code == 1 and bad_name.stderr.startswith("error: username: 1-64")


def test_user_create_prompts_twice_on_a_terminal(
    env: dict[str, str | None], db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(account_commands, "_stdin_is_tty", lambda: True)
    # A too-short first try is refused and asked again, then confirmed.
    typed = f"short\n{PASSWORD}\n{PASSWORD}\n"

    result = run(env, "user", "create", "root", "--admin", stdin=typed)

    assert result.exit_code == 0, result.output
    assert "must be at least 8 characters" in result.stderr
    assert "Repeat for confirmation" in result.stderr
    assert PASSWORD not in result.output  # hidden input is not echoed
    assert result.stdout == "Created user 'root' (admin).\n"
    with transaction(db) as session:
        assert accounts.authenticate(session, "root", PASSWORD).role == "admin"


def test_user_set_password_role_disable_enable_and_list(
    env: dict[str, str | None], db: str
) -> None:
    secret = run(env, "token", "create", "--user", "bob").stdout.splitlines()[-1]
    assert run(env, "token", "create", "--user", "root", "--admin").exit_code == 0

    result = run(env, "user", "set-password", "bob", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    with transaction(db) as session:
        assert accounts.authenticate(session, "bob", PASSWORD) is not None
    missing = run(env, "user", "set-password", "nobody", "--password-stdin", stdin=PASSWORD)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: username: no user")

    assert (
        run(env, "user", "set-role", "bob", "admin").stdout
        == "'bob' is now an admin (was member).\n"
    )
    assert run(env, "user", "set-role", "bob", "admin").stdout == "'bob' is already an admin.\n"
    assert run(env, "user", "set-role", "bob", "owner").exit_code == 2
    assert run(env, "user", "set-role", "bob", "member").exit_code == 0
    assert get_user(db, "bob").role == "member"

    assert run(env, "user", "disable", "bob").stdout == "User 'bob' is now disabled.\n"
    assert lookup(db, secret) is None  # a disabled user's tokens stop working
    assert "disabled" in run(env, "user", "list").stdout
    refused = run(env, "token", "create", "--user", "bob")
    assert refused.exit_code == 1 and "trainyard user enable bob" in refused.stderr
    assert run(env, "user", "enable", "bob").exit_code == 0
    assert lookup(db, secret).username == "bob"

    listed = run(env, "user", "list")
    assert listed.exit_code == 0, listed.output
    bob_row = next(line for line in listed.stdout.splitlines() if "│ bob" in line)
    assert "member" in bob_row and "active" in bob_row and "set" in bob_row
    assert " 1 │" in bob_row  # one live token
    assert PASSWORD not in listed.output


def test_account_changes_end_browser_sessions(
    env: dict[str, str | None], db: str, tmp_path: Path
) -> None:
    # The attack: a session cookie copied before the owner (or an admin) acts on the
    # account. A role change kept old sessions alive, and `enable` revived sessions from
    # before `disable` (the session's stamp was a digest of the password and is_active).
    from server.app import create_app
    from tests.test_security import logged_in, login

    app = create_app(Settings(database_url=db, home=tmp_path / "web-home"), {"TESTING": True})
    run(env, "token", "create", "--user", "root", "--admin")
    run(env, "token", "create", "--user", "bob")
    run(env, "user", "set-password", "bob", "--password-stdin", stdin=PASSWORD + "\n")

    def copied_cookie() -> Any:
        browser = app.test_client()
        assert login(browser, "bob", PASSWORD).status_code == 302
        thief = app.test_client()
        thief.set_cookie("trainyard_session", browser.get_cookie("trainyard_session").value)
        assert logged_in(thief)
        return thief

    steps: list[tuple[str, ...]] = [
        ("set-password", "bob", "--password-stdin"),
        ("set-role", "bob", "admin"),
        ("set-role", "bob", "member"),
        ("disable", "bob"),
    ]
    for step in steps:
        thief = copied_cookie()
        before = get_user(db, "bob").session_version
        stdin = PASSWORD + "\n" if "--password-stdin" in step else None
        assert run(env, "user", *step, stdin=stdin).exit_code == 0, step
        assert not logged_in(thief), step
        assert get_user(db, "bob").session_version > before, step
        if step[0] == "disable":
            assert run(env, "user", "enable", "bob").exit_code == 0
            assert not logged_in(thief), "enable revived a session from before disable"
    # No change, no logout: setting the role bob already has ends nothing.
    thief = copied_cookie()
    assert run(env, "user", "set-role", "bob", "member").exit_code == 0
    assert logged_in(thief)


def test_the_last_active_admin_stays(env: dict[str, str | None], db: str) -> None:
    run(env, "token", "create", "--user", "root", "--admin")

    for args in (("set-role", "root", "member"), ("disable", "root")):
        result = run(env, "user", *args)
        assert result.exit_code == 1, args
        assert "only active admin" in result.stderr
    assert get_user(db, "root").role == "admin" and get_user(db, "root").is_active

    run(env, "token", "create", "--user", "other", "--admin")
    assert run(env, "user", "disable", "root").exit_code == 0


def test_roles_match_shared_accounts() -> None:
    assert account_commands.ROLES == accounts.ROLES


# ==================================================================== trainyard up


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _printed(result: Any, url: str = "http://127.0.0.1:8000") -> str:
    out = io.StringIO()
    print_login(Console(file=out, width=200, highlight=False), result, url)
    return out.getvalue()


def test_bootstrap_local_admin(db: str, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", database_url=db)
    password_path = tmp_path / "home" / "admin-password"
    token_path = tmp_path / "home" / "cli-token"

    first = bootstrap_local_admin(settings)

    assert first.created_password and first.token_written
    assert first.password_path == password_path and first.token_path == token_path
    assert password_path.read_text().strip() == first.created_password
    assert _mode(password_path) == 0o600 and _mode(token_path) == 0o600
    with transaction(db) as session:
        admin = accounts.authenticate(session, "admin", first.created_password)
        assert admin is not None and admin.role == "admin"
    first_token = token_path.read_text().strip()
    assert lookup(db, first_token).username == "admin"
    text = _printed(first)
    assert first.created_password in text and "http://127.0.0.1:8000" in text
    assert f"as admin with the password in {password_path}" in text
    assert str(token_path) in text
    assert first.created_password not in repr(first)

    second = bootstrap_local_admin(settings)

    assert second.created_password is None and not second.token_written
    assert second.password_file_works and second.warnings == []
    assert token_path.read_text().strip() == first_token
    assert count(db, User) == 1 and count(db, ApiToken) == 1
    text = _printed(second)
    assert f"Log in as admin (password in {password_path})" in text
    assert first.created_password not in text

    token_path.unlink()  # a deleted token file heals
    third = bootstrap_local_admin(settings)
    assert third.token_written and _mode(token_path) == 0o600
    assert lookup(db, token_path.read_text().strip()).username == "admin"
    assert "Wrote a new CLI API token" in _printed(third)
    assert count(db, User) == 1 and count(db, ApiToken) == 2

    with transaction(db) as session:  # so does a revoked one
        [(newest, _), _older] = accounts.list_tokens(session)
        accounts.revoke_token(session, newest.id)
    password_path.unlink()
    fourth = bootstrap_local_admin(settings)
    assert fourth.token_written and lookup(db, token_path.read_text().strip()) is not None
    assert not fourth.password_file_works and "Log in" not in _printed(fourth)


def test_bootstrap_leaves_an_install_with_an_admin_alone(
    env: dict[str, str | None], db: str, tmp_path: Path
) -> None:
    run(env, "token", "create", "--user", "root", "--admin")

    result = bootstrap_local_admin(Settings(home=tmp_path / "home", database_url=db))

    assert result.created_password is None and not result.password_path.exists()
    assert get_user(db, "admin") is None
    # The CLI still gets a token, for the admin there is.
    assert result.token_written
    assert lookup(db, result.token_path.read_text().strip()).username == "root"


# ==================================================================== the CLI's token


class Recorder:
    """A tiny HTTP API: records each request's headers, answers with a fixed reply."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.body: Any = {"jobs": [], "next_before": None}


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            rec.headers.append(dict(self.headers))
            data = json.dumps(rec.body).encode()
            self.send_response(rec.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits for one.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield rec, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_client_sends_the_bearer_token(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    ApiClient(url, token="ty_secret").get("/jobs")
    ApiClient(url).get("/jobs")
    assert rec.headers[0]["Authorization"] == "Bearer ty_secret"
    assert "Authorization" not in rec.headers[1]

    rec.status, rec.body = 401, {"error": {"code": "unauthorized", "message": "no", "fields": {}}}
    with pytest.raises(ApiError) as caught:
        ApiClient(url, token="ty_secret").get("/jobs")
    assert caught.value.status == 401 and caught.value.token_sent


def test_job_commands_take_the_token_from_option_env_or_file(
    recorder: tuple[Recorder, str], tmp_path: Path
) -> None:
    rec, url = recorder
    home = tmp_path / "home"
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRAINYARD_")}
    env.update(TRAINYARD_HOME=str(home), TRAINYARD_URL=url)

    assert run(env, "jobs").exit_code == 0
    assert "Authorization" not in rec.headers[-1]
    home.mkdir()
    (home / "cli-token").write_text("ty_from_file\n")  # as `trainyard up` writes it
    assert run(env, "jobs").exit_code == 0
    assert rec.headers[-1]["Authorization"] == "Bearer ty_from_file"
    assert run({**env, "TRAINYARD_TOKEN": "ty_from_env"}, "jobs").exit_code == 0
    assert rec.headers[-1]["Authorization"] == "Bearer ty_from_env"
    assert (
        run({**env, "TRAINYARD_TOKEN": "ty_from_env"}, "jobs", "--token", "ty_opt").exit_code == 0
    )
    assert rec.headers[-1]["Authorization"] == "Bearer ty_opt"
    assert run(env, "jobs", "--token", "ty bad").exit_code == 2


def test_a_401_says_where_a_token_comes_from(
    recorder: tuple[Recorder, str], tmp_path: Path
) -> None:
    rec, url = recorder
    rec.status = 401
    rec.body = {"error": {"code": "unauthorized", "message": "authentication required"}}
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("TRAINYARD_")}
    env.update(TRAINYARD_HOME=str(tmp_path / "home"), TRAINYARD_URL=url)
    token_file = (tmp_path / "home" / "cli-token").resolve()

    missing = run(env, "jobs")
    refused = run(env, "show", "1", "--token", "ty_revoked")

    for result in (missing, refused):
        assert result.exit_code == 1
        lines = result.stderr.splitlines()
        assert lines[0] == "error: authentication required (unauthorized, HTTP 401)"
        assert (
            "set TRAINYARD_TOKEN (create one with `trainyard token create --user NAME`)" in lines[1]
        )
        assert f"or run `trainyard up`, which writes {token_file}" in lines[1]
    assert "no API token was sent" in missing.stderr
    assert "refused the API token" in refused.stderr


def test_the_http_client_imports_no_sqlalchemy() -> None:
    # The client commands run on laptops far from the database.
    code = (
        "import sys, server.cli, server.cli.api_client, server.cli.job_commands; "
        "bad = [m for m in ('sqlalchemy', 'argon2', 'alembic') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_grant_code_and_revoke_code(env: dict[str, str | None], db: str) -> None:
    assert (
        run(env, "user", "create", "carol", "--password-stdin", stdin="longenough1\n").exit_code
        == 0
    )
    result = run(env, "user", "grant-code", "carol")
    assert result.exit_code == 0, result.output
    assert "'carol' may submit script jobs." in result.output
    user = get_user(db, "carol")
    assert user is not None and user.can_run_code
    assert "yes" in run(env, "user", "list").output
    result = run(env, "user", "revoke-code", "carol")
    assert result.exit_code == 0 and "'carol' may not submit script jobs." in result.output
    user = get_user(db, "carol")
    assert user is not None and not user.can_run_code
    assert run(env, "user", "grant-code", "nobody").exit_code != 0
