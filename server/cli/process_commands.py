"""The commands that start Trainyard's processes: web, worker, reconcile, db upgrade.

`web` and `worker` exec gunicorn and Celery in a fresh interpreter, so this module never
imports `worker` or torch: the web process imports the CLI too (it is the console script).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from server.cli.install_checks import require_worker_extra
from server.cli.settings import cli_settings
from shared.log_setup import configure_logging
from shared.settings import Settings, parse_gpu_selection


def _exec(argv: Sequence[str], env: dict[str, str] | None = None) -> NoReturn:
    """Replace this process, so signals from `up` or Docker reach gunicorn/Celery directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], list(argv), env if env is not None else dict(os.environ))


# Threads per gunicorn worker process, for requests. Trainyard's worker class (gthread
# underneath, server/gunicorn_worker.py) reads headers in its event loop and hands job
# streams (SSE) to one hub thread per process, so neither slow clients nor open job
# pages hold these threads (docs/architecture.md, "Live job pages").
WEB_THREADS = 8
WORKER_CLASS = "server.gunicorn_worker.TrainyardWorker"


def gunicorn_argv(host: str, port: int, workers: int, timeout: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "server.wsgi:app",
        # Prometheus's multiprocess directory, emptied at start (server/gunicorn_hooks.py).
        "-c", "python:server.gunicorn_hooks",
        "-b", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers", str(workers),
        "--worker-class", WORKER_CLASS,
        "--threads", str(WEB_THREADS),
        "--timeout", str(timeout),
        # Below the 10 s that `up` and `docker stop` wait before SIGKILL.
        "--graceful-timeout", "8",
    ]  # fmt: skip


