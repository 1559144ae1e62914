"""Creating jobs: the one path for the API, the submit form, retry and evaluate.

Checks an evaluate (or prune, quantize, export) job's source, holds the job to its owner's admission limits (the
estimated size and memory, batch, epochs, runtime: shared/limits.py) and fills in the
default max_runtime_s, applies the per-user rate limits, stores the row (owner,
denormalised model/dataset names), commits, and only then enqueues (docs/architecture.md, "Reliability" R1).
Problems are ApiErrors naming the field, so the API answers them as they are and the
web forms show them next to the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask import current_app
from sqlalchemy import select

from server import web_metrics
from server.access import find_visible_bundle, find_visible_job
from server.auth import Principal, submit_limits
from server.catalog import catalog_context
from server.database import get_session
from server.enqueue import enqueue_job
from server.errors import ApiError
from shared.dataset_catalog import resolve_dataset
from shared.job_builder import new_job
from shared.job_estimate import JobEstimate, estimate_derived, estimate_evaluate, estimate_train
from shared.job_states import JobState, is_finished
from shared.limits import SUBMISSION_LIMITS, apply_defaults, check_job, effective_limits
from shared.lineage import MAX_CHAIN, chain_length, root_train_spec
from shared.orm import CodeBundle, Job, User
from shared.schema_base import CatalogError
from shared.spec import (
    DERIVED_SOURCES,
    ENTRY_FILE,
    JOB_KINDS,
    AnySpec,
    DerivedSpec,
    EvaluateSpec,
    ScriptSpec,
    SpecError,
    TrainSpec,
    eval_dataset_params,
    load_stored_spec,
    parse_spec,
    resolve_train_dataset,
)


def invalid(fields: dict[str, str]) -> ApiError:
    return ApiError(422, "invalid_spec", "invalid job spec", fields)


def parse_job_spec(data: Any) -> AnySpec:
    """A JobSpec from JSON-like data, checked against the catalogs; 422 naming fields."""
    try:
        return parse_spec(data, catalog_context())
    except SpecError as exc:
        kind = data.get("kind", "train") if isinstance(data, dict) else None
        web_metrics.count_submission(kind if kind in JOB_KINDS else "unknown", "invalid")
        raise invalid(exc.fields) from None


@contextmanager
def _counted(kind: str) -> Iterator[None]:
    """Count a submission refused on the way (Prometheus: trainyard_submissions_total)."""
    try:
        yield
    except ApiError as exc:
        if exc.code in ("over_limit", "rate_limited"):
            outcome = "limited"
        elif exc.status in (401, 403):
            outcome = "forbidden"
        else:
            outcome = "invalid"
        web_metrics.count_submission(kind, outcome)
        raise


def check_evaluate_source(spec: EvaluateSpec) -> Job:
    """An evaluate job must name a succeeded train job, and a dataset its model can take."""
    field = "source_job_id"
    # Someone else's job reads as missing here too.
    source = find_visible_job(spec.source_job_id)
    if source is None:
        raise invalid({field: f"job {spec.source_job_id} does not exist"})
    if source.kind != "train":
        raise invalid({field: f"job {source.id} is an {source.kind} job, not a train job"})
    if source.artifacts_deleted_at is not None:
        raise invalid({field: f"job {source.id}'s files, its checkpoint among them, were deleted"})
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


def check_derived_source(spec: DerivedSpec) -> Job:
    """A prune, quantize or export job must name a succeeded job of a kind it can read
    (shared/spec.py DERIVED_SOURCES) whose files are still there."""
    field = "source_job_id"
    source = find_visible_job(spec.source_job_id)
    if source is None:
        raise invalid({field: f"job {spec.source_job_id} does not exist"})
    kinds = DERIVED_SOURCES[spec.kind]
    if source.kind not in kinds:
        raise invalid({field: f"job {source.id} is a {source.kind} job; a {spec.kind} job "
                              f"reads a {' or '.join(kinds)} job's model"})  # fmt: skip
    if source.artifacts_deleted_at is not None:
        raise invalid({field: f"job {source.id}'s files, its model among them, were deleted"})
    if source.state != JobState.SUCCEEDED.value or not source.checkpoint_path:
        raise invalid({field: f"job {source.id} is {source.state}; only a succeeded job's "
                              "model can be used"})  # fmt: skip
    session = get_session()
    if root_train_spec(session, source) is None or chain_length(session, source) >= MAX_CHAIN:
        raise invalid({field: f"job {source.id}'s model does not lead back to a train job "
                              f"within {MAX_CHAIN} steps"})  # fmt: skip
    return source


def check_source(spec: AnySpec) -> Job | None:
    """The source job an evaluate or derived spec names, checked; None for the others."""
    if isinstance(spec, EvaluateSpec):
        return check_evaluate_source(spec)
    if isinstance(spec, DerivedSpec):
        return check_derived_source(spec)
    return None


CODE_PERMISSION = "can_run_code"


def forbidden_code(user: Principal) -> ApiError:
    return ApiError(
        403,
        "forbidden",
        "running your own code on the workers needs the can_run_code permission",
        {
            CODE_PERMISSION: f"{user.username!r} does not have it; an admin grants it with "
            f"`trainyard user grant-code {user.username}`"
        },
    )


def entry_files(entry: str) -> tuple[str, ...]:
    """The bundle files that make `entry` runnable: the file itself, or the module of
    package.module:function as a file or a package."""
    if ENTRY_FILE.fullmatch(entry):
        return (entry,)
    module = entry.split(":", 1)[0].replace(".", "/")
    return (f"{module}.py", f"{module}/__init__.py")


def check_script(spec: ScriptSpec, user: Principal) -> CodeBundle:
    """A script job needs the permission, a bundle its owner may use, and an entry
    point that is in the bundle."""
    if not user.may_run_code:
        raise forbidden_code(user)
    bundle = find_visible_bundle(spec.bundle_id)
    if bundle is None:
        raise invalid({"bundle_id": f"bundle {spec.bundle_id} does not exist"})
    if not set(entry_files(spec.entry)) & set(bundle.python_files):
        shown = ", ".join(bundle.python_files[:10]) or "none"
        more = f" and {len(bundle.python_files) - 10} more" if len(bundle.python_files) > 10 else ""
        raise invalid(
            {
                "entry": f"{spec.entry!r} is not in bundle {bundle.id} "
                f"(its Python files: {shown}{more})"
            }
        )
    return bundle


def user_limits(user: Principal) -> dict[str, int | float]:
    """The user's limits: the role's settings with an admin's overrides on top."""
    row = get_session().get(User, user.id)
    settings = current_app.config["TRAINYARD_SETTINGS"]
    return effective_limits(settings, user.role, row.limits if row is not None else None)


