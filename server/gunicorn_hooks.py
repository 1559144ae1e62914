"""gunicorn server hooks for `trainyard web` (loaded with `-c python:server.gunicorn_hooks`).

They give prometheus-client's multiprocess mode (server/web_metrics.py) what it needs:
a directory for the worker processes' counter files, set before the first worker is
forked and emptied first, so a restarted server does not add the last run's counts to
its own; and the death of each worker process marked, so its live gauges are dropped
(its counters stay counted, as they should).

Runs in gunicorn's master: no Flask, no database here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_OWN_DIR = "TRAINYARD_PROMETHEUS_DIR_IS_OURS"


def on_starting(server: Any) -> None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        # The operator's directory: keep it, empty it.
        os.makedirs(path, exist_ok=True)
        for entry in os.scandir(path):
            if entry.is_file() and entry.name.endswith(".db"):
                os.unlink(entry.path)
    else:
        # One of our own per server, so two servers on a host never mix their counts.
        path = tempfile.mkdtemp(prefix="trainyard-prometheus-")
        os.environ[_OWN_DIR] = path
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        multiprocess.mark_process_dead(worker.pid, path)


def on_exit(server: Any) -> None:
    own = os.environ.get(_OWN_DIR)
    if own:
        shutil.rmtree(own, ignore_errors=True)


# TRAINYARD_LOG_FORMAT=json: gunicorn's own lines (start, worker boots and deaths) as JSON
# too, like the app's (shared/log_setup.py); read from the environment, as gunicorn
# reads this module before any setting is loaded.
if os.environ.get("TRAINYARD_LOG_FORMAT", "").strip().lower() == "json":
    from shared.log_setup import gunicorn_logconfig

    logconfig_dict = gunicorn_logconfig("web")