def celery_worker_argv(
    queues: str, concurrency: int | None, node_name: str, loglevel: str
) -> list[str]:
    """Without `concurrency` the worker decides: one job per GPU slot on a GPU host,
    $TRAINYARD_WORKER_SLOTS on a CPU host (worker/celery_worker.py)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker",
        "-Q", queues,
        *(["--concurrency", str(concurrency)] if concurrency else []),
        "--prefetch-multiplier", "1",
        "-n", node_name,
        "--loglevel", loglevel,
    ]  # fmt: skip


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU we may use, without importing torch.

    CUDA_VISIBLE_DEVICES set to nothing (or -1) hides every GPU, as it does for CUDA.
    """
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1", "NoDevFiles"):
        return False
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi:
        try:
            out = subprocess.run(
                [nvidia_smi, "-L"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and "GPU" in out.stdout:
            return True
    return os.path.exists("/dev/nvidia0")


def upgrade_database(settings: Settings) -> None:
    # Alembic is imported only by the commands that need it, not by every `trainyard` run.
    from shared.migrate import upgrade_database as alembic_upgrade

    alembic_upgrade(settings.resolved_database_url)


def safe_url(url: str) -> str:
    """A database URL fit to print: the password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url.split("@")[-1]


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="gunicorn worker processes.",
)
@click.option(
    "--timeout",
    default=60,
    show_default=True,
    type=click.IntRange(min=1),
    help="gunicorn worker timeout (s).",
)
def web(host: str, port: int, workers: int, timeout: int) -> None:
    """Run the web server and API (gunicorn)."""
    if not cli_settings().redis_url:
        click.echo(
            "warning: TRAINYARD_REDIS_URL is not set; submitted jobs cannot be enqueued", err=True
        )
    _exec(gunicorn_argv(host, port, workers, timeout))


# A group, so that `trainyard worker drain NODE` and friends (server/cli/node_commands.py)
# live beside it, while `trainyard worker [options]` without a subcommand still starts a
# worker, as it always did.
@click.group(invoke_without_command=True)
@click.option(
    "--queues",
    "-Q",
    metavar="Q1,Q2",
    help="Queues to take jobs from. [default: gpu if a GPU is visible, else cpu]",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(min=1),
    help="Jobs run at once. [default: one per GPU slot on a GPU host, else "
    "$TRAINYARD_WORKER_SLOTS or 1]",
)
@click.option(
    "--gpus",
    metavar="all|none|0,1,3",
    help="GPUs to use, by nvidia-smi index; each job slot owns its own. "
    "[default: $TRAINYARD_WORKER_GPUS or all (none on a host without NVIDIA GPUs)]",
)
@click.option(
    "--gpus-per-slot",
    type=click.IntRange(min=1),
    help="GPUs each job slot owns. [default: $TRAINYARD_GPUS_PER_SLOT or 1]",
)
@click.option(
    "--name",
    "-n",
    "node_name",
    metavar="NAME",
    help="Celery node name. [default: trainyard-<pid>@%h]",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.pass_context
def worker(
    ctx: click.Context,
    queues: str | None,
    concurrency: int | None,
    gpus: str | None,
    gpus_per_slot: int | None,
    node_name: str | None,
    loglevel: str,
) -> None:
    """Run a Celery worker that trains and evaluates jobs.

    With a subcommand, act on a running (or future) worker node instead: cordon,
    drain, uncordon, clear.
    """
    if ctx.invoked_subcommand is not None:
        return
    # Before Celery starts: it would only die on its first import, with a traceback.
    require_worker_extra()
    from shared.celery_app import QUEUES  # Celery, but no torch: fine for the CLI

    settings = cli_settings()
    if not settings.redis_url:
        raise click.ClickException("TRAINYARD_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    try:
        selection = parse_gpu_selection(settings.worker_gpus if gpus is None else gpus)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--gpus") from None
    on_gpu = selection != "none" and (selection != "all" or gpu_visible())
    chosen = [q.strip() for q in (queues or ("gpu" if on_gpu else "cpu")).split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if not chosen or unknown:
        raise click.BadParameter(
            f"unknown queue(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(QUEUES)}",
            param_hint="--queues",
        )
    env = dict(os.environ)
    if gpus is not None:
        env["TRAINYARD_WORKER_GPUS"] = gpus
    if gpus_per_slot is not None:
        env["TRAINYARD_GPUS_PER_SLOT"] = str(gpus_per_slot)
    name = node_name or f"trainyard-{os.getpid()}@%h"
    # The worker lists the GPUs (NVML) and splits them into slots; it also sizes torch's
    # thread pool from the concurrency it ends up with.
    _exec(celery_worker_argv(",".join(chosen), concurrency, name, loglevel), env)


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    settings = cli_settings()
    upgrade_database(settings)
    click.echo(f"Database is up to date: {safe_url(settings.resolved_database_url)}")


@click.command()
@click.option("--once", is_flag=True, help="Run one pass, print what it did and exit.")
@click.option(
    "--alive-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Touch this file after every pass (for a container healthcheck).",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def reconcile(once: bool, alive_file: Path | None, loglevel: str) -> None:
    """Requeue jobs whose worker was lost and re-publish queued jobs the broker lost.

    Runs every $TRAINYARD_RECONCILE_SECONDS until stopped (SIGTERM/Ctrl-C). Several
    reconcilers may run at once: each change is a compare-and-set on the job row. Each
    pass (--once too) also decides preemptions (README, "Scheduling"); one reconciler
    at a time does that, under a Redis lock.
    """
    # Celery and redis, no torch: the reconciler is a small process of its own.
    from shared.celery_app import make_celery
    from shared.reconciler import preempt_pass, reconcile_once, run_forever

    settings = cli_settings()
    if not settings.redis_url:
        raise click.ClickException("TRAINYARD_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    configure_logging(settings.log_format, "reconciler", loglevel)
    if once:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            report = reconcile_once(settings, make_celery(settings))
        except SQLAlchemyError as exc:
            raise click.ClickException(f"database error: {exc}") from None
        click.echo(str(report))
        if report.broker_error:
            raise click.ClickException(f"Redis could not be read: {report.broker_error}")
        token = f"{socket.gethostname()}:{os.getpid()}:once"
        for p in preempt_pass(settings, token, release=True):
            click.echo(f"preempting job {p.victim} for job {p.preemptor}")
        from shared import webhook_delivery

        click.echo(f"webhooks: {webhook_delivery.run_once(settings)}")
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    run_forever(settings, stop, alive_file)
