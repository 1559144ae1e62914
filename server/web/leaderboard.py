"""The leaderboard: per dataset, the best succeeded runs by one metric.

GET /leaderboard?dataset=digits&metric=val_accuracy. The ranking reads job_final_metrics
(a row per final metric of a succeeded job, written by finish_job with the state change)
through its (dataset_name, key, value, job_id) index: the database walks the index in
metric order and stops at the top 20, so no job's result JSON is parsed. Training
metrics (val_*, train_*) rank train jobs, the others (accuracy, mse, ...) evaluation
jobs, as shared/metric_catalog.py says, which also gives each metric's better direction
and label. Members rank their own jobs; admins everyone's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import g, render_template, request
from flask.typing import ResponseReturnValue
from flask_login import login_required
from sqlalchemy import func, select
from sqlalchemy.orm import joinedload

from server.access import visible_jobs
from server.database import get_session
from server.web import bp
from shared.dataset_catalog import DATASETS
from shared.metric_catalog import direction, metric_info, ranked_metrics
from shared.orm import Job, JobMetric

TOP = 20


def metrics_for(dataset: str) -> tuple[str, ...]:
    """The metrics a dataset's jobs report, by its task(s); the first (the train key
    metric) is the default."""
    entry = DATASETS.get(dataset)
    tasks = entry.tasks if entry is not None else ("classification", "regression")
    return ranked_metrics(tasks)


def kind_of(metric: str) -> str:
    """The kind of job that reports `metric`, whose job_final_metrics rows rank."""
    return "evaluate" if metric_info(metric).kind == "evaluate" else "train"


def metric_label(metric: str) -> str:
    info = metric_info(metric)
    return f"{info.label} (evaluations)" if info.kind == "evaluate" else info.label


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


def top_runs(dataset: str, metric: str, limit: int = TOP) -> list[Entry]:
    """The best `limit` runs the user may see, best first: one walk of the
    job_final_metrics index, each row joined to its job for the page's columns."""
    session = get_session()
    value = JobMetric.value
    order = value.desc() if direction(metric) == "max" else value.asc()
    stmt = (
        visible_jobs(
            select(Job, value)
            .join(JobMetric, JobMetric.job_id == Job.id)
            .options(joinedload(Job.owner))
        )
        .where(
            JobMetric.dataset_name == dataset,
            JobMetric.key == metric,
            JobMetric.kind == kind_of(metric),
        )
        # Ties go to the earlier run.
        .order_by(order, JobMetric.job_id)
        .limit(limit)
    )
    ranked = [(job, val) for job, val in session.execute(stmt)]
    source_ids = {j.source_job_id for j, _ in ranked if j.source_job_id}
    sources = (
        {j.id: j for j in session.scalars(visible_jobs(select(Job).where(Job.id.in_(source_ids))))}
        if source_ids
        else {}
    )
    entries = []
    for rank, (job, metric_val) in enumerate(ranked, start=1):
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
    entries = top_runs(choice.dataset, choice.metric) if choice.dataset and choice.metric else []
    metrics = metrics_for(choice.dataset) if choice.dataset else ()
    return render_template(
        "leaderboard.html",
        counts=counts,
        dataset=choice.dataset,
        metric=choice.metric,
        notice=choice.notice,
        metrics=metrics,
        metric_labels={m: metric_label(m) for m in metrics},
        ranks_evaluations=choice.metric is not None and kind_of(choice.metric) == "evaluate",
        direction=direction(choice.metric) if choice.metric else None,
        entries=entries,
        top=TOP,
        is_admin=g.user.is_admin,
    )
