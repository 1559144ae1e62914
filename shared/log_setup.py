"""How every Trainyard process logs: text for people, or one JSON object a line for a log
pipeline (TRAINYARD_LOG_FORMAT=json; python-json-logger).

A JSON line has `time` (ISO 8601, UTC), `level`, `logger`, `process` (web, worker,
reconciler, serve, ...), `message`, and on every line about a job its `job_id` and,
once a worker claimed it, `attempt`; a traceback goes in `exc_info`.

Where the job comes from: a worker slot runs one job at a time, so while it runs one
(`job_context`, worker/runner.py) every line of that process carries it, the lease
and metric-sink threads' too; code that speaks of many jobs (the reconciler, the web)
names the job on the line itself with `extra=job_fields(job_id, attempt)`. Celery's
own lines about a task ("received", "succeeded in") name its job too.
"""

from __future__ import annotations

import ast
import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

LogFormat = Literal["text", "json"]

_lock = threading.Lock()
# (job_id, attempt) of the job this process works on now; None: none or several.
_current: tuple[int, int | None] | None = None


def job_fields(job_id: int, attempt: int | None = None) -> dict[str, Any]:
    """`extra=` for a log call about one job, in a process that handles many."""
    return {"job_id": job_id} if attempt is None else {"job_id": job_id, "attempt": attempt}


@contextmanager
def job_context(job_id: int, attempt: int | None) -> Iterator[None]:
    """Every log line of this process names the job until the block ends."""
    global _current
    with _lock:
        previous, _current = _current, (job_id, attempt)
    try:
        yield
    finally:
        with _lock:
            _current = previous


class JobFields(logging.Filter):
    """Adds job_id/attempt of the current job to records that do not name one, and the
    job id to Celery's own lines about a Trainyard task."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is not None:
            return True
        current = _current
        if current is not None:
            # As logging itself adds `extra` fields: into the record's attributes.
            record.__dict__.update(job_fields(*current))
        else:
            job_id = celery_task_job(record)
            if job_id is not None:
                record.__dict__.update(job_fields(job_id))
        return True


def celery_task_job(record: logging.LogRecord) -> int | None:
    """The job a Celery line is about ("Task trainyard.train[...] received", "...
    succeeded in 2.1s"): Celery hands such lines the task's context as `record.data`,
    and a Trainyard task's one argument is its job id (shared/celery_app.py). These lines
    come from the worker's main process, or after the job's own context ended, so they
    have no attempt."""
    data = getattr(record, "data", None)
    if not isinstance(data, dict) or not isinstance(data.get("args"), str):
        return None
    from shared.celery_app import TASK_NAMES  # Celery is loaded already: it logged this

    if data.get("name") not in TASK_NAMES.values():
        return None
    try:
        args = ast.literal_eval(data["args"])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(args, list | tuple) and len(args) == 1 and type(args[0]) is int:
        return args[0]
    return None


def formatter(log_format: LogFormat, process: str) -> logging.Formatter:
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"process": process},
            datefmt="%Y-%m-%dT%H:%M:%S%z",
        )
    return _TextFormatter(f"%(asctime)s [{process}] %(levelname)s %(name)s: %(message)s")


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job = getattr(record, "job_id", None)
        if job is None:
            return text
        attempt = getattr(record, "attempt", None)
        return f"{text} [job {job}" + (f" attempt {attempt}]" if attempt is not None else "]")


def configure_logging(
    log_format: LogFormat, process: str, level: int | str = logging.INFO
) -> logging.Handler:
    """One handler on the root logger, to stderr, replacing any earlier one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, process))
    handler.addFilter(JobFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def gunicorn_logconfig(process: str) -> dict[str, Any]:
    """gunicorn's own loggers (its start, its workers' boots and deaths) as JSON lines,
    for server/gunicorn_hooks.py's `logconfig_dict`."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": formatter, "log_format": "json", "process": process}},
        "filters": {"job": {"()": JobFields}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["job"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }
