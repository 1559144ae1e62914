"""How jobs look in the terminal: rich markup, tables and progress text.

Everything the server sends is escaped before it reaches rich: "[cuda error]" in a
message or "[eval] digits" in a name is text, not markup.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timezone
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared import metric_catalog
from shared.job_states import FINISHED_STATES

STATE_STYLES = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def make_console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # Piped into grep or a file: 80 columns would wrap the table mid-word.
        console = Console(highlight=False, width=160)
    return console


def print_listing(
    body: dict[str, Any],
    key: str,
    *,
    as_json: bool,
    empty: str,
    columns: Sequence[str],
    wrap: Collection[str],
    row: Callable[[dict[str, Any]], Sequence[str]],
) -> None:
    """What a `list` command prints: the raw API answer with --json; else `empty`, or a
    table with one row per item of body[key] (`row` escapes what the server sent; only
    the columns in `wrap` may wrap)."""
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    console = make_console()
    if not body[key]:
        console.print(empty)
        return
    table = Table(header_style="bold")
    for column in columns:
        table.add_column(column, no_wrap=column not in wrap)
    for item in body[key]:
        table.add_row(*row(item))
    console.print(table)


def fmt_bytes(n: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the settings' byte limits are written)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def state_text(state: str) -> str:
    return f"[{STATE_STYLES.get(state, 'white')}]{escape(state)}[/]"


def progress_text(progress: dict[str, Any] | None) -> str:
    """'epoch 3/10 · step 120/500 · 1,234 samples/s · ETA 1:23' from a job's progress."""
    if not progress:
        return ""
    parts = []
    if progress.get("epoch") is not None:
        epochs = progress.get("epochs")
        parts.append(
            f"epoch {progress['epoch']}/{epochs}" if epochs else f"epoch {progress['epoch']}"
        )
    if progress.get("step") is not None:
        total = progress.get("steps_total")
        parts.append(
            f"step {progress['step']:,}/{total:,}" if total else f"step {progress['step']:,}"
        )
    if progress.get("samples_per_s"):
        parts.append(f"{progress['samples_per_s']:,.0f} samples/s")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {_fmt_duration(progress['eta_s'])}")
    return " · ".join(parts)


def progress_fraction(progress: dict[str, Any] | None) -> float | None:
    """How far along a job is, 0..1, or None when its progress does not say."""
    if not progress:
        return None
    if progress.get("fraction") is not None:
        return min(1.0, max(0.0, float(progress["fraction"])))
    if progress.get("steps_total") and progress.get("step") is not None:
        return min(1.0, progress["step"] / progress["steps_total"])
    if progress.get("epochs") and progress.get("epoch") is not None:
        return min(1.0, progress["epoch"] / progress["epochs"])
    return None


