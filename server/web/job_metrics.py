"""Which of a job's final metrics to show, and which way is better, for the jobs table,
the compare page and the leaderboard (static/js/jobs.js repeats `key_metric`)."""

from __future__ import annotations

import math
from typing import Any

from shared.orm import Job

# Scores where more is better; errors and losses (anything with "loss", mse, mae) are
# better lower. Everything else (durations, counts, lr) has no better direction.
_HIGHER = ("accuracy", "precision", "recall", "f1", "r2")
_LOWER = ("loss", "mse", "mae")


def direction(key: str) -> str | None:
    """ "max", "min" or None (not a quality metric) for a metric key."""
    name = key.removeprefix("val_").removeprefix("train_").removeprefix("test_")
    if name in _HIGHER:
        return "max"
    if name in _LOWER or key.endswith("loss"):
        return "min"
    return None


def final_metrics(job: Job) -> dict[str, float]:
    """The numeric scalars of result.metrics (no per-class lists, matrices or names)."""
    metrics = (job.result or {}).get("metrics") or {}
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def key_metric(job: Job) -> tuple[str, float] | None:
    """The one number the jobs table shows: val_accuracy for classification training,
    val_loss for regression; accuracy (else mse) for evaluations."""
    metrics = final_metrics(job)
    keys = ("accuracy", "mse") if job.kind == "evaluate" else ("val_accuracy", "val_loss")
    for key in keys:
        if key in metrics:
            return key, metrics[key]
    return None


def best_index(values: list[Any], key: str) -> set[int]:
    """Positions of the best value(s) among `values` (None: missing) for metric `key`;
    empty when the metric has no better direction or the values do not differ."""
    way = direction(key)
    present = [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float))]
    if way is None or len(present) < 2 or len({v for _, v in present}) == 1:
        return set()  # nothing to tell apart
    best = max(v for _, v in present) if way == "max" else min(v for _, v in present)
    return {i for i, v in present if v == best}
