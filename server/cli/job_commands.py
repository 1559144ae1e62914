"""The client commands: submit, jobs, show, watch, cancel. They speak HTTP only
(`submit --code` also packs a folder: server/cli/code_bundles.py).

Each sends an API token: --token, else TRAINYARD_TOKEN, else the file `trainyard up` writes.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from server.cli.api_client import (
    ApiClient,
    ApiUnreachable,
    api_command,
    check_token,
)
from server.cli.code_bundles import ScriptOptions, script_options, script_spec, upload_folder
from server.cli.display import (
    jobs_table,
    make_console,
    print_job,
    print_outcome,
    progress_fraction,
    progress_text,
    state_text,
)
from server.cli.settings import cli_settings
from shared.job_states import ALL_STATES, FINISHED_STATES
from shared.settings import Settings


def _default_url() -> str:
    # A callable, so TRAINYARD_URL is read when the command runs, not at import.
    return cli_settings().url


_url_option = click.option(
    "--url",
    default=_default_url,
    show_default="$TRAINYARD_URL or " + Settings.model_fields["url"].default,
    metavar="URL",
    help="Where the Trainyard server is.",
)


def default_token() -> str | None:
    """TRAINYARD_TOKEN, else the token `trainyard up` wrote to <TRAINYARD_HOME>/cli-token."""
    settings = cli_settings()
    if settings.token:
        return settings.token
    path = settings.cli_token_path
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        # Sending no token would end in a 401 whose hint points at this very file.
        raise click.ClickException(f"cannot read the API token in {path}: {exc.strerror}") from None


def _checked_token(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if not value:
        return None
    try:
        return check_token(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


_token_option = click.option(
    "--token",
    default=default_token,
    callback=_checked_token,
    show_default="$TRAINYARD_TOKEN, else the file $TRAINYARD_HOME/cli-token",
    metavar="TOKEN",
    # A command-line argument is visible to every user of the machine in `ps`.
    help="API token (sent as Authorization: Bearer). Prefer TRAINYARD_TOKEN: "
    "arguments show up in `ps`.",
)


# For the other client command modules (server/cli/storage_commands.py).
url_option, token_option = _url_option, _token_option


@click.command()
@click.argument("arguments", nargs=-1, metavar="[SPEC_FILE | --code DIR --entry FILE -- ARGS...]")
@script_options
@click.option("--watch", "-w", "then_watch", is_flag=True, help="Follow the job until it finishes.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the job id (for scripts).")
@click.option(
    "--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05), hidden=True
)
@_url_option
@_token_option
@api_command
@click.pass_context
def submit(
    ctx: click.Context,
    arguments: tuple[str, ...],
    then_watch: bool,
    quiet: bool,
    interval: float,
    url: str,
    token: str | None,
    **script: Any,
) -> None:
    """Submit the job described by SPEC_FILE (JSON; `-` reads stdin), or run your own
    code: `trainyard submit --code ./project --entry train.py -- --lr 0.01` packs the
    folder, uploads it unless the server has it already, and submits a script job
    (ARGS after `--` are the script's command line)."""
    options = ScriptOptions(**script)
    client = ApiClient(url, token=token)
    if options.code_dir is not None:
        bundle = upload_folder(client, options.code_dir, None if quiet else make_console())
        spec = script_spec(options, int(bundle["id"]), arguments)
    else:
        if options.given_without_code():
            raise click.UsageError(f"{', '.join(options.given_without_code())} need --code DIR")
        if len(arguments) != 1:
            raise click.UsageError("give one SPEC_FILE, or --code DIR --entry FILE")
        spec_file = click.File("r", encoding="utf-8").convert(arguments[0], None, ctx)
        try:
            spec = json.load(spec_file)
        except json.JSONDecodeError as exc:
            raise click.ClickException(f"{spec_file.name} is not valid JSON: {exc}") from None
    job = client.post("/jobs", spec)
    if quiet:
        click.echo(job["id"])
    else:
        make_console().print(
            f"Submitted job {job['id']} ({state_text(job.get('state', '?'))}, queue {job.get('queue')})"
        )
    if then_watch:
        raise click.exceptions.Exit(_watch(client, int(job["id"]), interval))


@click.command("jobs")
@click.option("--state", type=click.Choice(ALL_STATES), help="Only jobs in this state.")
@click.option("--kind", metavar="KIND", help="Only jobs of this kind (train, evaluate, script).")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--before", type=int, metavar="ID", help="Jobs older than this id (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@_url_option
@_token_option
@api_command
def jobs_command(
    state: str | None,
    kind: str | None,
    limit: int,
    before: int | None,
    as_json: bool,
    url: str,
    token: str | None,
) -> None:
    """List jobs, newest first."""
    page = ApiClient(url, token=token).get(
        "/jobs", {"state": state, "kind": kind, "limit": limit, "before": before}
    )
    if as_json:
        click.echo(json.dumps(page, indent=2))
        return
    console = make_console()
    jobs = page.get("jobs") or []
    if not jobs:
        console.print("No jobs.")
        return
    console.print(jobs_table(jobs))
    if page.get("next_before"):
        console.print(f"[dim]More: trainyard jobs --before {page['next_before']}[/]")


@click.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the raw job object.")
@_url_option
@_token_option
@api_command
def show(job_id: int, as_json: bool, url: str, token: str | None) -> None:
    """Show one job: state, progress, result or error, and its spec."""
    job = ApiClient(url, token=token).get(f"/jobs/{job_id}")
    if as_json:
        click.echo(json.dumps(job, indent=2))
    else:
        print_job(make_console(), job)


@click.command()
@click.argument("job_id", type=int)
@click.option(
    "--interval",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between polls.",
)
@_url_option
@_token_option
@api_command
def watch(job_id: int, interval: float, url: str, token: str | None) -> None:
    """Follow a job until it finishes; exit 0 if it succeeded, 1 otherwise."""
    raise click.exceptions.Exit(_watch(ApiClient(url, token=token), job_id, interval))


def _watch(
    client: ApiClient, job_id: int, interval: float, *, outage_tolerance: float = 15.0
) -> int:
    console = make_console()
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
                frac = progress_fraction(job.get("progress"))
                if state == "succeeded":
                    frac = 1.0
                elif frac is None and state in FINISHED_STATES:
                    frac = last_frac  # a failed job drops its progress; show where it stopped
                last_frac = frac
                detail = progress_text(job.get("progress")) if state == "running" else ""
                if job.get("cancel_requested") and state not in FINISHED_STATES:
                    detail = "cancel requested " + detail
                # total=None makes the bar pulse: a queued job has no progress to show yet.
                bar.update(
                    task,
                    total=None if frac is None else 1.0,
                    completed=frac or 0.0,
                    state=state_text(state),
                    detail=detail,
                )
                if state in FINISHED_STATES:
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
    print_outcome(console, job)
    return 0 if job.get("state") == "succeeded" else 1


@click.command()
@click.argument("job_id", type=int)
@_url_option
@_token_option
@api_command
def cancel(job_id: int, url: str, token: str | None) -> None:
    """Cancel a job: a queued one at once, a running one within seconds."""
    job = ApiClient(url, token=token).post(f"/jobs/{job_id}/cancel")
    state = str(job.get("state"))
    console = make_console()
    if state in FINISHED_STATES:
        console.print(f"Job {job_id} is {state_text(state)}.")
    else:
        console.print(
            f"Job {job_id}: cancel requested ({state_text(state)}); it stops within seconds."
        )
