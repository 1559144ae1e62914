"""`trainyard bundles add|list|show|delete`: code bundles for script jobs, over HTTP.

`trainyard submit --code DIR` uploads bundles by itself; these commands are for looking
at what is stored, uploading an archive made elsewhere, and cleaning up.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from server.cli.api_client import ApiClient, api_command
from server.cli.code_bundles import files, upload_archive, upload_folder
from server.cli.display import fmt_bytes, make_console, print_listing
from server.cli.job_commands import token_option, url_option


@click.group("bundles")
def bundles_group() -> None:
    """Code bundles for script jobs: add, list, show, delete."""


@bundles_group.command("add")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--quiet", "-q", is_flag=True, help="Print only the bundle id (for scripts).")
@url_option
@token_option
@api_command
def bundles_add(path: Path, quiet: bool, url: str, token: str | None) -> None:
    """Upload PATH: a folder (packed as `submit --code` packs it, and not uploaded again
    when unchanged) or a .tar.gz/.zip as it is."""
    client = ApiClient(url, token=token)
    console = make_console()
    if path.is_dir():
        bundle = upload_folder(client, path, None if quiet else console)
    else:
        bundle = upload_archive(client, path)
        if not quiet:
            console.print(
                f"Bundle {bundle['id']}: {escape(bundle['filename'])}, "
                f"{files(bundle['file_count'])} ({fmt_bytes(bundle['size_bytes'])})"
            )
    if quiet:
        click.echo(bundle["id"])


@bundles_group.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's bundles (admins only).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def bundles_list(all_users: bool, as_json: bool, url: str, token: str | None) -> None:
    """Your bundles, newest first."""
    params = {"all": "true"} if all_users else None
    body = ApiClient(url, token=token).get("/bundles", params)
    print_listing(
        body, "bundles", as_json=as_json, empty="No bundles.",
        columns=("id", "filename", "files", "size", "unpacked", "sha256", "created (UTC)"),
        wrap={"filename"},
        row=lambda b: (
            str(b["id"]),
            escape(b["filename"])
            + (" [dim](requirements.txt)[/]" if b["has_requirements"] else ""),
            str(b["file_count"]),
            fmt_bytes(b["size_bytes"]),
            fmt_bytes(b["unpacked_bytes"]),
            b["sha256"][:12],
            b["created_at"][:19].replace("T", " "),
        ),
    )  # fmt: skip


@bundles_group.command("show")
@click.argument("bundle_id", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the raw bundle object.")
@url_option
@token_option
@api_command
def bundles_show(bundle_id: int, as_json: bool, url: str, token: str | None) -> None:
    """One bundle: its size, hash and Python files (what --entry may name)."""
    b = ApiClient(url, token=token).get(f"/bundles/{bundle_id}")
    if as_json:
        click.echo(json.dumps(b, indent=2))
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in (
        ("id", str(b["id"])),
        ("filename", escape(b["filename"])),
        ("format", b["archive_format"]),
        ("size", f"{fmt_bytes(b['size_bytes'])} ({fmt_bytes(b['unpacked_bytes'])} unpacked)"),
        ("files", str(b["file_count"])),
        ("requirements", "requirements.txt" if b["has_requirements"] else "-"),
        ("sha256", b["sha256"]),
        ("created", b["created_at"][:19].replace("T", " ") + " UTC"),
    ):
        grid.add_row(key, value)
    console = make_console()
    console.print(grid)
    console.print("\n[bold]python files[/]")
    for name in b["python_files"]:
        console.print(escape(name), markup=True, highlight=False)


@bundles_group.command("delete")
@click.argument("bundle_id", type=click.IntRange(min=1))
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@url_option
@token_option
@api_command
def bundles_delete(bundle_id: int, yes: bool, url: str, token: str | None) -> None:
    """Delete bundle BUNDLE_ID (refused while a queued or running job runs it)."""
    if not yes:
        click.confirm(f"Delete bundle {bundle_id}? It cannot be recovered", abort=True)
    body = ApiClient(url, token=token).delete(f"/bundles/{bundle_id}")
    click.echo(f"Deleted bundle {bundle_id} ({fmt_bytes(body['freed_bytes'])} freed).")


__all__ = ["bundles_group"]
