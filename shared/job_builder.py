"""The row of a new job from a validated spec: the one place that fills in its
denormalised columns (model, dataset), its queue and priority, and its tag rows.

Used by server/submission.py (the API, the forms, retry, evaluate) and by the sweep
controller (shared/sweep_controller.py), which creates its trials as ordinary jobs
without a web request. The checks before it (permissions, limits, the evaluate
source) are the callers'.
"""

from __future__ import annotations

from shared.job_states import JobState
from shared.orm import Job, JobTag
from shared.spec import AnySpec, ScriptSpec, TrainSpec, spec_to_json


def new_job(
    spec: AnySpec,
    owner_id: int | None,
    max_attempts: int,
    *,
    source: Job | None = None,
    idempotency_key: str | None = None,
) -> Job:
    """The unsaved, queued row for `spec` (evaluate, prune, quantize and export specs
    need their `source` job)."""
    if isinstance(spec, TrainSpec):
        model_name, dataset_name = spec.model.name, spec.dataset.name
    elif isinstance(spec, ScriptSpec):
        # The model is whatever the script builds; the dataset, if it named one.
        model_name, dataset_name = None, spec.dataset.name if spec.dataset else None
    else:
        assert source is not None, f"a {spec.kind} job needs its source"
        model_name = source.model_name
        dataset = getattr(spec, "dataset", None)  # an evaluation may score other data
        dataset_name = (dataset.name if dataset is not None else None) or source.dataset_name
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
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        owner_id=owner_id,
        # dict.fromkeys: a spec may repeat a tag; the (job_id, tag) key takes it once.
        tag_rows=[JobTag(tag=tag) for tag in dict.fromkeys(spec.tags)],
    )
