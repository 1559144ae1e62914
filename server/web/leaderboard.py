"""The leaderboard: per dataset, the best succeeded runs by one metric.

GET /leaderboard?dataset=digits&metric=val_accuracy. The metric is read from each job's
result JSON by the database (SQLAlchemy's JSON path: JSON_EXTRACT on SQLite, #>> on
PostgreSQL), which sorts and keeps the top 20; only those rows reach Python. Training
metrics (val_*, train_*) rank train jobs, the others (accuracy, mse, ...) evaluation
jobs. Members rank their own jobs; admins everyone's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, render_template, request
from flask.typing import ResponseReturnValue
from flask_login import login_required
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import joinedload

from server.access import visible_jobs
from server.database import get_session
from server.web import bp
from server.web.job_metrics import direction
from shared.dataset_catalog import DATASETS
from shared.models import Job

TOP = 20
CLASSIFICATION_METRICS = (
    "val_accuracy", "val_f1", "val_loss", "train_loss", "accuracy", "precision", "recall", "f1",
)  # fmt: skip
REGRESSION_METRICS = (
    "val_loss", "val_mse", "val_mae", "val_r2", "train_loss", "mse", "mae", "r2",
)  # fmt: skip
METRIC_LABELS = {
    "val_accuracy": "validation accuracy", "val_f1": "validation F1 (macro)",
    "val_loss": "validation loss", "train_loss": "training loss", "val_mse": "validation MSE",
    "val_mae": "validation MAE", "val_r2": "validation R²", "accuracy": "test accuracy (evaluations)",
    "precision": "precision (evaluations)", "recall": "recall (evaluations)",
    "f1": "F1 (evaluations)", "mse": "MSE (evaluations)", "mae": "MAE (evaluations)",
    "r2": "R² (evaluations)",
}  # fmt: skip


def metrics_for(dataset: str) -> tuple[str, ...]:
    """The metrics a dataset's jobs report, by its task(s); the first is the default."""
    entry = DATASETS.get(dataset)
    tasks = entry.tasks if entry is not None else ("classification", "regression")
    if tasks == ("regression",):
        return REGRESSION_METRICS
    if "regression" in tasks:  # both (csv): every metric, classification's first
        return CLASSIFICATION_METRICS + tuple(
            m for m in REGRESSION_METRICS if m not in CLASSIFICATION_METRICS
        )
    return CLASSIFICATION_METRICS


def kind_of(metric: str) -> str:
    return "train" if metric.startswith(("val_", "train_")) else "evaluate"


def metric_value(metric: str, dialect: str) -> ColumnElement[Any]:
    """result.metrics.<metric> as a number, in SQL."""
    value = Job.result[("metrics", metric)].as_float()
    if dialect == "sqlite":
        # json_extract raises on text that is not JSON (a NaN that Python's json wrote):
        # one such row would fail the whole page, so it counts as having no value.
        value = case((func.json_valid(Job.result) == 1, value))
    return value


@dataclass(frozen=True)
class Entry:
    rank: int
    job: Job
    value: float
    lr: Any
    batch_size: Any
    epochs: Any


def _dataset_counts() -> list[tuple[str, int]]:
    """Datasets with succeeded jobs the user may see, most runs first."""
    n = func.count().label("n")
    stmt = (
        visible_jobs(select(Job.dataset_name, n))
        .where(Job.state == "succeeded", Job.dataset_name.is_not(None))
        .group_by(Job.dataset_name)
        .order_by(n.desc(), Job.dataset_name)
    )
    return [(name, count) for name, count in get_session().execute(stmt)]


def _recipe(job: Job, source: Job | None) -> tuple[Any, Any, Any]:
    """(lr, batch size, epochs) of the run: an evaluation's come from the job it scored."""
    spec = (source.spec if source is not None else None) if job.kind == "evaluate" else job.spec
    if not isinstance(spec, dict):
        return None, None, None
    optimizer = spec.get("optimizer")
    lr = optimizer.get("lr") if isinstance(optimizer, dict) else None
    return lr, spec.get("batch_size"), spec.get("epochs")


