"""The `trainyard` command.

Two kinds of subcommand live here:

- client commands (`submit`, `jobs`, `show`, `watch`, `cancel`) talk to the HTTP API
  only, never to the database, so they work from any machine that can reach the server;
- process commands (`web`, `worker`, `db upgrade`, `up`) start the parts of Trainyard.

The web process imports this module too (it is the console script), so nothing here
imports `worker` or torch: the worker command execs Celery in a fresh interpreter.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

import click
import requests
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.table import Table

from shared.settings import Settings, load_settings
from shared.supervisor import Backoff, ChildSpec, Supervisor

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
STATE_STYLES = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}
# The first of these a finished job has is its "key metric" in `trainyard jobs`.
KEY_METRICS = ("val_accuracy", "accuracy", "f1", "val_loss", "loss", "train_loss")

# Exit codes beyond click's own (2 is also click's usage error: both mean "nothing ran").
EXIT_API_ERROR = 1
EXIT_UNREACHABLE = 2

F = TypeVar("F", bound=Callable[..., Any])


# ==================================================================== HTTP client


class ApiError(Exception):
    """A 4xx/5xx answer, in the API's one error shape (design.md 3)."""

    def __init__(self, status: int, code: str, message: str, fields: dict[str, str] | None = None):
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields or {}
        super().__init__(f"{message} ({code}, HTTP {status})")

    @classmethod
    def from_response(cls, resp: requests.Response) -> ApiError:
        try:
            body = resp.json()
            err = body["error"]
            return cls(
                resp.status_code,
                str(err.get("code") or "error"),
                str(err.get("message") or resp.reason),
                {str(k): str(v) for k, v in (err.get("fields") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            # Not our error shape: a proxy's page, or a crash before the error handler.
            text = " ".join(resp.text.split())[:200]
            return cls(resp.status_code, "http_error", text or resp.reason or "no body")


class ApiUnreachable(Exception):
    """No HTTP answer at all: nothing listening, DNS, timeout."""


class ApiClient:
    def __init__(self, base_url: str, timeout: tuple[float, float] = (3.05, 30.0)) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # One session: `watch` polls twice a second and keep-alive saves a handshake each time.
        self._session = requests.Session()

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request(
            "GET", path, params={k: v for k, v in (params or {}).items() if v is not None}
        )

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        return self._request("POST", path, json=body, headers=headers)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.base_url}/api/v1{path}"
        try:
            resp = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else "cannot connect"
            raise ApiUnreachable(
                f"cannot reach Trainyard at {self.base_url} ({reason}). Is it running? "
                "Start it with `trainyard up`, or point --url / TRAINYARD_URL at it."
            ) from None
        except requests.Timeout:
            raise ApiUnreachable(
                f"Trainyard at {self.base_url} did not answer within {self.timeout[1]:.0f} s"
            ) from None
        if resp.status_code >= 400:
            raise ApiError.from_response(resp)
        try:
            return resp.json()
        except ValueError:
            raise ApiError(
                resp.status_code, "bad_response", f"{url} did not answer with JSON"
            ) from None


def _api_command(func: F) -> F:
    """Turn client errors into a message and an exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiUnreachable as exc:
            click.echo(f"error: {exc}", err=True)
            raise click.exceptions.Exit(EXIT_UNREACHABLE) from None
        except ApiError as exc:
            _echo_api_error(exc)
            raise click.exceptions.Exit(EXIT_API_ERROR) from None

    return wrapper  # type: ignore[return-value]


def _echo_api_error(exc: ApiError) -> None:
    click.echo(f"error: {exc.message} ({exc.code}, HTTP {exc.status})", err=True)
    for field, message in exc.fields.items():
        click.echo(f"  {field}: {message}", err=True)


def _default_url() -> str:
    return _settings().url


url_option = click.option(
    "--url",
    default=_default_url,
    show_default="$TRAINYARD_URL or " + DEFAULT_URL,
    metavar="URL",
    help="Where the Trainyard server is.",
)


# ==================================================================== formatting


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped into grep or a file: 80 columns would wrap the table mid-word.
        console = Console(highlight=False, width=160)
    return console


def _state_text(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{escape(state)}[/]"


def _error_text(error: dict[str, Any]) -> str:
    # Server-provided text is escaped: "[cuda error]" is not rich markup.
    return f"[red]{escape(str(error.get('type') or 'Error'))}[/]: {escape(str(error.get('message') or ''))}"


def _fmt_number(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _fmt_time(iso: str | None) -> str:
    """API timestamps are ISO-8601 UTC ('...Z'); shown to the second, still UTC."""
    if not iso:
        return "-"
    try:
        ts = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _elapsed(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (b - a).total_seconds()


def _name_of(job: dict[str, Any], field: str) -> str:
    value = job.get(field)
    if isinstance(value, dict):
        value = value.get("name")
    if not value:
        # An evaluate job may not name its dataset; the spec may still say more.
        spec_value = (job.get("spec") or {}).get(field)
        value = spec_value.get("name") if isinstance(spec_value, dict) else spec_value
    return escape(str(value)) if value else "-"


def progress_text(progress: dict[str, Any] | None) -> str:
    """'epoch 3/10 · step 120/500 · 1,234 samples/s · ETA 1:23' from a job's progress."""
    if not progress:
        return ""
    parts = []
    if progress.get("epoch") is not None:
        epochs = progress.get("epochs")
        parts.append(
            f"epoch {progress['epoch']}/{epochs}" if epochs else f"epoch {progress['epoch']}"
        )
    if progress.get("step") is not None:
        total = progress.get("steps_total")
        parts.append(
            f"step {progress['step']:,}/{total:,}" if total else f"step {progress['step']:,}"
        )
    if progress.get("samples_per_s"):
        parts.append(f"{progress['samples_per_s']:,.0f} samples/s")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {_fmt_duration(progress['eta_s'])}")
    return " · ".join(parts)


def _fraction(progress: dict[str, Any] | None) -> float | None:
    if not progress:
        return None
    if progress.get("fraction") is not None:
        return min(1.0, max(0.0, float(progress["fraction"])))
    if progress.get("steps_total") and progress.get("step") is not None:
        return min(1.0, progress["step"] / progress["steps_total"])
    if progress.get("epochs") and progress.get("epoch") is not None:
        return min(1.0, progress["epoch"] / progress["epochs"])
    return None


def key_metric(job: dict[str, Any]) -> str:
    if job.get("state") == "running" and job.get("progress"):
        frac = _fraction(job["progress"])
        text = progress_text({k: job["progress"].get(k) for k in ("epoch", "epochs")})
        return f"{text} ({frac:.0%})" if frac is not None and text else text
    metrics = (job.get("result") or {}).get("metrics") or {}
    for key in KEY_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{key} {_fmt_number(value)}"
    if job.get("error"):
        return f"[red]{escape(str(job['error'].get('type') or 'error'))}[/]"
    return ""


def _metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            # A confusion matrix: one row per line, aligned, rather than one long JSON line.
            width = max(len(str(x)) for row in value for x in row)
            lines = "\n".join(" ".join(str(x).rjust(width) for x in row) for row in value)
            table.add_row(escape(key), lines)
        else:
            table.add_row(escape(key), escape(_fmt_number(value)))
    return table


def _print_outcome(console: Console, job: dict[str, Any]) -> None:
    state = job.get("state")
    took = _elapsed(job.get("started_at"), job.get("finished_at"))
    suffix = f" after {_fmt_duration(took)}" if took is not None else ""
    console.print(f"Job {job['id']} {_state_text(str(state))}{suffix}")
    metrics = (job.get("result") or {}).get("metrics")
    if metrics:
        console.print(_metrics_table(metrics))
    error = job.get("error")
    if error:
        console.print(_error_text(error))


def _print_job(console: Console, job: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    state = _state_text(str(job.get("state")))
    if job.get("cancel_requested") and job.get("state") not in TERMINAL_STATES:
        state += " (cancel requested)"
    rows: list[tuple[str, str]] = [
        ("id", str(job.get("id"))),
        ("name", escape(job.get("name") or "-")),
        ("kind", escape(str(job.get("kind")))),
        ("state", state),
        ("queue", escape(f"{job.get('queue')} (priority {job.get('priority')})")),
        ("model", _name_of(job, "model")),
        ("dataset", _name_of(job, "dataset")),
    ]
    if job.get("tags"):
        rows.append(("tags", escape(", ".join(job["tags"]))))
    if job.get("source_job_id"):
        rows.append(("source job", str(job["source_job_id"])))
    rows += [
        ("attempt", f"{job.get('attempt')}/{job.get('max_attempts')}"),
        ("worker", escape(job.get("worker") or "-")),
        ("created", _fmt_time(job.get("created_at")) + " UTC"),
        ("started", _fmt_time(job.get("started_at"))),
        ("finished", _fmt_time(job.get("finished_at"))),
    ]
    took = _elapsed(job.get("started_at"), job.get("finished_at"))
    if took is not None:
        rows.append(("duration", _fmt_duration(took)))
    if job.get("state") == "running" and job.get("progress"):
        frac = _fraction(job["progress"])
        pct = f" ({frac:.0%})" if frac is not None else ""
        rows.append(("progress", progress_text(job["progress"]) + pct))
    error = job.get("error")
    if error:
        rows.append(("error", _error_text(error)))
    for key, value in rows:
        grid.add_row(key, value)
    console.print(grid)
    metrics = (job.get("result") or {}).get("metrics")
    if metrics:
        console.print("\n[bold]result metrics[/]")
        console.print(_metrics_table(metrics))
    if job.get("spec"):
        console.print("\n[bold]spec[/]")
        console.print(json.dumps(job["spec"], indent=2), markup=False, highlight=False)


# ==================================================================== client commands


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid TRAINYARD_* environment variable:\n{exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainyard", message="%(prog)s %(version)s")
def main() -> None:
    """Trainyard: a job queue for PyTorch training.

    Start everything locally with `trainyard up`, then submit a job with
    `trainyard submit spec.json --watch`.
    """


@main.command()
@click.argument("spec_file", type=click.File("r", encoding="utf-8"), metavar="SPEC_FILE")
@click.option("--watch", "-w", "then_watch", is_flag=True, help="Follow the job until it finishes.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the job id (for scripts).")
@click.option(
    "--idempotency-key", metavar="KEY", help="Retrying with the same key returns the same job."
)
@click.option(
    "--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05), hidden=True
)
@url_option
@_api_command
def submit(
    spec_file: IO[str],
    then_watch: bool,
    quiet: bool,
    idempotency_key: str | None,
    interval: float,
    url: str,
) -> None:
    """Submit the job described by SPEC_FILE (JSON; `-` reads stdin)."""
    try:
        spec = json.load(spec_file)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"{spec_file.name} is not valid JSON: {exc}") from None
    client = ApiClient(url)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
    job = client.post("/jobs", spec, headers=headers)
    if quiet:
        click.echo(job["id"])
    else:
        _console().print(
            f"Submitted job {job['id']} ({_state_text(job.get('state', '?'))}, queue {job.get('queue')})"
        )
    if then_watch:
        raise click.exceptions.Exit(_watch(client, int(job["id"]), interval))


@main.command("jobs")
@click.option("--state", type=click.Choice(JOB_STATES), help="Only jobs in this state.")
@click.option("--kind", metavar="KIND", help="Only jobs of this kind (train, evaluate).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, metavar="ID", help="Jobs older than this id (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@_api_command
def jobs_command(
    state: str | None, kind: str | None, limit: int, before: int | None, as_json: bool, url: str
) -> None:
    """List jobs, newest first."""
    page = ApiClient(url).get(
        "/jobs", {"state": state, "kind": kind, "limit": limit, "before": before}
    )
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    console = _console()
    jobs = page.get("jobs") or []
    if not jobs:
        console.print("No jobs.")
        return
    table = Table(header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("name")
    table.add_column("state", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("dataset", no_wrap=True)
    table.add_column("key metric")
    table.add_column("created (UTC)", no_wrap=True)
    for job in jobs:
        table.add_row(
            str(job.get("id")),
            escape(str(job.get("kind"))),
            escape(job.get("name") or "-"),
            _state_text(str(job.get("state"))),
            _name_of(job, "model"),
            _name_of(job, "dataset"),
            key_metric(job),
            _fmt_time(job.get("created_at")),
        )
    console.print(table)
    if page.get("next_before"):
        console.print(f"[dim]More: trainyard jobs --before {page['next_before']}[/]")


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the raw job object.")
@url_option
@_api_command
def show(job_id: int, as_json: bool, url: str) -> None:
    """Show one job: state, progress, result or error, and its spec."""
    job = ApiClient(url).get(f"/jobs/{job_id}")
    if as_json:
        click.echo(json.dumps(job, indent=2))
    else:
        _print_job(_console(), job)


@main.command()
@click.argument("job_id", type=int)
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between polls.",
)
@url_option
@_api_command
def watch(job_id: int, interval: float, url: str) -> None:
    """Follow a job until it finishes; exit 0 if it succeeded, 1 otherwise."""
    raise click.exceptions.Exit(_watch(ApiClient(url), job_id, interval))


def _watch(
    client: ApiClient, job_id: int, interval: float, *, outage_tolerance: float = 15.0
) -> int:
    console = _console()
    job = client.get(f"/jobs/{job_id}")  # unreachable or 404 here: fail at once
    columns = (
        TextColumn(f"job {job_id}"),
        TextColumn("{task.fields[state]}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    unreachable_since: float | None = None
    last_frac: float | None = None
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("", total=None, state="", detail="")
            while True:
                state = str(job.get("state"))
                frac = _fraction(job.get("progress"))
                if state == "succeeded":
                    frac = 1.0
                elif frac is None and state in TERMINAL_STATES:
                    frac = last_frac  # a failed job drops its progress; show where it stopped
                last_frac = frac
                detail = progress_text(job.get("progress")) if state == "running" else ""
                if job.get("cancel_requested") and state not in TERMINAL_STATES:
                    detail = "cancel requested " + detail
                # total=None makes the bar pulse: a queued job has no progress to show yet.
                bar.update(
                    task,
                    total=None if frac is None else 1.0,
                    completed=frac or 0.0,
                    state=_state_text(state),
                    detail=detail,
                )
                if state in TERMINAL_STATES:
                    break
                time.sleep(interval)
                try:
                    job = client.get(f"/jobs/{job_id}")
                    unreachable_since = None
                except ApiUnreachable:
                    # `up` restarting the web process must not end a long watch.
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if now - unreachable_since > outage_tolerance:
                        raise
    except KeyboardInterrupt:
        console.print(
            f"Stopped watching job {job_id}; it keeps running (`trainyard cancel {job_id}` stops it)."
        )
        return 130
    _print_outcome(console, job)
    return 0 if job.get("state") == "succeeded" else 1


@main.command()
@click.argument("job_id", type=int)
@url_option
@_api_command
def cancel(job_id: int, url: str) -> None:
    """Cancel a job: a queued one at once, a running one within seconds."""
    job = ApiClient(url).post(f"/jobs/{job_id}/cancel")
    state = str(job.get("state"))
    console = _console()
    if state in TERMINAL_STATES:
        console.print(f"Job {job_id} is {_state_text(state)}.")
    else:
        console.print(
            f"Job {job_id}: cancel requested ({_state_text(state)}); it stops within seconds."
        )


# ==================================================================== process commands


def _exec(argv: Sequence[str], env: dict[str, str] | None = None) -> NoReturn:
    """Replace this process, so signals from `up` or Docker reach gunicorn/Celery directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], list(argv), env if env is not None else dict(os.environ))


def gunicorn_argv(host: str, port: int, workers: int, timeout: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "server.wsgi:app",
        "-b", f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "--workers", str(workers),
        "--timeout", str(timeout),
        # Below the 10 s that `up` and `docker stop` wait before SIGKILL.
        "--graceful-timeout", "8",
    ]  # fmt: skip


def celery_worker_argv(queues: str, concurrency: int, node_name: str, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker",
        "-Q", queues,
        "--concurrency", str(concurrency),
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


@main.command()
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
    if not _settings().redis_url:
        click.echo(
            "warning: TRAINYARD_REDIS_URL is not set; submitted jobs cannot be enqueued", err=True
        )
    _exec(gunicorn_argv(host, port, workers, timeout))


@main.command()
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
    help="Jobs run at once. [default: $TRAINYARD_WORKER_SLOTS or 1]",
)
@click.option(
    "--name",
    "-n",
    "node_name",
    metavar="NAME",
    help="Celery node name. [default: trainyard-<pid>@%h]",
)
@click.option("--loglevel", "-l", default="INFO", show_default=True)
def worker(
    queues: str | None, concurrency: int | None, node_name: str | None, loglevel: str
) -> None:
    """Run a Celery worker that trains and evaluates jobs."""
    from shared.celery_app import QUEUES  # Celery, but no torch: fine for the CLI

    settings = _settings()
    if not settings.redis_url:
        raise click.ClickException("TRAINYARD_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    chosen = [
        q.strip() for q in (queues or ("gpu" if gpu_visible() else "cpu")).split(",") if q.strip()
    ]
    unknown = sorted(set(chosen) - set(QUEUES))
    if not chosen or unknown:
        raise click.BadParameter(
            f"unknown queue(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(QUEUES)}",
            param_hint="--queues",
        )
    slots = concurrency or settings.worker_slots
    env = dict(os.environ)
    # The worker sizes torch's thread pool as cores // slots; it must see the same count.
    env["TRAINYARD_WORKER_SLOTS"] = str(slots)
    name = node_name or f"trainyard-{os.getpid()}@%h"
    _exec(celery_worker_argv(",".join(chosen), slots, name, loglevel), env)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Bring the database schema up to date (Alembic upgrade head)."""
    settings = _settings()
    _upgrade_database(settings)
    click.echo(f"Database is up to date: {_safe_url(settings.resolved_database_url)}")


def _upgrade_database(settings: Settings) -> None:
    from shared.migrate import upgrade_database  # Alembic: only the commands that need it

    upgrade_database(settings.resolved_database_url)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url.split("@")[-1]


# ==================================================================== local mode (`up`)

RUN_DIR = "run"
STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
# Substrings of a child's command line; a leftover pid is only killed if it matches one.
_CHILD_MARKERS = ("gunicorn", "celery", "server.cli", "trainyard")


def local_children(*, host: str, port: int, env: dict[str, str], gpu: bool) -> list[ChildSpec]:
    """The processes `trainyard up` runs and keeps running."""
    python = sys.executable
    # `python -m server.cli ...` rather than gunicorn/celery directly: each restart goes
    # through the same code path as the production commands and gets a fresh node name.
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
    ]  # fmt: skip
    # The reconciler (design.md 4.1, 4.4) joins here as one more ChildSpec once it has an
    # entry point, e.g. ChildSpec("reconciler", [python, "-m", "server.cli", "reconciler"], env).
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

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.exceptions.RedisError as exc:
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


@main.command()
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
    """Run everything locally: web server, a worker and (if needed) Redis.

    State (SQLite database, Redis AOF, artifacts) lives in TRAINYARD_HOME
    (default ./.trainyard). Ctrl-C stops everything.
    """
    from shared.local_redis import LocalRedis, LocalRedisError

    _configure_logging()
    settings = _settings()
    home = settings.home.resolve()
    run_dir = home / RUN_DIR
    run_dir.mkdir(parents=True, exist_ok=True)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    probe_host = f"[{probe_host}]" if ":" in probe_host else probe_host
    url = f"http://{probe_host}:{port}"
    console = _console()

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
                _upgrade_database(settings)
            except Exception as exc:
                log.error("database upgrade failed", exc_info=True)
                raise click.ClickException(f"database upgrade failed: {exc}") from None
            _configure_logging()
            log.info("database is up to date: %s", _safe_url(settings.resolved_database_url))

            if stop.received is None:  # else Ctrl-C came during start-up: start no more
                supervisor = Supervisor(
                    local_children(host=host, port=port, env=env, gpu=gpu_visible())
                )
                supervisor.start()
                _supervise(supervisor, redis_server, stop, run_dir, url, startup_timeout, console)
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
            elif now > deadline:
                raise click.ClickException(
                    f"the web server did not answer {url}/healthz within {startup_timeout:.0f} s; "
                    "see the log above"
                )
        time.sleep(0.5 if ready else 0.25)


if __name__ == "__main__":  # `python -m server.cli`, which `up` uses for its children
    main(prog_name="trainyard")
