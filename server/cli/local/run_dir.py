"""TRAINYARD_HOME/run: the lock that allows one `trainyard up` per home, and its state file.

`run/up.json` records the pids of what `up` started (for people, scripts and the tests,
and for the next `up`): an `up` killed with SIGKILL cannot stop its children, so the
next one reads the file and stops what is left before starting anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from server.cli.local.processes import process_cmdline, wait_gone

log = logging.getLogger(__name__)

RUN_DIR = "run"
STATE_FILE = "up.json"
LOCK_FILE = "up.lock"
# Substrings of a child's command line; a leftover pid is only killed if it matches one.
_CHILD_MARKERS = ("gunicorn", "celery", "server.cli", "trainyard")


@contextlib.contextmanager
def exclusive_home(run_dir: Path) -> Iterator[None]:
    """One `up` per state directory; the lock dies with its process, so no stale lock."""
    import fcntl  # POSIX only, like the process groups `up` relies on

    with open(run_dir / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_state(run_dir).get("pid", "?")
            raise click.ClickException(
                f"another `trainyard up` (pid {other}) is already running with "
                f"TRAINYARD_HOME={run_dir.parent}; stop it first or use another TRAINYARD_HOME"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_state(run_dir: Path) -> dict[str, Any]:
    """The state file's contents; empty if there is none (or it is unreadable)."""
    try:
        return json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace the state file at once, so a reader never sees half of it."""
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(run_dir / STATE_FILE)


def remove_state(run_dir: Path) -> None:
    (run_dir / STATE_FILE).unlink(missing_ok=True)


def stop_leftovers(run_dir: Path) -> None:
    """Stop children an earlier `up` left behind when it was killed without cleaning up.

    Only called while holding the home lock, so that `up` is certainly gone.
    """
    for name, pid in (read_state(run_dir).get("children") or {}).items():
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
    remove_state(run_dir)


def _leads_group(pid: int) -> bool:
    """Our children lead their own process group; a stranger reusing the pid rarely does."""
    try:
        return os.getpgid(pid) == pid
    except (ProcessLookupError, PermissionError):
        return False
