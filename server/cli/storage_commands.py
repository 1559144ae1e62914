"""Client commands for stored things: `trainyard upload ...` and `trainyard artifacts ...`.

They speak HTTP only, like the job commands: an upload streams from the file to the
API, and deleting asks for confirmation unless --yes is given.
"""

from __future__ import annotations

from pathlib import Path

import click

from server.cli.api_client import ApiClient, api_command
from server.cli.display import fmt_bytes, make_console
from server.cli.job_commands import token_option, url_option


@click.group("upload")
def upload_group() -> None:
    """CSV uploads for the `csv` dataset: add, list, delete."""


@upload_group.command("add")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="The name to keep (default: the file's name).")
@click.option("--quiet", "-q", is_flag=True, help="Print only the upload id (for scripts).")
@url_option
@token_option
@api_command
def upload_add(path: Path, name: str | None, quiet: bool, url: str, token: str | None) -> None:
    """Upload the CSV file PATH; prints its id, rows and columns."""
    with path.open("rb") as f:
        body = ApiClient(url, token=token).post_file("/uploads", f, name or path.name)
    if quiet:
        click.echo(body["id"])
        return
    make_console().print(
        f"Upload {body['id']}: {body['filename']}, {body['rows']:,} rows, "
        f"{len(body['columns'])} columns ({fmt_bytes(body['size_bytes'])})"
    )


@upload_group.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's uploads (admins only).")
@url_option
@token_option
@api_command
def upload_list(all_users: bool, url: str, token: str | None) -> None:
    """Your uploads, newest first."""
    params = {"all": "true"} if all_users else None
    uploads = ApiClient(url, token=token).get("/uploads", params)["uploads"]
    if not uploads:
        click.echo("No uploads.")
        return
    for u in uploads:
        click.echo(
            f"{u['id']:>6}  {u['filename']}  {u['rows']:,} rows  {len(u['columns'])} columns  "
            f"{fmt_bytes(u['size_bytes'])}  {u['created_at']}"
        )


@upload_group.command("delete")
@click.argument("upload_id", type=click.IntRange(min=1))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
@token_option
@api_command
def upload_delete(upload_id: int, yes: bool, url: str, token: str | None) -> None:
    """Delete upload UPLOAD_ID (refused while a queued or running job uses it)."""
    if not yes:
        click.confirm(f"Delete upload {upload_id}? It cannot be recovered", abort=True)
    body = ApiClient(url, token=token).delete(f"/uploads/{upload_id}")
    click.echo(f"Deleted upload {upload_id} ({fmt_bytes(body['freed_bytes'])} freed).")


@click.group("artifacts")
def artifacts_group() -> None:
    """A finished job's files (checkpoints, exports, log)."""


@artifacts_group.command("delete")
@click.argument("job_id", type=click.IntRange(min=1))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
@token_option
@api_command
def artifacts_delete(job_id: int, yes: bool, url: str, token: str | None) -> None:
    """Delete the files of finished job JOB_ID; the job, its metrics and timeline stay."""
    if not yes:
        click.confirm(
            f"Delete the files of job {job_id} (checkpoints, exports, log)? "
            "They cannot be recovered",
            abort=True,
        )
    body = ApiClient(url, token=token).delete(f"/jobs/{job_id}/artifacts")
    click.echo(f"Deleted the files of job {job_id} ({fmt_bytes(body['freed_bytes'])} freed).")


__all__ = ["artifacts_group", "upload_group"]
