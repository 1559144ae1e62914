"""`trainyard serve`: the prediction server (worker/serving/), a process of its own.

Like `web` and `worker`, it execs a fresh interpreter (gunicorn), so the CLI never
imports `worker` or torch: gunicorn loads `worker.serving.wsgi:app` itself.

gunicorn's gthread worker, ONE worker process with many threads: every request of the
process meets the same loaded models and the same batcher per version, which is what
gathers concurrent requests into one forward pass (separate processes would each hold
a copy of every model and batch only their own requests). More capacity: more serve
processes (`docker compose up --scale serve=N`), each with its own cache. Plain gthread
rather than Trainyard's web worker class: predictions are short request/response calls
with no streams to hand off, and slow clients are absorbed by the proxy in front.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from server.cli.install_checks import require_worker_extra
from server.cli.settings import cli_settings

APP = "worker.serving.wsgi:app"


def _exec(argv: list[str]) -> NoReturn:
    """Replace this process, so signals from Docker reach gunicorn directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, dict(os.environ))


def serve_argv(host: str, port: int, threads: int, timeout: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", APP,
        "-b", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers", "1",
        "--worker-class", "gthread",
        "--threads", str(threads),
        "--timeout", str(timeout),
        "--graceful-timeout", "8",
        # Keep-alive connections from a proxy or a client that sends many requests.
        "--keep-alive", "5",
    ]  # fmt: skip


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8100, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--threads",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Request threads of the one process: concurrent requests batch together.",
)
@click.option(
    "--timeout", default=120, show_default=True, type=click.IntRange(min=1),
    help="gunicorn worker timeout (s): a first request may load a large model.",
)  # fmt: skip
def serve(host: str, port: int, threads: int, timeout: int) -> None:
    """Serve predictions of registered models over HTTP (README "Serving predictions")."""
    require_worker_extra()
    settings = cli_settings()
    if not settings.redis_url:
        click.echo(
            "warning: TRAINYARD_REDIS_URL is not set; serving statistics stay in this process",
            err=True,
        )
    _exec(serve_argv(host, port, threads, timeout))
