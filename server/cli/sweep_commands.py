"""`trainyard sweep create|list|show|cancel|resume`: sweeps over HTTP.

`show --watch` redraws the trials table (sorted by the sweep's metric, parameters as
columns) until the sweep ends.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from server.cli.api_client import ApiClient, api_command
from server.cli.display import make_console, print_listing
from server.cli.job_commands import token_option, url_option

FINAL = {"cancelled", "succeeded", "failed"}
WATCH_EVERY_S = 2.0


@click.group("sweep")
def sweep_group() -> None:
    """Hyperparameter and architecture searches: create, list, show, cancel, resume."""


def _read_spec(path: str) -> Any:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    try:
        # YAML is a superset of JSON: one parser takes both.
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise click.ClickException(f"{path}: not YAML or JSON: {exc}") from None


@sweep_group.command("create")
@click.argument("spec_file", metavar="SPEC_FILE")
@click.option("--watch", "-w", "then_watch", is_flag=True, help="Follow it until it ends.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the sweep id (for scripts).")
@url_option
@token_option
@api_command
def sweep_create(
    spec_file: str, then_watch: bool, quiet: bool, url: str, token: str | None
) -> None:
    """Create the sweep SPEC_FILE describes (YAML or JSON; `-` reads stdin)."""
    client = ApiClient(url, token=token)
    sweep = client.post("/sweeps", _read_spec(spec_file))
    if quiet:
        click.echo(sweep["id"])
        return
    click.echo(
        f"Created sweep {sweep['id']} ({sweep['method']}, up to {sweep['max_trials']} trials, "
        f"{sweep['parallelism']} at a time, {sweep['direction']} {sweep['metric']})"
    )
    if then_watch:
        _watch(client, sweep["id"])


@sweep_group.command("list")
@click.option("--all", "all_users", is_flag=True, help="Every user's sweeps (admins only).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw API answer.")
@url_option
@token_option
@api_command
def sweep_list(all_users: bool, as_json: bool, url: str, token: str | None) -> None:
    """Your sweeps, newest first."""
    body = ApiClient(url, token=token).get("/sweeps", {"all": "true"} if all_users else None)

    def row(s: dict[str, Any]) -> tuple[str, ...]:
        done = sum(s["counts"].get(k, 0) for k in ("succeeded", "pruned", "failed"))
        best = s["best"]
        return (
            str(s["id"]), escape(s["name"] or "-"), s["state"], s["method"],
            f"{done}/{s['max_trials']}",
            "-" if best is None else f"{s['metric']}={best['value']:.4g} (#{best['number']})",
        )  # fmt: skip

    print_listing(
        body, "sweeps", as_json=as_json, empty="No sweeps.",
        columns=("id", "name", "state", "method", "trials", "best"), wrap={"name"}, row=row,
    )  # fmt: skip


def trials_table(sweep: dict[str, Any]) -> Group:
    """The sweep's header line and its trials, best first, parameters as columns."""
    counts = ", ".join(f"{n} {k}" for k, n in sweep["counts"].items() if n)
    head = Text(
        f"sweep {sweep['id']} {sweep['name'] or ''}: {sweep['state']} · {counts or 'no trials yet'}"
    )
    trials = sweep.get("trials") or []
    params = list(dict.fromkeys(p for t in trials for p in t["params"]))
    reverse = sweep["direction"] == "max"
    missing = float("-inf") if reverse else float("inf")
    ordered = sorted(trials, key=lambda t: t["value"] if t["value"] is not None else missing,
                     reverse=reverse)  # fmt: skip
    table = Table(header_style="bold")
    for column in ("#", "job", "state", sweep["metric"], *params, "params", "samples/s"):
        table.add_column(column, no_wrap=True)
    best = (sweep.get("best") or {}).get("number")
    for t in ordered:
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        row = [
            f"{t['number']}{' *' if t['number'] == best else ''}", str(t["job_id"]), t["state"],
            value, *[escape(str(t["params"].get(p, ""))) for p in params],
            "-" if t["num_parameters"] is None else f"{t['num_parameters']:,.0f}",
            "-" if t["samples_per_s"] is None else f"{t['samples_per_s']:,.0f}",
        ]  # fmt: skip
        table.add_row(*row)
    return Group(head, table)


def _watch(client: ApiClient, sweep_id: int) -> dict[str, Any]:
    sweep = client.get(f"/sweeps/{sweep_id}")
    with Live(trials_table(sweep), console=make_console(), auto_refresh=False) as live:
        while sweep["state"] not in FINAL:
            time.sleep(WATCH_EVERY_S)
            sweep = client.get(f"/sweeps/{sweep_id}")
            live.update(trials_table(sweep), refresh=True)
    return sweep


@sweep_group.command("show")
@click.argument("sweep_id", type=int)
@click.option("--watch", "-w", is_flag=True, help="Redraw until the sweep ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw sweep object.")
@url_option
@token_option
@api_command
def sweep_show(sweep_id: int, watch: bool, as_json: bool, url: str, token: str | None) -> None:
    """A sweep's state, counts and trials (best first; * marks the best)."""
    client = ApiClient(url, token=token)
    if watch:
        sweep = _watch(client, sweep_id)
    else:
        sweep = client.get(f"/sweeps/{sweep_id}")
        if as_json:
            click.echo(json.dumps(sweep, indent=2))
            return
        make_console().print(trials_table(sweep))
    if sweep["state"] == "failed":
        raise SystemExit(1)


@sweep_group.command("cancel")
@click.argument("sweep_id", type=int)
@url_option
@token_option
@api_command
def sweep_cancel(sweep_id: int, url: str, token: str | None) -> None:
    """Cancel a sweep: queued trials cancelled, running ones stop."""
    ApiClient(url, token=token).post(f"/sweeps/{sweep_id}/cancel")
    click.echo(f"Sweep {sweep_id} cancelled.")


@sweep_group.command("resume")
@click.argument("sweep_id", type=int)
@url_option
@token_option
@api_command
def sweep_resume(sweep_id: int, url: str, token: str | None) -> None:
    """Resume a cancelled sweep where it stopped."""
    ApiClient(url, token=token).post(f"/sweeps/{sweep_id}/resume")
    click.echo(f"Sweep {sweep_id} resumed.")
