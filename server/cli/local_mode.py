"""`trainyard up`: web server, a worker, the reconciler and (if needed) Redis, kept running.

State (SQLite database, Redis AOF, artifacts, the run directory) lives in TRAINYARD_HOME,
and so do the first admin's password and the CLI's API token, written on first start.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import requests
from rich.console import Console
from rich.markup import escape

from server.cli.account_commands import db_error_text
from server.cli.display import make_console
from server.cli.process_commands import gpu_visible, safe_url, upgrade_database
from server.cli.settings import cli_settings
from shared.settings import Settings
from shared.supervisor import Backoff, ChildSpec, Supervisor

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from shared.orm import User

log = logging.getLogger(__name__)

RUN_DIR = "run"
STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
# Substrings of a child's command line; a leftover pid is only killed if it matches one.
_CHILD_MARKERS = ("gunicorn", "celery", "server.cli", "trainyard")
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


def local_children(*, host: str, port: int, env: dict[str, str], gpu: bool) -> list[ChildSpec]:
    """The processes `trainyard up` runs and keeps running."""
    python = sys.executable
    # `python -m server.cli ...` (server/cli/__main__.py) rather than gunicorn/celery
    # directly: each restart goes through the same code path as the production commands
    # and gets a fresh node name.
    children = [
        ChildSpec(
            "web",
            [python, "-m", "server.cli", "web", "--host", host, "--port", str(port),
             "--workers", "2", "--timeout", "60"],
            env,
        ),
        ChildSpec(
            "worker",
            [python, "-m", "server.cli", "worker", "--queues", "gpu,cpu" if gpu else "cpu",
             "--concurrency", "1"],
            env,
        ),
        # Requeues jobs of a worker that died and re-publishes messages Redis lost
        # (design.md 4.1, 4.4); without it such jobs would wait forever.
        ChildSpec("reconciler", [python, "-m", "server.cli", "reconcile"], env),
    ]  # fmt: skip
    return children


class _StopSignals:
    """Turn SIGINT/SIGTERM/SIGHUP into a flag the supervision loop checks."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.received is None:
            self.received = signum


@contextlib.contextmanager
def _exclusive_home(run_dir: Path) -> Iterator[None]:
    """One `up` per state directory; the lock dies with its process, so no stale lock."""
    import fcntl  # POSIX only, like the process groups `up` relies on

    with open(run_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = _read_state(run_dir).get("pid", "?")
            raise click.ClickException(
                f"another `trainyard up` (pid {other}) is already running with "
                f"TRAINYARD_HOME={run_dir.parent}; stop it first or use another TRAINYARD_HOME"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / STATE_FILE)


def _stop_leftovers(run_dir: Path) -> None:
    """Stop children an earlier `up` left behind when it was killed without cleaning up.

    Only called while holding the home lock, so that `up` is certainly gone.
    """
    from shared.local_redis import process_cmdline, wait_gone

    for name, pid in (_read_state(run_dir).get("children") or {}).items():
        cmdline = process_cmdline(int(pid))
        if not cmdline or not any(m in cmdline for m in _CHILD_MARKERS) or not _leads_group(pid):
            continue  # gone, or the pid now belongs to something else
        log.warning("stopping %s (pid %s) left running by an earlier `trainyard up`", name, pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(pid), signal.SIGTERM)
        if not wait_gone(int(pid), 10.0):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
            wait_gone(int(pid), 5.0)
    (run_dir / STATE_FILE).unlink(missing_ok=True)


def _leads_group(pid: int) -> bool:
    """Our children lead their own process group; a stranger reusing the pid rarely does."""
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False


def _check_port_free(host: str, port: int) -> None:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn does, so a socket in TIME_WAIT from the last run is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(
                    f"port {port} on {host} is already in use (another Trainyard or another "
                    "server?); stop it or choose another with --port"
                ) from None
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _check_redis(url: str) -> None:
    import redis

    from shared import broker

    try:
        broker.ping(url)
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"TRAINYARD_REDIS_URL={url} does not answer: {exc}") from None


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s [up] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Alembic's env.py usually runs logging.config.fileConfig, which disables every
    # logger that already exists; `up` still needs its own after the upgrade.
    for name in (__name__, "shared.supervisor", "shared.local_redis"):
        logging.getLogger(name).disabled = False
    # Alembic narrates every plugin it loads at INFO; `up` reports the outcome itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)


