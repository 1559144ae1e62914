"""Finished (or running) jobs as database rows, for page tests: no worker, no training."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from shared.db import transaction
from shared.orm import Job, JobMetric, JobTag, MetricPoint
from shared.state_machine import final_metrics

T0 = datetime(2026, 11, 1, 12, 0, 0)


def job_spec(
    name: str | None = None,
    *,
    dataset: str = "digits",
    model: str = "cnn",
    lr: float = 0.003,
    batch_size: int = 32,
    epochs: int = 10,
    tags: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A stored train spec, shaped like spec_to_json's (the fields pages read)."""
    return {
        "kind": "train",
        "name": name,
        "tags": tags or [],
        "dataset": {"name": dataset, "params": {}, "val_fraction": 0.2},
        "model": {"name": model, "params": {"dropout": 0.25}},
        "optimizer": {"name": "adam", "lr": lr},
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": 0,
        "resources": {"gpus": 0},
        "priority": 5,
        **extra,
    }


def add_jobs(db_url: str, rows: list[dict[str, Any]]) -> list[int]:
    """Insert jobs; each dict names `owner` (a user id) and any Job fields to set.

    Defaults: a succeeded train job on digits with the spec above, created a minute
    after the previous one. `tags` (list) sets the spec's tags and the tag rows;
    `metrics` (dict) the result's final metrics (and, for a succeeded job, the
    job_final_metrics rows finish_job would write); `points` ({key: [values]}) metric
    points at steps 1, 2, ...
    """
    ids = []
    with transaction(db_url) as s:
        for i, row in enumerate(rows):
            row = dict(row)
            owner = row.pop("owner")
            tags = row.pop("tags", [])
            metrics = row.pop("metrics", None)
            points = row.pop("points", {})
            kind = row.pop("kind", "train")
            spec = row.pop("spec", None)
            name = row.pop("name", f"job-{i}")
            dataset = row.pop("dataset_name", "digits")
            model = row.pop("model_name", "cnn")
            if spec is None:
                spec = (
                    job_spec(name, dataset=dataset, model=model, tags=tags)
                    if kind == "train"
                    else {"kind": "evaluate", "name": name, "tags": tags,
                          "source_job_id": row.get("source_job_id"),
                          "dataset": {"split": "test"}, "checkpoint": "best"}
                )  # fmt: skip
            created = row.pop("created_at", T0 + timedelta(minutes=i))
            state = row.pop("state", "succeeded")
            finished = created + timedelta(minutes=5) if state in ("succeeded", "failed") else None
            job = Job(
                owner_id=owner,
                kind=kind,
                name=name,
                state=state,
                queue="cpu",
                spec=spec,
                model_name=model,
                dataset_name=dataset,
                attempt=0 if state == "queued" else 1,
                created_at=created,
                started_at=None if state == "queued" else created + timedelta(seconds=2),
                finished_at=finished,
                updated_at=finished or created,
                result={"metrics": metrics} if metrics is not None else None,
                tag_rows=[JobTag(tag=t) for t in dict.fromkeys(tags)],
                **row,
            )
            s.add(job)
            s.flush()
            if state == "succeeded":  # as finish_job writes them with the state change
                for key, value in final_metrics(job.result).items():
                    s.add(JobMetric(job_id=job.id, key=key, value=value,
                                    dataset_name=dataset, kind=kind))  # fmt: skip
            for key, values in points.items():
                for step, value in enumerate(values, start=1):
                    s.add(MetricPoint(job_id=job.id, attempt=1, key=key, step=step,
                                      epoch=step, value=value, wall_time=0.0))  # fmt: skip
            ids.append(job.id)
    return ids
