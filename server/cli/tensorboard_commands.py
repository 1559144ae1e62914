"""`trainyard tensorboard export JOB... --out DIR`: jobs' metrics as TensorBoard files.

Speaks HTTP only, like the other client commands: each job's run directory comes from
GET /api/v1/jobs/{id}/tensorboard and is unpacked into DIR, so `tensorboard --logdir
DIR` shows them side by side. With several jobs, an experiment summary at the top of
DIR names every hyperparameter and final metric of the exported jobs (from their specs
and results, read with GET /api/v1/jobs/{id}), which lines them up in TensorBoard's
HPARAMS table.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import click

from server.cli.api_client import ApiClient, api_command
from server.cli.job_commands import token_option, url_option


@click.group("tensorboard")
def tensorboard_group() -> None:
    """Jobs' metrics as TensorBoard event files."""


@tensorboard_group.command("export")
@click.argument("job_ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="JOB...")
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="The log directory to write the runs into (created if missing).",
)
@url_option
@token_option
@api_command
def tensorboard_export(job_ids: tuple[int, ...], out: Path, url: str, token: str | None) -> None:
    """Export the metrics of each JOB into DIR, one run directory per job
    (job-<id>-<name>), then: tensorboard --logdir DIR"""
    # Imported here: the protobuf modules take half a second, which other commands skip.
    from shared.tensorboard_export import SessionSummary, extract_runs, write_experiment

    client = ApiClient(url, token=token)
    sessions = []
    with contextlib.ExitStack() as stack:
        # Every job is fetched before any is unpacked: a job that cannot be exported (not
        # found, not yours, the server gone) leaves DIR as it was, not half exported.
        fetched = []
        for job_id in dict.fromkeys(job_ids):
            job = client.get(f"/jobs/{job_id}")
            archive = stack.enter_context(tempfile.TemporaryFile())
            client.download(f"/jobs/{job_id}/tensorboard", archive)
            fetched.append((job_id, job, archive))
        for job_id, job, archive in fetched:
            archive.seek(0)
            runs = extract_runs(archive, out)
            sessions.append(SessionSummary.of(job.get("spec") or {}, job.get("result")))
            click.echo(f"Job {job_id}: {out / runs[0]}" if runs else f"Job {job_id}: no run")
    if len(sessions) > 1:
        write_experiment(out, sessions)
        click.echo(f"Experiment summary of {len(sessions)} jobs: {out}")
    click.echo(f"View with: tensorboard --logdir {out}")


__all__ = ["tensorboard_group"]
