"""What the job page shows, computed from a Job row: progress, timeline, results,
confusion matrix, artifacts. Plain data for the template (server/templates/job.html);
no request handling here, so each piece is easy to test and to reuse.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.timeline_api import event_label
from shared.job_events import EVENT_KINDS
from shared.job_states import FINISHED_STATES, is_finished
from shared.metric_catalog import (
    AFTER,
    BEFORE,
    BEST_EPOCH,
    BEST_METRIC,
    BEST_METRIC_VALUE,
    METRICS,
    direction,
    finite_number,
    key_metric,
    metric_info,
    sort_key,
)
from shared.orm import Job, JobEvent

# Larger matrices are summarised (per-class table only): a 1000 x 1000 table helps nobody.
MAX_MATRIX_CLASSES = 50
HEAT_LEVELS = 10

# kind -> tone, for the timeline marker (the label says the same in words).
EVENT_TONES = {
    "submitted": "info",
    "claimed": "info",
    "resumed": "info",
    "requeued": "warn",
    "handed_back": "warn",
    "republished": "warn",
    "cancel_requested": "warn",
    "succeeded": "ok",
    "failed": "bad",
    "cancelled": "warn",
}


def is_final(job: Job) -> bool:
    return is_finished(job.state)


def file_size(n: int) -> str:
    """1.2 MB, 340 KB, 12 B."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # unreachable


# ---------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    fraction: float | None  # None: nothing to measure yet (queued)
    epoch: int | None
    epochs: int | None
    step: int | None
    steps_total: int | None
    samples_per_s: float | None
    eta_s: float | None


def progress_of(job: Job) -> Progress:
    p = job.progress or {}
    fraction = finite_number(p.get("fraction"))
    if job.state == "succeeded":
        fraction = 1.0
    elif fraction is None and job.state == "running":
        fraction = 0.0
    final = is_final(job)
    return Progress(
        fraction=None if fraction is None else min(max(fraction, 0.0), 1.0),
        epoch=p.get("epoch"),
        epochs=p.get("epochs") or (job.spec or {}).get("epochs"),
        step=p.get("step"),
        steps_total=p.get("steps_total"),
        # Speed and ETA describe a running job; a finished one has neither.
        samples_per_s=None if final else finite_number(p.get("samples_per_s")),
        eta_s=None if final else finite_number(p.get("eta_s")),
    )


# ---------------------------------------------------------------- timeline


@dataclass(frozen=True)
class TimelineEntry:
    kind: str
    label: str
    at: datetime
    tone: str
    id: int | None = None
    attempt: int | None = None
    worker: str | None = None
    message: str | None = None


def timeline(job: Job, events: list[JobEvent]) -> list[TimelineEntry]:
    """Submitted, then each recorded event; a finish with no event of its own (rows
    from before the timeline existed) comes from finished_at."""
    where = f"{job.queue} queue, priority {job.priority}"
    if job.source_job_id:
        where = f"scores job #{job.source_job_id}; {where}"
    entries = [TimelineEntry("submitted", "submitted", job.created_at, "info", message=where)]
    for e in events:
        entries.append(
            TimelineEntry(
                e.kind,
                event_label(e.kind),
                e.at,
                EVENT_TONES.get(e.kind, "info"),
                id=e.id,
                attempt=e.attempt,
                worker=e.worker,
                message=e.message,
            )
        )
    finished_kinds = {e.kind for e in events} & FINISHED_STATES
    if is_final(job) and job.finished_at is not None and not finished_kinds:
        message = job.error_message
        if job.error_type:
            message = f"{job.error_type}: {message}"
        entries.append(
            TimelineEntry(
                job.state,
                EVENT_KINDS.get(job.state, job.state),
                job.finished_at,
                EVENT_TONES.get(job.state, "info"),
                message=message,
            )
        )
    return entries


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Figure:
    """A headline number: label, formatted value, and what it is for (a hint)."""

    label: str
    value: Any
    hint: str = ""


@dataclass(frozen=True)
class HeatCell:
    count: int
    level: int  # 0 (none) .. HEAT_LEVELS - 1 (the whole row)
    share: float  # of the row (the true class)
    diagonal: bool


@dataclass
class ConfusionMatrix:
    labels: list[str]
    rows: list[tuple[str, list[HeatCell], int]] = field(default_factory=list)