class RankingCache:
    """Recent rankings as (job id, value) pairs, each with the count it was computed at.

    Ranking means reading the metric out of the result JSON of every succeeded run of
    the dataset: ~90 ms (SQLite) to ~190 ms (PostgreSQL) for 25k runs. But succeeded is
    a final state and a job's dataset never changes, so the succeeded jobs of a dataset
    only ever grow in number: the count (from an index, which the page reads anyway for
    its dataset list) says whether a stored ranking is still the ranking.
    """

    def __init__(self, size: int = 256):
        self._items: OrderedDict[Hashable, tuple[int, list[tuple[int, float]]]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def get(self, key: Hashable, version: int) -> list[tuple[int, float]] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != version:
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: Hashable, version: int, ranking: list[tuple[int, float]]) -> None:
        with self._lock:
            self._items[key] = (version, ranking)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


RANKINGS = RankingCache()


def ranking(dataset: str, metric: str, limit: int = TOP) -> list[tuple[int, float]]:
    """(job id, value) of the best `limit` runs the user may see, best first, in SQL."""
    session = get_session()
    value = metric_value(metric, session.get_bind().dialect.name).label("value")
    order = value.desc() if direction(metric) == "max" else value.asc()
    stmt = (
        visible_jobs(select(Job.id, value))
        .where(
            Job.state == "succeeded",
            Job.dataset_name == dataset,
            Job.kind == kind_of(metric),
            value.is_not(None),
        )
        # Ties go to the earlier run.
        .order_by(order, Job.id)
        .limit(limit)
    )
    return [(job_id, val) for job_id, val in session.execute(stmt)]


def top_runs(dataset: str, metric: str, runs: int, limit: int = TOP) -> list[Entry]:
    """The leaderboard's rows; `runs`: how many succeeded jobs the user may see on it."""
    scope = "all" if g.user.is_admin else g.user.id
    key = (current_app.config["DATABASE_URL"], scope, dataset, metric, limit)
    ranked = RANKINGS.get(key, runs)
    if ranked is None:
        ranked = ranking(dataset, metric, limit)
        RANKINGS.put(key, runs, ranked)
    if not ranked:
        return []
    session = get_session()
    ids = [job_id for job_id, _ in ranked]
    jobs = {
        j.id: j
        for j in session.scalars(select(Job).where(Job.id.in_(ids)).options(joinedload(Job.owner)))
    }
    source_ids = {j.source_job_id for j in jobs.values() if j.source_job_id}
    sources = (
        {j.id: j for j in session.scalars(visible_jobs(select(Job).where(Job.id.in_(source_ids))))}
        if source_ids
        else {}
    )
    entries = []
    for rank, (job_id, metric_val) in enumerate(ranked, start=1):
        job = jobs[job_id]
        lr, batch_size, epochs = _recipe(job, sources.get(job.source_job_id or 0))
        entries.append(Entry(rank, job, metric_val, lr, batch_size, epochs))
    return entries


@dataclass(frozen=True)
class Choice:
    dataset: str | None
    metric: str | None
    notice: str | None


def _choose(counts: list[tuple[str, int]]) -> Choice:
    names = [name for name, _ in counts]
    dataset = request.args.get("dataset", "").strip() or None
    metric = request.args.get("metric", "").strip() or None
    notice = None
    if dataset is None or (dataset not in names and dataset not in DATASETS):
        if dataset is not None:
            notice = (
                f"There is no dataset {dataset[:64]!r}; showing {names[0] if names else 'none'}."
            )
        dataset = names[0] if names else None
    if dataset is None:
        return Choice(None, None, notice)
    choices = metrics_for(dataset)
    if metric not in choices:
        if metric is not None:
            notice = f"{dataset} runs are not ranked by {metric[:64]!r}; showing {choices[0]}."
        metric = choices[0]
    return Choice(dataset, metric, notice)


@bp.get("/leaderboard")
@login_required
def leaderboard() -> ResponseReturnValue:
    counts = _dataset_counts()
    choice = _choose(counts)
    runs = dict(counts).get(choice.dataset or "", 0)
    entries = (
        top_runs(choice.dataset, choice.metric, runs) if choice.dataset and choice.metric else []
    )
    return render_template(
        "leaderboard.html",
        counts=counts,
        dataset=choice.dataset,
        metric=choice.metric,
        notice=choice.notice,
        metrics=metrics_for(choice.dataset) if choice.dataset else (),
        metric_labels=METRIC_LABELS,
        direction=direction(choice.metric) if choice.metric else None,
        entries=entries,
        top=TOP,
        is_admin=g.user.is_admin,
    )