def key_metric(job: dict[str, Any]) -> str:
    """The `key metric` cell of `trainyard jobs`: a running job's progress, else the key
    metric the web's jobs page shows (shared/metric_catalog.py's rule), else the error."""
    if job.get("state") == "running" and job.get("progress"):
        frac = progress_fraction(job["progress"])
        text = progress_text({k: job["progress"].get(k) for k in ("epoch", "epochs")})
        return f"{text} ({frac:.0%})" if frac is not None and text else text
    result = job.get("result")
    metrics = result.get("metrics") if isinstance(result, dict) else None
    found = metric_catalog.key_metric(str(job.get("kind")), metrics)
    if found is not None:
        return f"{escape(found[0])} {_fmt_number(found[1])}"
    if job.get("error"):
        return f"[red]{escape(str(job['error'].get('type') or 'error'))}[/]"
    return ""


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """One row per job, as `trainyard jobs` prints them."""
    table = Table(header_style="bold")
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("name")
    table.add_column("state", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("dataset", no_wrap=True)
    table.add_column("key metric")
    table.add_column("created (UTC)", no_wrap=True)
    for job in jobs:
        table.add_row(
            str(job.get("id")),
            escape(str(job.get("kind"))),
            escape(job.get("name") or "-"),
            state_text(str(job.get("state"))),
            _name_of(job, "model"),
            _name_of(job, "dataset"),
            key_metric(job),
            _fmt_time(job.get("created_at")),
        )
    return table


def print_outcome(console: Console, job: dict[str, Any]) -> None:
    """The end of a watch: final state, how long it took, then its metrics or error."""
    state = job.get("state")
    took = _elapsed(job.get("started_at"), job.get("finished_at"))
    suffix = f" after {_fmt_duration(took)}" if took is not None else ""
    console.print(f"Job {job['id']} {state_text(str(state))}{suffix}")
    metrics = (job.get("result") or {}).get("metrics")
    if metrics:
        console.print(_metrics_table(metrics))
    error = job.get("error")
    if error:
        console.print(_error_text(error))


def print_job(console: Console, job: dict[str, Any]) -> None:
    """Everything about one job, as `trainyard show` prints it."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    state = state_text(str(job.get("state")))
    if job.get("cancel_requested") and job.get("state") not in FINISHED_STATES:
        state += " (cancel requested)"
    rows: list[tuple[str, str]] = [
        ("id", str(job.get("id"))),
        ("name", escape(job.get("name") or "-")),
        ("kind", escape(str(job.get("kind")))),
        ("state", state),
        ("queue", escape(f"{job.get('queue')} (priority {job.get('priority')})")),
        ("model", _name_of(job, "model")),
        ("dataset", _name_of(job, "dataset")),
    ]
    if job.get("tags"):
        rows.append(("tags", escape(", ".join(job["tags"]))))
    if job.get("source_job_id"):
        rows.append(("source job", str(job["source_job_id"])))
    rows += [
        ("attempt", f"{job.get('attempt')}/{job.get('max_attempts')}"),
        ("worker", escape(job.get("worker") or "-")),
        ("created", _fmt_time(job.get("created_at")) + " UTC"),
        ("started", _fmt_time(job.get("started_at"))),
        ("finished", _fmt_time(job.get("finished_at"))),
    ]
    took = _elapsed(job.get("started_at"), job.get("finished_at"))
    if took is not None:
        rows.append(("duration", _fmt_duration(took)))
    if job.get("state") == "running" and job.get("progress"):
        frac = progress_fraction(job["progress"])
        pct = f" ({frac:.0%})" if frac is not None else ""
        rows.append(("progress", progress_text(job["progress"]) + pct))
    error = job.get("error")
    if error:
        rows.append(("error", _error_text(error)))
        if error.get("detail"):  # admins only: the full message and the traceback
            rows.append(("detail", escape(str(error["detail"]))))
    for key, value in rows:
        grid.add_row(key, value)
    console.print(grid)
    metrics = (job.get("result") or {}).get("metrics")
    if metrics:
        console.print("\n[bold]result metrics[/]")
        console.print(_metrics_table(metrics))
    if job.get("spec"):
        console.print("\n[bold]spec[/]")
        console.print(json.dumps(job["spec"], indent=2), markup=False, highlight=False)


def _error_text(error: dict[str, Any]) -> str:
    return f"[red]{escape(str(error.get('type') or 'Error'))}[/]: {escape(str(error.get('message') or ''))}"


def _metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
    table.add_column("metric")
    table.add_column("value", justify="right")
    # The order the web's job page lists them in.
    for key in sorted(metrics, key=metric_catalog.sort_key):
        value = metrics[key]
        if isinstance(value, list) and value and isinstance(value[0], list):
            # A confusion matrix: one row per line, aligned, rather than one long JSON line.
            width = max(len(str(x)) for row in value for x in row)
            lines = "\n".join(" ".join(str(x).rjust(width) for x in row) for row in value)
            table.add_row(escape(key), lines)
        else:
            table.add_row(escape(key), escape(_fmt_number(value)))
    return table


def _name_of(job: dict[str, Any], field: str) -> str:
    value = job.get(field)
    if isinstance(value, dict):
        value = value.get("name")
    if not value:
        # An evaluate job may not name its dataset; the spec may still say more.
        spec_value = (job.get("spec") or {}).get(field)
        value = spec_value.get("name") if isinstance(spec_value, dict) else spec_value
    return escape(str(value)) if value else "-"


def _fmt_number(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _fmt_time(iso: str | None) -> str:
    """API timestamps are ISO-8601 UTC ('...Z'); shown to the second, still UTC."""
    if not iso:
        return "-"
    try:
        ts = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _elapsed(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (b - a).total_seconds()
