"""The `trainyard` command.

Two kinds of subcommand, each in its own module:

- client commands (`submit`, `jobs`, `show`, `watch`, `cancel`: job_commands; `bundles`:
  bundle_commands; `upload`, `artifacts`: storage_commands; `sweep`: sweep_commands;
  `model`: model_commands; `tensorboard export`: tensorboard_commands; `webhook`:
  webhook_commands) talk to the
  HTTP API only, never to the database, so they work from any machine that can reach
  the server;
- process commands (`web`, `worker`, `reconcile`, `db upgrade`: process_commands;
  `serve`: serve_command; `up`: local mode, the package local/) start the parts of
  Trainyard;
- operator commands (`user`, `token`: account_commands) change accounts in the database
  directly, so they run where the database is reachable; they make the first token.
  `worker cordon|drain|uncordon|clear NODE` (node_commands) likewise act on a worker
  node's row.

The subcommands are registered here rather than with `@main.command()` in their modules,
so no module imports this one and the package has no import cycles.

The web process imports this package too (it is the console script), so nothing here
imports `worker` or torch: the worker command execs Celery in a fresh interpreter.
"""

from __future__ import annotations

import click

from server.cli.account_commands import token_group, user_group
from server.cli.bundle_commands import bundles_group
from server.cli.job_commands import cancel, jobs_command, show, submit, watch
from server.cli.local.up_command import up
from server.cli.model_commands import model_group
from server.cli.node_commands import NODE_COMMANDS
from server.cli.process_commands import db, reconcile, web, worker
from server.cli.serve_command import serve
from server.cli.storage_commands import artifacts_group, upload_group
from server.cli.sweep_commands import sweep_group
from server.cli.tensorboard_commands import tensorboard_group
from server.cli.webhook_commands import webhook_group

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="trainyard", message="%(prog)s %(version)s")
def main() -> None:
    """Trainyard: a job queue for PyTorch training.

    Start everything locally with `trainyard up`, then submit a job with
    `trainyard submit spec.json --watch`.
    """


for _command in (
    submit,
    jobs_command,
    show,
    watch,
    cancel,
    web,
    worker,
    reconcile,
    db,
    up,
    user_group,
    token_group,
    upload_group,
    artifacts_group,
    bundles_group,
    sweep_group,
    model_group,
    tensorboard_group,
    webhook_group,
    serve,
):
    main.add_command(_command)

# `trainyard worker cordon|drain|uncordon|clear NODE`; `trainyard worker` alone starts one.
for _command in NODE_COMMANDS:
    worker.add_command(_command)
