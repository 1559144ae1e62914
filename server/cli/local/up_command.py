"""`trainyard up`: web server, a worker, the reconciler and (if needed) Redis, kept running.

State (SQLite database, Redis AOF, artifacts, the run directory) lives in TRAINYARD_HOME,
and so do the first admin's password and the CLI's API token, written on first start.
The order below matters: what the install lacks is reported before anything is created
or started, then the lock, then Redis, the schema, the admin, and the children.
"""

from __future__ import annotations

import logging
import os

import click

from server.cli.account_commands import db_error_text
from server.cli.display import make_console
from server.cli.install_checks import require_worker_extra
from server.cli.local.admin_bootstrap import bootstrap_local_admin
from server.cli.local.children import local_children
from server.cli.local.preflight import check_port_free, check_redis_answers, require_redis_server
from server.cli.local.private_home import make_home_private
from server.cli.local.run_dir import RUN_DIR, exclusive_home, remove_state, stop_leftovers
from server.cli.local.supervision_loop import StopSignals, supervise
from server.cli.local.supervisor import Supervisor
from server.cli.process_commands import gpu_visible, safe_url, upgrade_database
from server.cli.settings import cli_settings

log = logging.getLogger(__name__)

_LOCAL_PACKAGE = __name__.rpartition(".")[0]


def _configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s [up] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Alembic's env.py usually runs logging.config.fileConfig, which disables every
    # logger that already exists; `up` still needs its own after the upgrade.
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (
            name == _LOCAL_PACKAGE or name.startswith(_LOCAL_PACKAGE + ".")
        ):
            logger.disabled = False
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
    # Else the worker child would crash on its first import and be restarted forever.
    require_worker_extra()
    settings = cli_settings()
    if not settings.redis_url:
        require_redis_server()

    from server.cli.local.embedded_redis import LocalRedis, LocalRedisError

    _configure_logging()
    home = settings.home.resolve()
    # Before anything is created: the home and all in it for its owner only.
    exposed = make_home_private(home)
    if exposed is not None:
        log.warning("%s", exposed)
    run_dir = home / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    probe_host = f"[{probe_host}]" if ":" in probe_host else probe_host
    url = f"http://{probe_host}:{port}"
    console = make_console()

    with exclusive_home(run_dir):
        stop_leftovers(run_dir)
        check_port_free(host, port)
        env = dict(os.environ)
        env["TRAINYARD_HOME"] = str(home)
        env.setdefault("PYTHONUNBUFFERED", "1")  # children's logs appear as they happen

        stop = StopSignals()
        stop.install()
        redis_server: LocalRedis | None = None
        supervisor: Supervisor | None = None
        try:
            if settings.redis_url:
                check_redis_answers(settings.redis_url)
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
                supervise(
                    supervisor, redis_server, stop, run_dir, url, startup_timeout, console, login
                )
        finally:
            if supervisor is not None:
                console.print("Stopping Trainyard ...")
                supervisor.stop()
            if redis_server is not None:
                redis_server.stop()
            remove_state(run_dir)
            stop.restore()
    console.print("Trainyard stopped.")