@click.command()
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address the web server listens on."
)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--startup-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds to wait for /healthz.",
)
def up(host: str, port: int, startup_timeout: float) -> None:
    """Run everything locally: web server, a worker, the reconciler and (if needed) Redis.

    State (SQLite database, Redis AOF, artifacts) lives in TRAINYARD_HOME
    (default ./.trainyard). On first start it creates the user `admin`, prints its
    password (also kept in TRAINYARD_HOME/admin-password) and writes an API token for
    the CLI to TRAINYARD_HOME/cli-token. Ctrl-C stops everything.
    """
    from shared.local_redis import LocalRedis, LocalRedisError

    _configure_logging()
    settings = cli_settings()
    home = settings.home.resolve()
    run_dir = home / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    probe_host = f"[{probe_host}]" if ":" in probe_host else probe_host
    url = f"http://{probe_host}:{port}"
    console = make_console()

    with _exclusive_home(run_dir):
        _stop_leftovers(run_dir)
        _check_port_free(host, port)
        env = dict(os.environ)
        env["TRAINYARD_HOME"] = str(home)
        env.setdefault("PYTHONUNBUFFERED", "1")  # children's logs appear as they happen

        stop = _StopSignals()
        stop.install()
        redis_server: LocalRedis | None = None
        supervisor: Supervisor | None = None
        try:
            if settings.redis_url:
                _check_redis(settings.redis_url)
            else:
                try:
                    redis_server = LocalRedis(home / "redis", stop_stale=True).start()
                except LocalRedisError as exc:
                    raise click.ClickException(str(exc)) from None
                env["TRAINYARD_REDIS_URL"] = redis_server.url
            try:
                upgrade_database(settings)
            except Exception as exc:
                log.error("database upgrade failed", exc_info=True)
                raise click.ClickException(f"database upgrade failed: {exc}") from None
            _configure_logging()
            log.info("database is up to date: %s", safe_url(settings.resolved_database_url))
            try:
                login = bootstrap_local_admin(settings)
            except Exception as exc:
                # Not logged with the traceback: a database error repeats its parameters,
                # which for `users` include a password hash.
                raise click.ClickException(
                    f"could not set up the admin account: {db_error_text(exc)}"
                ) from None
            finally:
                from shared.db import get_engine

                # `up` itself needs the database no more; its children open their own.
                get_engine(settings.resolved_database_url).dispose()

            if stop.received is None:  # else Ctrl-C came during start-up: start no more
                supervisor = Supervisor(
                    local_children(host=host, port=port, env=env, gpu=gpu_visible())
                )
                supervisor.start()
                _supervise(
                    supervisor, redis_server, stop, run_dir, url, startup_timeout, console, login
                )
        finally:
            if supervisor is not None:
                console.print("Stopping Trainyard ...")
                supervisor.stop()
            if redis_server is not None:
                redis_server.stop()
            (run_dir / STATE_FILE).unlink(missing_ok=True)
            stop.restore()
    console.print("Trainyard stopped.")


def _supervise(
    supervisor: Supervisor,
    redis_server: Any,
    stop: _StopSignals,
    run_dir: Path,
    url: str,
    startup_timeout: float,
    console: Console,
    login: BootstrapResult | None = None,
) -> None:
    """The loop of `up`: restart what exits, announce readiness, return on a signal."""
    from shared.local_redis import LocalRedisError

    ready = False
    deadline = time.monotonic() + startup_timeout
    written: dict[str, Any] = {}
    redis_backoff = Backoff()
    redis_started = time.monotonic()
    redis_retry_at: float | None = None
    while stop.received is None:
        supervisor.poll()
        now = time.monotonic()
        if redis_server is not None and not redis_server.is_running():
            # Same port on restart, so the children's TRAINYARD_REDIS_URL stays right.
            if redis_retry_at is None:
                delay = redis_backoff.next_delay(now - redis_started)
                log.warning(
                    "embedded Redis exited; restarting in %.0f s:\n%s",
                    delay,
                    redis_server.log_tail(5),
                )
                redis_retry_at = now + delay
            elif now >= redis_retry_at:
                redis_retry_at = None
                redis_started = now
                try:
                    redis_server.start()
                except LocalRedisError as exc:
                    log.error("%s", exc)
        state = {
            "pid": os.getpid(),
            "url": url,
            "redis": {"pid": redis_server.pid, "url": redis_server.url} if redis_server else None,
            "children": supervisor.pids(),
            "restarts": supervisor.restarts(),
        }
        if state != written:
            _write_state(run_dir, state)
            written = state
        if not ready:
            if _healthy(url):
                ready = True
                console.print(f"Trainyard is running at {url}  (Ctrl-C to stop)")
                if login is not None:
                    print_login(console, login, url)
            elif now > deadline:
                raise click.ClickException(
                    f"the web server did not answer {url}/healthz within {startup_timeout:.0f} s; "
                    "see the log above"
                )
        time.sleep(0.5 if ready else 0.25)
