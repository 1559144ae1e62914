"""Creating jobs: the one path for the API, the submit form, retry and evaluate.

Checks an evaluate job's source, applies the per-user limits, stores the row (owner,
denormalised model/dataset names), commits, and only then enqueues (docs/architecture.md, "Reliability" R1).
Problems are ApiErrors naming the field, so the API answers them as they are and the
web forms show them next to the field.
"""

from __future__ import annotations

from typing import Any

from flask import current_app
from sqlalchemy import select

from server.access import find_visible_job
from server.auth import Principal, submit_limits
from server.catalog import catalog_context
from server.database import get_session
from server.enqueue import enqueue_job
from server.errors import ApiError
from shared.dataset_catalog import resolve_dataset
from shared.job_states import JobState, is_finished
from shared.orm import Job, JobTag
from shared.schema_base import CatalogError
from shared.spec import (
    EvaluateSpec,
    SpecError,
    TrainSpec,
    eval_dataset_params,
    load_stored_spec,
    parse_spec,
    resolve_train_dataset,
    spec_to_json,
)


def invalid(fields: dict[str, str]) -> ApiError:
    return ApiError(422, "invalid_spec", "invalid job spec", fields)


def parse_job_spec(data: Any) -> TrainSpec | EvaluateSpec:
    """A JobSpec from JSON-like data, checked against the catalogs; 422 naming fields."""
    try:
        return parse_spec(data, catalog_context())
    except SpecError as exc:
        raise invalid(exc.fields) from None


def check_evaluate_source(spec: EvaluateSpec) -> Job:
    """An evaluate job must name a succeeded train job, and a dataset its model can take."""
    field = "source_job_id"
    # Someone else's job reads as missing here too.
    source = find_visible_job(spec.source_job_id)
    if source is None:
        raise invalid({field: f"job {spec.source_job_id} does not exist"})
    if source.kind != "train":
        raise invalid({field: f"job {source.id} is an {source.kind} job, not a train job"})
    if source.state != JobState.SUCCEEDED.value or not source.checkpoint_path:
        raise invalid(
            {
                field: f"job {source.id} is {source.state}; only succeeded train jobs can be evaluated"
            }
        )
    source_spec = load_stored_spec(source.spec)
    assert isinstance(source_spec, TrainSpec)
    ctx = catalog_context()
    try:
        trained_on = resolve_train_dataset(source_spec, ctx)
        name, params = eval_dataset_params(spec, source_spec)
        scored_on = resolve_dataset(name, params, ctx)
    except CatalogError as exc:
        raise invalid({exc.field: exc.message}) from None
    except SpecError as exc:
        raise invalid(exc.fields) from None
    problem = scored_on.compatible_with(trained_on)
    if problem:
        raise invalid({"dataset.name": f"{problem} (job {source.id})"})
    return source


def build_job(
    spec: TrainSpec | EvaluateSpec, user: Principal, idempotency_key: str | None = None
) -> Job:
    """The (unsaved) row for a validated spec, after the source check and the limits."""
    source = check_evaluate_source(spec) if isinstance(spec, EvaluateSpec) else None
    submit_limits().check(user)
    if isinstance(spec, TrainSpec):
        model_name, dataset_name = spec.model.name, spec.dataset.name
    else:
        assert source is not None
        model_name = source.model_name
        dataset_name = spec.dataset.name or source.dataset_name
    return Job(
        kind=spec.kind,
        name=spec.name,
        state=JobState.QUEUED.value,
        queue=spec.queue,
        priority=spec.priority,
        spec=spec_to_json(spec),
        model_name=model_name,
        dataset_name=dataset_name,
        source_job_id=source.id if source else None,
        max_attempts=current_app.config["TRAINYARD_SETTINGS"].max_attempts,
        idempotency_key=idempotency_key,
        owner_id=user.id,
        # dict.fromkeys: a spec may repeat a tag; the (job_id, tag) key takes it once.
        tag_rows=[JobTag(tag=tag) for tag in dict.fromkeys(spec.tags)],
    )


def store_and_enqueue(job: Job) -> Job:
    """Commit the row, then publish its task. Raises IntegrityError on a key race."""
    session = get_session()
    session.add(job)
    # Commit before enqueue: a worker that picks the task up at once must find the row.
    session.commit()
    enqueue_job(job)
    return job


def submit(spec: TrainSpec | EvaluateSpec, user: Principal) -> Job:
    """Validate-then-store for callers without an idempotency key (forms, retry)."""
    return store_and_enqueue(build_job(spec, user))


def retry(original: Job, user: Principal) -> Job:
    """A new job with a finished job's spec, owned by whoever asked.

    The spec is parsed again: the catalogs may have changed since (a deleted upload).
    """
    if not is_finished(original.state):
        raise ApiError(
            409,
            "not_finished",
            f"job {original.id} is {original.state}; only finished jobs can be retried",
            {"state": original.state},
        )
    return submit(parse_job_spec(original.spec), user)


def job_by_idempotency_key(owner_id: int, key: str) -> Job | None:
    """The owner's job created with `key`. Keys are scoped per user: nobody can find,
    probe or squat another user's key."""
    return (
        get_session()
        .scalars(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key))
        .one_or_none()
    )