def confusion_matrix(matrix: Any, class_names: Any = None) -> ConfusionMatrix | None:
    """Cells shaded by their share of the row, so a rare class reads as clearly as a
    common one; the count is always the cell's text."""
    if not isinstance(matrix, list) or not matrix or len(matrix) > MAX_MATRIX_CLASSES:
        return None
    k = len(matrix)
    if not all(isinstance(r, list) and len(r) == k for r in matrix):
        return None
    names = class_names if isinstance(class_names, list) and len(class_names) == k else None
    labels = [class_label(i, names) for i in range(k)]
    view = ConfusionMatrix(labels=labels)
    for i, row in enumerate(matrix):
        counts = [int(c) if isinstance(c, (int, float)) else 0 for c in row]
        total = sum(counts)
        cells = []
        for j, count in enumerate(counts):
            share = count / total if total else 0.0
            level = 0 if count == 0 else 1 + min(HEAT_LEVELS - 2, int(share * (HEAT_LEVELS - 1)))
            cells.append(HeatCell(count, level, share, i == j))
        view.rows.append((labels[i], cells, total))
    return view


# A train job's result leads with this many figures; an evaluation's shows all its scores.
TRAIN_FIGURES = 3
SCRIPT_FIGURES = 6


def scalar_items(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The scalar entries in display order (shared/metric_catalog.py)."""
    scalars = [
        (k, v) for k, v in metrics.items() if v is None or isinstance(v, (int, float, str, bool))
    ]
    return sorted(scalars, key=lambda item: sort_key(item[0]))


def headline(kind: str, metrics: dict[str, Any]) -> list[str]:
    """The quality metrics a result leads with: the key metric (the number the jobs
    table shows), then the job kind's other scores and losses in display order."""
    first = key_metric(kind, metrics)
    keys = [
        m.key
        for m in METRICS.values()
        if m.direction is not None and m.series != "step" and m.kind == kind and m.key in metrics
    ]
    if kind == "script":
        # Its own names: every score or loss it reported (the direction is read from
        # the name, shared/metric_catalog.py), in display order.
        scored = [k for k, v in scalar_items(metrics) if direction(k) and not isinstance(v, str)]
        keys = scored[:SCRIPT_FIGURES]
    if first is not None:
        keys = [first[0]] + [k for k in keys if k != first[0]]
    return keys if kind in ("evaluate", "script") else keys[:TRAIN_FIGURES]


def class_label(index: Any, names: Any) -> str:
    """A class's name when the result has names (`class_names`), else its index."""
    if isinstance(names, list) and isinstance(index, int) and 0 <= index < len(names):
        return str(names[index])
    return str(index)


@dataclass(frozen=True)
class Compared:
    """One measure of a derived model next to its source's: size, latency, accuracy."""

    key: str  # the measure, e.g. size_bytes
    before: Any
    after: Any
    change: str  # "-74.8%", "" when not comparable


@dataclass
class Results:
    figures: list[Figure]
    items: list[tuple[str, Any]]  # everything else, for the details table
    per_class: list[dict[str, Any]]
    matrix: ConfusionMatrix | None
    matrix_classes: int  # classes in the stored matrix (to say why it is not drawn)
    compared: list[Compared] = field(default_factory=list)


DERIVED_KINDS = ("prune", "quantize", "export")


def before_after(metrics: dict[str, Any]) -> list[Compared]:
    """The `before_X` / `after_X` pairs a prune, quantize or export job reports (worker/
    training/derive.py), side by side, in the order the job reported them."""
    rows = []
    for key, before in metrics.items():
        if not key.startswith(BEFORE):
            continue
        name = key.removeprefix(BEFORE)
        after = metrics.get(f"{AFTER}{name}")
        change = ""
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after)
        )
        if numbers and before:
            change = f"{(after - before) / abs(before):+.1%}"
        rows.append(Compared(name, before, after, change))
    return rows