def estimate_job(spec: AnySpec, source: Job | None) -> JobEstimate | None:
    """The job's size and memory; None when its dataset cannot be resolved (the spec's
    own check reports that), or for a script, whose model nobody knows before it runs."""
    if isinstance(spec, ScriptSpec):
        return None
    ctx = catalog_context()
    try:
        if isinstance(spec, TrainSpec):
            return estimate_train(spec, resolve_train_dataset(spec, ctx))
        assert source is not None
        if isinstance(spec, DerivedSpec):
            root = root_train_spec(get_session(), source)
            assert root is not None  # check_derived_source
            return estimate_derived(spec, root, resolve_train_dataset(root, ctx))
        source_spec = load_stored_spec(source.spec)
        assert isinstance(source_spec, TrainSpec)
        name, params = eval_dataset_params(spec, source_spec)
        trained_on = resolve_train_dataset(source_spec, ctx)
        return estimate_evaluate(spec, source_spec, trained_on, resolve_dataset(name, params, ctx))
    except (CatalogError, SpecError):
        return None


@dataclass(frozen=True)
class Admission:
    estimate: JobEstimate | None
    limits: dict[str, int | float]
    over: dict[str, str]  # {field: message} for each limit exceeded

    def to_json(self, spec: AnySpec) -> dict[str, Any]:
        """The estimate endpoint's answer."""
        empty = {"params": None, "batch": None, "memory_bytes": None, "memory_gib": None}
        return {
            **(self.estimate.to_json() if self.estimate is not None else empty),
            "max_runtime_s": spec.max_runtime_s,
            "limits": {name: self.limits[name] for name in SUBMISSION_LIMITS},
            "exceeded": self.over,
            "ok": not self.over,
        }


def admit(spec: AnySpec, user: Principal, source: Job | None) -> Admission:
    """Fill in the defaults the user's limits decide, estimate the job, and say which
    limits it exceeds."""
    limits = user_limits(user)
    apply_defaults(spec, limits)
    estimate = estimate_job(spec, source)
    return Admission(estimate, limits, check_job(spec, estimate, limits))


def estimate(spec: AnySpec, user: Principal) -> Admission:
    """What `build_job` would decide about a spec, without storing anything."""
    source = check_source(spec)
    if isinstance(spec, ScriptSpec):
        check_script(spec, user)
    return admit(spec, user, source)


def build_job(spec: AnySpec, user: Principal, idempotency_key: str | None = None) -> Job:
    """The (unsaved) row for a validated spec, after the source check and the limits."""
    with _counted(spec.kind):
        source = check_source(spec)
        if isinstance(spec, ScriptSpec):
            check_script(spec, user)
        admission = admit(spec, user, source)
        if admission.over:
            raise ApiError(
                422, "over_limit", "the job exceeds the limits of your account", admission.over
            )
        submit_limits().check(user)
    return new_job(
        spec,
        user.id,
        current_app.config["TRAINYARD_SETTINGS"].max_attempts,
        source=source,
        idempotency_key=idempotency_key,
    )


def store_and_enqueue(job: Job) -> Job:
    """Commit the row, then publish its task. Raises IntegrityError on a key race."""
    session = get_session()
    session.add(job)
    # Commit before enqueue: a worker that picks the task up at once must find the row.
    session.commit()
    web_metrics.count_submission(job.kind, "accepted")
    enqueue_job(job)
    return job


def submit(spec: AnySpec, user: Principal) -> Job:
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
