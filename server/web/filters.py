"""Jinja filters and globals shared by the pages: durations, times, metric values."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Flask, request

from shared.db import utcnow
from shared.metric_catalog import catalog_json, finite_number, metric_info


def duration(seconds: float | None) -> str:
    """1.2 s, 42 s, 3 m 05 s, 2 h 14 m: short and readable at a glance."""
    if finite_number(seconds) is None or seconds < 0:
        return "—"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


def job_duration(started: datetime | None, finished: datetime | None) -> str:
    if started is None:
        return "—"
    return duration(((finished or utcnow()) - started).total_seconds())


def ago(ts: datetime | None) -> str:
    """How long ago a naive-UTC timestamp was: "just now", "5 min ago", "3 d ago"."""
    if ts is None:
        return "—"
    seconds = (utcnow() - ts).total_seconds()
    if seconds < 45:
        return "just now"
    if seconds < 3600:
        return f"{round(seconds / 60)} min ago"
    if seconds < 86400:
        return f"{round(seconds / 3600)} h ago"
    return f"{round(seconds / 86400)} d ago"


def utc(ts: datetime | None) -> str:
    return "—" if ts is None else ts.strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_utc(ts: datetime | None) -> str:
    return "" if ts is None else ts.isoformat(timespec="seconds") + "Z"


def metric(value: object) -> str:
    """A metric value with 4 significant digits; counts stay integers."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if finite_number(value) is None:
        return str(value)  # nan, inf: say what it is rather than hide it
    return f"{value:.4g}"


def placement(value: dict[str, Any] | None) -> str:
    """Where a job runs (jobs.placement): "slot 1 · GPU 2 (NVIDIA H200, 141 GiB)".
    server/static/js/job.js's placementText writes the same for a live page."""
    if not value:
        return "—"
    slot = value.get("slot")
    parts = [f"slot {slot}"] if slot is not None else []
    gpus = value.get("gpus") or []
    if not gpus:
        parts.append("CPU")
    for gpu in gpus:
        about = [gpu.get("name")] if gpu.get("name") else []
        if gpu.get("memory_total_bytes"):
            about.append(f"{gpu['memory_total_bytes'] / (1 << 30):.0f} GiB")
        parts.append(f"GPU {gpu.get('index')}" + (f" ({', '.join(about)})" if about else ""))
    return " · ".join(parts)


def nav_active(path: str) -> bool:
    if path == "/":
        return request.path == "/" or request.path.startswith("/jobs")
    return request.path == path or request.path.startswith(path + "/")


def init_app(app: Flask) -> None:
    app.jinja_env.filters.update(
        duration=duration, job_duration=job_duration, ago=ago, utc=utc, iso_utc=iso_utc,
        metric=metric, placement=placement,
    )  # fmt: skip
    # The catalogue for templates (units, hints) and, as a JSON block, for the scripts.
    app.jinja_env.globals.update(
        nav_active=nav_active, metric_info=metric_info, metric_catalog=catalog_json
    )
