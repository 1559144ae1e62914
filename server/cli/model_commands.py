"""`trainyard model promote|list|show|stage`: the model registry over HTTP
(server/registry_api.py).

Only the API: the stage names are repeated here rather than imported from
shared/model_registry.py, which pulls in SQLAlchemy (a client that only speaks HTTP has
no use for it); the server refuses anything else by name anyway.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import click
from rich.markup import escape
from rich.table import Table

from server.cli.api_client import ApiClient, api_command
from server.cli.display import fmt_bytes, make_console, print_listing
from server.cli.job_commands import token_option, url_option

STAGES = ("none", "staging", "production", "archived")


def _model_path(name: str) -> str:
    # Quoted whole: a name is one path segment, whatever a user types.
    return f"/registry/models/{quote(name, safe='')}"


@click.group("model")
def model_group() -> None:
    """The model registry: named, immutable versions of succeeded jobs' models."""


@model_group.command("promote")
@click.argument("job_id", type=int)
@click.option("--name", "-n", required=True, help="The model's name (a new name creates it).")
@click.option(
    "--stage",
    type=click.Choice(STAGES[:3]),
    default="none",
    show_default=True,
    help="Its first stage; production archives the model's production version.",
)
@click.option("--description", "-d", default=None, help="What this version is.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def model_promote(
    job_id: int,
    name: str,
    stage: str,
    description: str | None,
    as_json: bool,
    url: str,
    token: str | None,
) -> None:
    """Register succeeded job JOB_ID's model as the next version of model NAME."""
    body: dict[str, Any] = {"job_id": job_id, "stage": stage}
    if description is not None:
        body["description"] = description
    version = ApiClient(url, token=token).post(f"{_model_path(name)}/versions", body)
    if as_json:
        click.echo(json.dumps(version, indent=2))
        return
    click.echo(
        f"Registered job {job_id} as {version['model']} version {version['version']} "
        f"({version['stage']}): {version['model_file']}, {fmt_bytes(version['size_bytes'])}, "
        f"sha256 {version['sha256']}"
    )


@model_group.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's models (admins only).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def model_list(all_users: bool, as_json: bool, url: str, token: str | None) -> None:
    """Your registered models, newest first."""
    body = ApiClient(url, token=token).get(
        "/registry/models", {"all": "true"} if all_users else None
    )
    print_listing(
        body, "models", as_json=as_json, empty="No registered models.",
        columns=("name", "production", "staging", "latest", "versions", "owner"),
        wrap={"name"},
        row=lambda m: (
            escape(m["name"]),
            f"v{m['production']}" if m["production"] else "-",
            ", ".join(f"v{v}" for v in m["staging"]) or "-",
            f"v{m['latest_version']}" if m["latest_version"] else "-",
            str(m["version_count"]),
            escape(m["owner"] or "-"),
        ),
    )  # fmt: skip


@model_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the raw model object.")
@url_option
@token_option
@api_command
def model_show(name: str, as_json: bool, url: str, token: str | None) -> None:
    """A model's versions (newest first) and its stage history."""
    model = ApiClient(url, token=token).get(_model_path(name))
    if as_json:
        click.echo(json.dumps(model, indent=2))
        return
    console = make_console()
    production = f"version {model['production']}" if model["production"] else "none"
    console.print(f"model {escape(model['name'])} · owner {escape(model['owner'] or '-')} · "
                  f"production: {production}")  # fmt: skip
    if model["description"]:
        console.print(escape(model["description"]))
    versions = Table(title="versions", header_style="bold", title_justify="left")
    for column in ("version", "stage", "job", "kind", "file", "size", "sha256", "by", "at"):
        versions.add_column(column, no_wrap=True)
    for v in model["versions"]:
        versions.add_row(
            str(v["version"]), v["stage"], str(v["job_id"]), v["job_kind"],
            escape(v["model_file"]) + (f" +{len(v['files']) - 1}" if len(v["files"]) > 1 else ""),
            fmt_bytes(v["size_bytes"]), v["sha256"][:12], escape(v["created_by"] or "-"),
            v["created_at"][:19].replace("T", " "),
        )  # fmt: skip
    console.print(versions)
    history = Table(title="stage history", header_style="bold", title_justify="left")
    for column in ("at", "version", "move", "by", "note"):
        history.add_column(column, no_wrap=column != "note")
    for e in model["history"]:
        move = f"{e['from_stage']} -> {e['to_stage']}" if e["from_stage"] else \
            f"registered ({e['to_stage']})"  # fmt: skip
        history.add_row(e["at"][:19].replace("T", " "), str(e["version"]), move,
                        escape(e["user"] or "-"), escape(e["note"] or ""))  # fmt: skip
    console.print(history)


@model_group.command("stage")
@click.argument("name")
@click.argument("version", type=int)
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--note", default=None, help="Why, for the history.")
@url_option
@token_option
@api_command
def model_stage(
    name: str, version: int, stage: str, note: str | None, url: str, token: str | None
) -> None:
    """Move VERSION of model NAME to STAGE (production archives the one that was)."""
    body: dict[str, Any] = {"stage": stage}
    if note is not None:
        body["note"] = note
    moved = ApiClient(url, token=token).post(f"{_model_path(name)}/versions/{version}/stage", body)
    click.echo(f"{moved['model']} version {moved['version']} is in {moved['stage']}.")
