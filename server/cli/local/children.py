"""The processes `trainyard up` runs and keeps running: web, worker, reconciler."""

from __future__ import annotations

import sys

from server.cli.local.supervisor import ChildSpec


def local_children(*, host: str, port: int, env: dict[str, str], gpu: bool) -> list[ChildSpec]:
    """The processes `trainyard up` runs and keeps running."""
    python = sys.executable
    # `python -m server.cli ...` (server/cli/__main__.py) rather than gunicorn/celery
    # directly: each restart goes through the same code path as the production commands
    # and gets a fresh node name.
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
        # Requeues jobs of a worker that died and re-publishes messages Redis lost
        # (docs/architecture.md, R1 and R4); without it such jobs would wait forever.
        ChildSpec("reconciler", [python, "-m", "server.cli", "reconcile"], env),
    ]  # fmt: skip
    return children