def results(job: Job) -> Results | None:
    metrics = (job.result or {}).get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return None
    leading = headline(job.kind, metrics)
    figures = [Figure(k, metrics[k], metric_info(k).hint) for k in leading]
    if job.kind in ("evaluate", "script"):
        # A script may report evaluation-style results (per_class, confusion_matrix,
        # class_names): they are drawn the same way.
        items = [(k, v) for k, v in scalar_items(metrics) if k not in leading]
        raw_matrix = metrics.get("confusion_matrix")
        per_class = metrics.get("per_class")
        names = metrics.get("class_names")
        rows = per_class if isinstance(per_class, list) else []
        classes = [
            {**r, "label": class_label(r.get("class"), names)} for r in rows if isinstance(r, dict)
        ]
        return Results(
            figures=figures,
            items=items,
            per_class=classes,
            matrix=confusion_matrix(raw_matrix, names),
            matrix_classes=len(raw_matrix) if isinstance(raw_matrix, list) else 0,
        )
    if job.kind in DERIVED_KINDS:
        compared = before_after(metrics)
        paired = {f"{p}{c.key}" for c in compared for p in (BEFORE, AFTER)}
        items = [(k, v) for k, v in scalar_items(metrics) if k not in paired]
        return Results(figures=[], items=items, per_class=[], matrix=None, matrix_classes=0,
                       compared=compared)  # fmt: skip
    if metrics.get(BEST_METRIC) and metrics.get(BEST_EPOCH) is not None:
        figures.append(
            Figure(
                f"best {metrics[BEST_METRIC]}",
                metrics.get(BEST_METRIC_VALUE),
                f"epoch {metrics[BEST_EPOCH]}",
            )
        )
    items = scalar_items(metrics)
    return Results(figures=figures, items=items, per_class=[], matrix=None, matrix_classes=0)


# ---------------------------------------------------------------- spec


def spec_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, ensure_ascii=False)


def spec_summary(job: Job) -> list[tuple[str, str]]:
    """A few facts from the spec, in words, above the full JSON."""
    spec = job.spec or {}
    out: list[tuple[str, str]] = []
    if job.kind == "train":
        model = spec.get("model") or {}
        params = model.get("params") or {}
        if params:
            out.append(("model params", ", ".join(f"{k}={v}" for k, v in params.items())))
        opt = spec.get("optimizer") or {}
        if opt:
            extras = [f"lr={opt['lr']}"] if "lr" in opt else []
            extras += [f"weight decay={opt['weight_decay']}"] if opt.get("weight_decay") else []
            out.append(("optimizer", " ".join([str(opt.get("name", "?"))] + extras)))
        schedule = spec.get("schedule") or {}
        if schedule.get("name"):
            out.append(("schedule", str(schedule["name"])))
        for key, label in (("epochs", "epochs"), ("batch_size", "batch size"), ("seed", "seed")):
            if spec.get(key) is not None:
                out.append((label, str(spec[key])))
    elif job.kind == "script":
        out.append(("code", f"bundle {spec.get('bundle_id', '?')}, entry {spec.get('entry', '?')}"))
        args = spec.get("args") or []
        if args:
            out.append(("arguments", shlex.join(str(a) for a in args)))
        params = spec.get("params") or {}
        if params:
            out.append(("params", json.dumps(params, ensure_ascii=False)[:500]))
        dataset = spec.get("dataset") or {}
        if dataset.get("name"):
            out.append(("dataset", str(dataset["name"])))
        if (spec.get("resources") or {}).get("memory_gb"):
            out.append(("memory limit", f"{spec['resources']['memory_gb']:g} GB"))
    elif job.kind in DERIVED_KINDS:
        out.append(("checkpoint", str(spec.get("checkpoint", "best"))))
        if job.kind == "prune":
            how = "structured (conv channels)" if spec.get("structured") else "unstructured"
            out.append(("sparsity", f"{spec.get('sparsity')} {spec.get('scope', 'global')}, {how}"))
            if spec.get("fine_tune_epochs"):
                out.append(("fine-tuning", f"{spec['fine_tune_epochs']} epochs"))
        elif job.kind == "quantize":
            out.append(("method", str(spec.get("method", "dynamic_int8"))))
        else:
            out.append(("formats", ", ".join(map(str, spec.get("formats") or []))))
            out.append(("tolerance", str(spec.get("tolerance"))))
    else:
        dataset = spec.get("dataset") or {}
        out.append(("checkpoint", str(spec.get("checkpoint", "best"))))
        out.append(("split", str(dataset.get("split", "test"))))
        if dataset.get("name"):
            out.append(("dataset", str(dataset["name"])))
    resources = spec.get("resources") or {}
    if resources.get("gpus"):
        out.append(("GPUs", str(resources["gpus"])))
    if (resources.get("processes") or 1) > 1:
        out.append(("processes", f"{resources['processes']} (CPU data-parallel)"))
    tags = spec.get("tags") or []
    if tags:
        out.append(("tags", ", ".join(map(str, tags))))
    return out
