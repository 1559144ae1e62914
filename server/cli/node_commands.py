"""Operator commands for worker nodes: `trainyard worker cordon|drain|uncordon|clear NODE`.

Like `trainyard user`, they write the database directly (shared/worker_nodes.py), so
they run wherever the database is reachable (a worker host is such a place), with no
API token; the web's admin API and the workers page do the same through HTTP. The
worker polls its node's row (worker/node_control.py): a change takes effect within a
few seconds, and survives the worker's restart under the same `--name`.

Imports of SQLAlchemy and shared.* are inside the commands: this module is loaded by
every `trainyard` run.
"""

from __future__ import annotations

import getpass

import click

from server.cli.account_commands import CommandError, account_command
from server.cli.settings import cli_settings

_DONE = {
    "cordon": "cordoned: it takes no new jobs; the jobs it runs go on",
    "drain": "draining: it takes no new jobs and its running jobs finish",
    "drain_now": (
        "drained now: its running jobs checkpoint and go back to the queue within a "
        "heartbeat; it takes no new jobs"
    ),
    "uncordon": "uncordoned: it takes jobs again",
}


def _who() -> str:
    try:
        return f"{getpass.getuser()} (cli)"
    except Exception:  # noqa: BLE001 - no user name in a bare container
        return "cli"


def _database_url() -> str:
    # Not upgraded here, unlike `trainyard user`: these run on worker hosts too, which
    # must not migrate the schema under the web (`trainyard db upgrade` does that).
    return cli_settings().resolved_database_url


def _control(node: str, action: str) -> None:
    from shared.db import transaction
    from shared.worker_nodes import check_node_name, set_control

    try:
        node = check_node_name(node)
    except ValueError as exc:
        raise CommandError("node", str(exc)) from None
    with transaction(_database_url()) as session:
        set_control(session, node, action, _who())  # type: ignore[arg-type]
    click.echo(f"Node {node} {_DONE[action]}.")


@click.command("cordon")
@click.argument("node")
@account_command
def cordon(node: str) -> None:
    """Stop NODE (a Celery node name, as the workers page shows it) taking new jobs."""
    _control(node, "cordon")


@click.command("drain")
@click.argument("node")
@click.option(
    "--now",
    is_flag=True,
    help="Hand running jobs back with a checkpoint (they resume elsewhere) instead of "
    "letting them finish.",
)
@account_command
def drain(node: str, now: bool) -> None:
    """Cordon NODE and let its running jobs finish (or, with --now, hand them back)."""
    _control(node, "drain_now" if now else "drain")


@click.command("uncordon")
@click.argument("node")
@account_command
def uncordon(node: str) -> None:
    """Undo cordon and drain: NODE takes jobs again."""
    _control(node, "uncordon")


@click.command("clear")
@click.argument("node")
@account_command
def clear(node: str) -> None:
    """Clear NODE's crash guard: its stopped slots take jobs again."""
    from shared.db import transaction
    from shared.worker_nodes import check_node_name, clear_guard

    try:
        node = check_node_name(node)
    except ValueError as exc:
        raise CommandError("node", str(exc)) from None
    with transaction(_database_url()) as session:
        stopped = clear_guard(session, node)
    if stopped:
        click.echo(f"Node {node}: crash guard cleared; {stopped} stopped slot(s) take jobs again.")
    else:
        click.echo(f"Node {node}: no slot was stopped; its counts start afresh.")


NODE_COMMANDS = (cordon, drain, uncordon, clear)
