"""The job runner: claim a job, run it under a lease with a metric sink, record the outcome.

This is where a job is claimed (`claim_job`), trained (`train_job` / `evaluate_job`)
and finished (`finish_job`) or handed back (`hand_back_job` / `requeue_after_failure`). Celery tasks
call `run_job` and nothing else. What `run_job` returns:

- "succeeded", "failed", "cancelled": the terminal state it recorded. A job fails at
  once for its own errors (worker/failures.py), for exceeding its `max_runtime_s`, and
  for an infrastructure failure on its last attempt.
- "requeued": handed back to the queue and published again, because the worker is
  shutting down or the job was preempted (neither uses up an attempt) or an infrastructure failure
  (database, broker or disk lost) left attempts to spare. The next attempt resumes
  from the last checkpoint this one wrote.
- "duplicate": not claimable (another delivery owns it, or it already ended).
- "deferred": claimable, but its owner is at a claim limit (running jobs, GPU-hours;
  shared/claim_limits.py): left queued for the reconciler to offer again later.
- "lost": this attempt lost the job mid-run (reclaimed after its lease ran out, or its
  heartbeats failed for longer than the lease) and wrote nothing final.

Every write after the claim names the claimed attempt (a fencing token). Each attempt
also narrates itself in the job's log file for the web to show (worker/job_log.py).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import closing, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

import shared
from shared import event_metrics
from shared import prometheus_catalog as pc
from shared.artifact_store import ArtifactStore, store_for
from shared.celery_app import make_celery, publish_job
from shared.claim_limits import Deferred, claim_within_limits
from shared.dataset_cache import sync_dataset
from shared.db import transaction, utcnow
from shared.job_events import add_event
from shared.job_files import TMP_SUFFIX, job_dir, log_path
from shared.lineage import root_train_spec
from shared.log_setup import job_context, job_fields
from shared.orm import Job
from shared.redaction import DETAIL_MARK, ERROR_DETAIL, Redactor, redactor_for
from shared.scheduling import candidates_for
from shared.settings import Settings
from shared.spec import (
    AnySpec,
    DerivedSpec,
    PruneSpec,
    QuantizeSpec,
    ScriptSpec,
    TrainSpec,
    eval_dataset_params,
    load_stored_spec,
    spec_to_json,
)
from shared.state_machine import (
    Claim,
    JobState,
    finish_job,
    hand_back_job,
    hand_back_preempted,
    requeue_after_failure,
    still_owns,
)
from worker import node_control, shutdown, slots, telemetry, tensorboard_live
from worker.artifact_sync import (
    AttemptSync,
    checkpoint_location,
    fetch_checkpoint_dir,
    fetch_log,
    fetch_resume_checkpoint,
    fetch_resume_dir,
    fetch_upload,
    store_errors,
)
from worker.failures import HOST_OOM, classify, gpu_memory, is_cuda_oom
from worker.job_log import EpochLogSink, JobLog, format_metrics
from worker.lease import LeaseKeeper, StopReason
from worker.memory_limit import AppliedLimit, current_budget, format_bytes, job_memory_limit
from worker.metric_sink import MetricSink
from worker.script_job import run_script
from worker.training import JobCancelled, Sink, UserError, evaluate_job, pick_device, train_job
from worker.training.datasets import DataPaths
from worker.training.derive import export_job, prune_job, quantize_job
from worker.training.device import device_name, job_devices
from worker.training.distributed import train_data_parallel

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
REQUEUED, DUPLICATE, LOST, DEFERRED = "requeued", "duplicate", "lost", "deferred"
TIME_LIMIT_ERROR = "TimeLimitExceeded"
# Why a job of a node drained with --now went back to the queue (shared/worker_nodes.py).
DRAIN_REASON = "worker node drained"


def worker_name(pid: int | None = None) -> str:
    """host:pid of the pool child that runs a job (this process unless `pid` is given)."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


@dataclass(frozen=True)
class SourceCheckpoint:
    spec: TrainSpec
    directory: Path


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, before it is recorded."""

    state: JobState  # a terminal state, or QUEUED: hand the job back
    values: dict[str, Any] = field(default_factory=dict)  # finish_job's keyword arguments
    retry: bool = False  # QUEUED after an infrastructure failure: uses up this attempt
    detail: str = ""  # for the job log only: a code error's traceback
    preempted_by: int | None = None  # QUEUED to make room for this job


def _load_source(settings: Settings, job_id: int) -> SourceCheckpoint:
    with transaction(settings.resolved_database_url) as session:
        source = session.get(Job, job_id)
        if source is None or not source.checkpoint_path:
            raise UserError(f"job {job_id} has no checkpoint")
        spec = load_stored_spec(source.spec)
        assert isinstance(spec, TrainSpec)
        stored = source.checkpoint_path
    # On this host's disk (downloaded from the bucket where that is the store).
    directory = fetch_checkpoint_dir(store_for(settings), settings, job_id, stored)
    return SourceCheckpoint(spec=spec, directory=directory)


def _load_derived_source(settings: Settings, spec: DerivedSpec) -> tuple[Path, TrainSpec]:
    """The source's model file on this host and the train spec its chain started from.
    A prune job's model is its best.pt whichever checkpoint was asked for (it writes no
    other)."""
    with transaction(settings.resolved_database_url) as session:
        source = session.get(Job, spec.source_job_id)
        if source is None or not source.checkpoint_path:
            raise UserError(f"job {spec.source_job_id} has no model file")
        root = root_train_spec(session, source)
        if root is None:
            raise UserError(f"job {source.id}'s model does not lead back to a train job")
        name = "best.pt" if source.kind == "prune" else f"{spec.checkpoint}.pt"
        stored, job_id = source.checkpoint_path, source.id
    directory = fetch_checkpoint_dir(store_for(settings), settings, job_id, stored, (name,))
    return directory / name, root


def checkpoint_dir(settings: Settings, job_id: int, attempt: int) -> Path:
    """One directory per attempt: a zombie attempt can never overwrite a newer one's files."""
    return job_dir(settings, job_id) / f"attempt-{attempt}"


def latest_checkpoint(settings: Settings, job_id: int, attempt: int) -> Path | None:
    """The newest `last.pt` an earlier attempt of this job left, to resume from: on
    this host's disk, downloaded from the artifact store if another host wrote it."""
    return fetch_resume_checkpoint(store_for(settings), settings, job_id, attempt)


def describe_device(device: torch.device) -> str:
    return f"{device} ({device_name(device)})" if device.type == "cuda" else str(device)


def _execute(
    spec: AnySpec,
    settings: Settings,
    claim: Claim,
    device: torch.device,
    sink: Sink,
    should_stop: Callable[[], bool],
    job_log: JobLog,
    stop_reason: Callable[[], StopReason | None] = lambda: None,
) -> tuple[dict[str, Any], Path | None]:
    """Run the job body; returns (result, checkpoint directory)."""
    paths = DataPaths(
        data_dir=settings.resolved_data_dir,
        uploads_dir=settings.uploads_dir,
        max_file_bytes=settings.max_dataset_file_bytes,
    )
    # torch version, device name and seed are in the metrics train_job/evaluate_job return.
    base = {"trainyard_version": shared.__version__, "spec": spec_to_json(spec)}
    # Refuses (NotEnoughDevices, the job fails) a slot with fewer GPUs than the job asks
    # for, rather than training on fewer: docs/architecture.md, "Data-parallel jobs".
    devices = job_devices(spec.resources.gpus, spec.resources.processes)
    if isinstance(spec, ScriptSpec):  # a team's own code (worker/script_job.py)
        if spec.dataset is not None:
            _fetch_dataset_files(spec.dataset.name, None, settings)
        directory = checkpoint_dir(settings, claim.job_id, claim.attempt)
        resume_dir = fetch_resume_dir(store_for(settings), settings, claim.job_id, claim.attempt)
        if resume_dir is not None:
            job_log.event(f"resuming from the checkpoints in {resume_dir}")
            _timeline_resumed(settings.resolved_database_url, claim, resume_dir)
        metrics = run_script(
            spec, settings, claim, sink, should_stop, job_log, device_type=device.type,
            resume_dir=resume_dir, checkpoint_dir=directory, stop_reason=stop_reason,
        )  # fmt: skip
        return {**base, "metrics": metrics}, directory
    if isinstance(spec, TrainSpec):
        _fetch_dataset_files(spec.dataset.name, spec.dataset.params, settings)
        directory = checkpoint_dir(settings, claim.job_id, claim.attempt)
        directory.mkdir(parents=True, exist_ok=True)
        resume_from = latest_checkpoint(settings, claim.job_id, claim.attempt)
        if resume_from is not None:
            log.info(
                "job %s attempt %s: resuming from %s", claim.job_id, claim.attempt, resume_from
            )
            job_log.event(f"resuming from checkpoint {resume_from}")
            _timeline_resumed(settings.resolved_database_url, claim, resume_from)
        if len(devices) > 1:
            job_log.event(
                f"training data-parallel in {len(devices)} processes "
                f"({', '.join(map(str, devices))}); this one is rank 0"
            )
            metrics = train_data_parallel(
                spec, devices, sink, directory, should_stop, paths=paths,
                resume_from=resume_from, label=f"job-{claim.job_id}-attempt-{claim.attempt}",
            )  # fmt: skip
        else:
            metrics = train_job(
                spec,
                device,
                sink,
                directory,
                should_stop=should_stop,
                paths=paths,
                resume_from=resume_from,
            )
        return {**base, "metrics": metrics}, directory
    if isinstance(spec, DerivedSpec):  # prune, quantize, export (worker/training/derive.py)
        model_file, root = _load_derived_source(settings, spec)
        _fetch_dataset_files(root.dataset.name, root.dataset.params, settings)
        directory = checkpoint_dir(settings, claim.job_id, claim.attempt)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(spec, PruneSpec):
            metrics = prune_job(spec, model_file, directory, device, paths=paths, sink=sink,
                                should_stop=should_stop)  # fmt: skip
        elif isinstance(spec, QuantizeSpec):
            metrics = quantize_job(spec, model_file, directory, device, paths=paths)
        else:
            metrics = export_job(spec, model_file, directory, device, paths=paths)
        return {**base, "source_job_id": spec.source_job_id, "metrics": metrics}, directory
    source = _load_source(settings, spec.source_job_id)
    _fetch_dataset_files(*eval_dataset_params(spec, source.spec), settings)
    metrics = evaluate_job(spec, source.spec, source.directory, device, paths=paths)
    return {**base, "source_job_id": spec.source_job_id, "metrics": metrics}, None


def _fetch_dataset_files(name: str, params: Any, settings: Settings) -> None:
    """The dataset's files on this host's disk before loading: an uploaded CSV, or
    standard-format files the bucket holds (shared/dataset_cache.py)."""
    store = store_for(settings)
    upload_id = (
        params.get("upload_id") if isinstance(params, dict) else getattr(params, "upload_id", None)
    )
    if upload_id:
        fetch_upload(store, settings, int(upload_id))
    with store_errors(f"copying dataset {name} from {store.url}"):
        sync_dataset(store, settings.resolved_data_dir, name)


def _timeline_resumed(url: str, claim: Claim, checkpoint: Path) -> None:
    """Put the resume on the job's timeline; only informative, so a failure is not fatal."""
    try:
        with transaction(url) as session:
            if still_owns(session, claim.job_id, claim.attempt):
                # A file (attempt-1/last.pt), or a script job's directory (attempt-1).
                relative = (
                    checkpoint.name if checkpoint.is_dir()
                    else f"{checkpoint.parent.name}/{checkpoint.name}"
                )  # fmt: skip
                add_event(session, claim.job_id, "resumed", attempt=claim.attempt, message=relative)
    except Exception:  # noqa: BLE001 - the lease keeper notices a database that stays down
        log.warning("job %s: could not record the resume event", claim.job_id, exc_info=True)


# Claims tried per message before giving up on the better-ranked jobs (each lost to
# another slot meanwhile) and trying the message's own job.
MAX_CLAIM_TRIES = 8


def run_job(
    job_id: int, settings: Settings, celery: Celery | None = None, *, schedule: bool = False
) -> str:
    """Claim and run one job; returns what happened (see the module docstring).

    `celery` publishes the job again when it is handed back; without it (tests, scripts)
    an app is built from `settings` for that one message. With `schedule` (the Celery
    tasks), the message is a token for its queue: the best-ranked waiting job runs,
    which may be another than `job_id` (shared/scheduling.py).
    """
    # Taken before the claim: the lease it sets cannot run out before this + lease_seconds.
    claimed_at = time.monotonic()
    device = pick_device()
    claim = _claim(job_id, settings, describe_device(device), schedule)
    if isinstance(claim, Deferred):
        log.info("job %s: not run now: %s", job_id, claim.reason, extra=job_fields(job_id))
        return DEFERRED
    if claim is None:
        log.info(
            "job %s: not claimable (duplicate delivery, running elsewhere, finished or "
            "cancelled); skipping",
            job_id,
            extra=job_fields(job_id),
        )
        return DUPLICATE
    if claim.job_id != job_id:
        log.info("job %s: run by the message of job %s (ranked first)", claim.job_id, job_id)
    # From here on, the job this slot claimed (not necessarily the message's); every log
    # line of this process names it until it ends (shared/log_setup.py).
    with job_context(claim.job_id, claim.attempt):
        log.info("job %s: claimed, attempt %s", claim.job_id, claim.attempt)
        return _run_claimed(claim, settings, celery, claimed_at, device)


def _run_claimed(
    claim: Claim, settings: Settings, celery: Celery | None, claimed_at: float, device: torch.device
) -> str:
    job_id = claim.job_id
    _count_claim(claim, settings)
    store = store_for(settings)
    _fetch_log(store, settings, job_id)
    sync = AttemptSync(store, settings, job_id, claim.attempt)
    with sync, JobLog(log_path(settings, job_id), job_id, claim.attempt) as job_log:
        outcome = _attempt(claim, settings, claimed_at, job_log, device, sync)
        if outcome is None:
            job_log.event("lost the job (lease ran out or reclaimed); recorded nothing")
            _count_end(claim, settings, LOST, time.monotonic() - claimed_at)
            return LOST
        # The row gets what members may see; the log below keeps the full text.
        shown = as_shown(outcome, redactor_for(settings))
        result = _record(claim, shown, settings.resolved_database_url)
        # Written after the database agrees, so the log never claims an end it did not get.
        job_log.event(_final_event(result, outcome))
    _upload_log(sync, job_id)
    sync.drop_local_copy()
    if result == REQUEUED:
        _publish(claim, settings, celery)
    log.info("job %s attempt %s: %s", job_id, claim.attempt, result)
    _count_end(claim, settings, result, time.monotonic() - claimed_at)
    # The crash guard (worker/node_control.py): a slot whose jobs keep dying at once stops.
    node_control.attempt_ended(
        settings,
        died=node_control.verdict(
            result, outcome.retry, outcome.values.get("error_type"), outcome.detail
        ),
        ran_s=time.monotonic() - claimed_at,
        # As members see it (no server paths): the workers page shows it to everyone.
        error=f"{shown.values.get('error_type')}: {shown.values.get('error_message')}",
    )
    return result


def _count_claim(claim: Claim, settings: Settings) -> None:
    """The wait-time histogram: from submission to the first claim (a requeued job's
    later claims would count its earlier attempts' run time as waiting)."""
    if claim.attempt == 1 and claim.created_at is not None:
        waited = (utcnow() - claim.created_at.replace(tzinfo=None)).total_seconds()
        event_metrics.observe(settings.redis_url, pc.JOB_WAIT, (claim.queue,), waited)


def _count_end(claim: Claim, settings: Settings, result: str, ran_s: float) -> None:
    labels = (claim.queue, claim.kind, result)
    event_metrics.count(settings.redis_url, pc.ATTEMPTS_FINISHED, labels)
    event_metrics.observe(settings.redis_url, pc.JOB_RUN, labels, ran_s)


def _fetch_log(store: ArtifactStore, settings: Settings, job_id: int) -> None:
    try:
        fetch_log(store, settings, job_id)
    except Exception:  # noqa: BLE001 - the earlier lines stay in the store; this one goes on
        log.warning("job %s: could not fetch its log from %s", job_id, store.url, exc_info=True)


def _upload_log(sync: AttemptSync, job_id: int) -> None:
    try:
        sync.upload_log()
    except Exception:  # noqa: BLE001 - the outcome is recorded; only the last log lines wait
        log.warning("job %s: could not upload its log", job_id, exc_info=True)


def _claim(job_id: int, settings: Settings, device: str, schedule: bool) -> Claim | Deferred | None:
    url = settings.resolved_database_url
    order = [job_id]
    if schedule:
        slot = slots.current_slot()
        slot_gpus = [g.memory_total_bytes for g in slot.gpus] if slot and slot.gpus else None
        with transaction(url) as session:
            order = candidates_for(session, settings, job_id, slot_gpus=slot_gpus)
        if not order:
            return None  # nothing waits in its queue: a duplicate delivery
        order = order[:MAX_CLAIM_TRIES] + ([job_id] if job_id in order[MAX_CLAIM_TRIES:] else [])
    own: Claim | Deferred | None = None
    for candidate in order:
        with transaction(url) as session:
            claim = claim_within_limits(
                session, settings, candidate, worker_name(), device,
                placement=slots.placement(slots.current_slot()),
            )  # fmt: skip
        if isinstance(claim, Claim):
            return claim
        if candidate == job_id:
            own = claim
    return own


def _attempt(
    claim: Claim,
    settings: Settings,
    claimed_at: float,
    job_log: JobLog,
    device: torch.device,
    sync: AttemptSync,
) -> Outcome | None:
    """Run the claimed job under its lease; None if this attempt lost the job meanwhile."""
    url = settings.resolved_database_url
    max_runtime_s = claim.spec.get("max_runtime_s")
    lease = LeaseKeeper(
        url, claim.job_id, claim.attempt, settings.lease_seconds, settings.heartbeat_seconds,
        max_runtime_s=max_runtime_s, claimed_at=claimed_at, node=node_control.node_name(),
    )  # fmt: skip
    sink = MetricSink(
        url, claim.job_id, claim.attempt, settings.metric_flush_seconds,
        settings.metric_flush_points, give_up=lambda: lease.lost, redis_url=settings.redis_url,
        on_written=tensorboard_live.writer(
            settings, claim, checkpoint_dir(settings, claim.job_id, claim.attempt)),
    )  # fmt: skip
    job_log.event(f"claimed by {worker_name()} on {describe_device(device)}{_slot_note()}")
    memory = AppliedLimit(None)
    with lease:
        try:
            spec = load_stored_spec(claim.spec)
            script = isinstance(spec, ScriptSpec)
            # The telemetry's process sample counts descendants: a script's child too.
            charted = script or isinstance(spec, TrainSpec)
            # A script's limit is set on its own process (worker/script_job.py), not on
            # this one, whose limit the child would inherit through fork and exec.
            limit = (
                nullcontext(AppliedLimit(None, "in the worker; the script has its own"))
                if script else job_memory_limit(current_budget(), device)
            )  # fmt: skip
            with (
                sink,
                limit as memory,
                telemetry.for_job(sink, settings, claim.job_id, claim.attempt, train=charted),
            ):
                job_log.event(memory.describe())
                result, directory = _execute(
                    spec, settings, claim, device, EpochLogSink(sink, job_log),
                    lease.should_stop, job_log, lambda: lease.stop_reason,
                )  # fmt: skip
            # The checkpoints are in the store before the job counts as succeeded.
            sync.flush()
            if script and directory is not None and not _has_checkpoint(directory, claim.kind):
                directory = None  # the script saved nothing
            checkpoint = (
                None if directory is None
                else checkpoint_location(sync.store, directory, claim.job_id, claim.attempt)
            )  # fmt: skip
            outcome = Outcome(JobState.SUCCEEDED, {"result": result, "checkpoint_path": checkpoint})
        except JobCancelled:
            job_log.event(f"stopped: {_STOP_EVENTS.get(lease.stop_reason, 'on request')}")
            directory = checkpoint_dir(settings, claim.job_id, claim.attempt)
            checkpoint = _flush_stopped(sync, directory, claim)
            outcome = _stopped(lease.stop_reason, max_runtime_s, checkpoint, lease.preempted_by)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded outcome
            outcome = _failed(exc, claim, device, memory)
    if device.type == "cuda":
        # The failed attempt's tensors are garbage now; give the memory back for the next job.
        torch.cuda.empty_cache()
    if lease.lost or sink.lost:
        log.warning(
            "job %s attempt %s: lost the job; leaving the outcome to whoever holds it now",
            claim.job_id, claim.attempt,
        )  # fmt: skip
        return None
    return outcome


def _slot_note() -> str:
    """The slot and the CUDA_VISIBLE_DEVICES this process runs with, for the job log."""
    slot = slots.current_slot()
    if slot is None:
        return ""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "" if visible is None else f", CUDA_VISIBLE_DEVICES={visible or '(none)'}"
    return f" ({slot.describe()}{shown})"


_STOP_EVENTS = {
    StopReason.CANCELLED: "cancel requested",
    StopReason.SHUTDOWN: shutdown.REASON,
    StopReason.DRAIN: DRAIN_REASON,
    StopReason.PREEMPTED: "preempted by a higher-priority job",
    StopReason.TIME_LIMIT: "time limit reached",
    StopReason.LOST: "lease lost",
}


def _has_checkpoint(directory: Path, kind: str) -> bool:
    """Whether an attempt wrote a checkpoint: last.pt for a built-in job, any file for a
    script job (which names its own files)."""
    if kind != "script":
        return (directory / "last.pt").is_file()
    return directory.is_dir() and any(
        p.is_file() and not p.name.endswith(TMP_SUFFIX) for p in directory.rglob("*")
    )


def _flush_stopped(sync: AttemptSync, directory: Path, claim: Claim) -> str | None:
    """Upload what a stopped attempt wrote; where its checkpoint is, if it has one (the
    next attempt resumes from the newest one in the store, whatever this says)."""
    if not _has_checkpoint(directory, claim.kind):
        return None
    try:
        sync.flush()
    except Exception:  # noqa: BLE001 - stopping goes on; an older checkpoint serves
        log.warning("job %s: could not upload its last checkpoint", claim.job_id, exc_info=True)
        return None
    return checkpoint_location(sync.store, directory, claim.job_id, claim.attempt)


def _stopped(
    reason: StopReason | None,
    max_runtime_s: int | None,
    checkpoint: str | None,
    preempted_by: int | None = None,
) -> Outcome:
    """The training loop stopped on request and wrote last.pt where it stopped
    (`checkpoint`: its directory, or None if it wrote none or it could not be stored)."""
    if reason is StopReason.SHUTDOWN:
        return Outcome(JobState.QUEUED, {"error_message": f"{shutdown.REASON}; requeued"})
    if reason is StopReason.DRAIN:
        return Outcome(JobState.QUEUED, {"error_message": f"{DRAIN_REASON}; requeued"})
    if reason is StopReason.PREEMPTED and preempted_by is not None:
        return Outcome(
            JobState.QUEUED,
            {"error_message": f"preempted by job {preempted_by}; requeued"},
            preempted_by=preempted_by,
        )
    if reason is StopReason.TIME_LIMIT:
        return Outcome(
            JobState.FAILED,
            {
                "error_type": TIME_LIMIT_ERROR,
                "error_message": f"time limit of {max_runtime_s} s exceeded",
                "checkpoint_path": checkpoint,
            },
        )
    return Outcome(
        JobState.CANCELLED, {"error_message": "cancelled by request", "checkpoint_path": checkpoint}
    )


def _failed(exc: Exception, claim: Claim, device: torch.device, memory: AppliedLimit) -> Outcome:
    # The figures are read now, while the failed step's tensors are still referenced
    # from the traceback: what the GPU held when the allocation failed.
    on_gpu = gpu_memory(device) if is_cuda_oom(exc) else None
    failure = classify(exc, describe_device(device), on_gpu)
    reason = failure.reason
    if failure.error_type == HOST_OOM and memory.limit_bytes is not None:
        reason = (
            f"{reason}; the job needs more than this worker slot's memory limit of "
            f"{format_bytes(memory.limit_bytes)} (TRAINYARD_SLOT_MEMORY_BYTES)"
        )
    values = {"error_type": failure.error_type, "error_message": reason[:MAX_ERROR_CHARS]}
    if failure.retriable:
        log.warning(
            "job %s attempt %s: infrastructure failure: %s",
            claim.job_id, claim.attempt, failure.reason, exc_info=exc,
        )  # fmt: skip
        return Outcome(JobState.QUEUED, values, retry=True)
    log.error("job %s attempt %s failed", claim.job_id, claim.attempt, exc_info=exc)
    # A UserError's message says it all; anything else is a bug whose traceback helps.
    detail = "" if isinstance(exc, UserError) else "".join(traceback.format_exception(exc))
    return Outcome(JobState.FAILED, values, detail=detail)


def as_shown(outcome: Outcome, redactor: Redactor) -> Outcome:
    """The outcome as the job row records it, which the job's owner sees: the message
    without server paths. The full message, with a code error's traceback, goes into
    result["error_detail"], which only admins are shown (shared/redaction.py)."""
    message = outcome.values.get("error_message")
    if not message or outcome.state is JobState.SUCCEEDED:
        return outcome
    shown = redactor.text(message)
    if shown == message and not outcome.detail:
        return outcome
    detail = f"{message}\n{outcome.detail}" if outcome.detail else message
    values = {**outcome.values, "error_message": shown, "result": {ERROR_DETAIL: detail}}
    return replace(outcome, values=values)


def _final_event(result: str, outcome: Outcome) -> str:
    """The job log's line for how the attempt was recorded (which may differ from the
    outcome: a cancel can overtake a hand-back, another attempt can own the job)."""
    values = outcome.values
    error = f"{values.get('error_type')}: {values.get('error_message')}"
    if result == JobState.SUCCEEDED.value:
        return f"succeeded: {format_metrics(values['result'].get('metrics', {}))}"
    if result == JobState.FAILED.value:
        final = f"failed: {error}" + (" (no attempts left)" if outcome.retry else "")
        # Detail lines: kept in the log, shown to admins only (shared/redaction.py).
        detail = "".join(
            f"\n{DETAIL_MARK}{line}" for line in outcome.detail.rstrip("\n").split("\n")
        )
        return f"{final}{detail}" if outcome.detail else final
    if result == REQUEUED and outcome.retry:
        return f"requeued after an infrastructure failure: {error}"
    if result == REQUEUED and outcome.preempted_by is not None:
        return (
            f"handed back to the queue (preempted by job {outcome.preempted_by}); "
            "the next attempt resumes"
        )
    if result == REQUEUED:
        why = str(values.get("error_message") or shutdown.REASON).removesuffix("; requeued")
        return f"handed back to the queue ({why}); the next attempt resumes"
    if result == JobState.CANCELLED.value:
        return "cancelled"
    return "finish rejected: another attempt owns the job now; recorded nothing"


# -- recording the outcome: each a compare-and-set on this attempt ----------------------


def _record(claim: Claim, outcome: Outcome, database_url: str) -> str:
    if outcome.state is not JobState.QUEUED:
        return _with_retries(
            database_url, lambda s: _finish(s, claim, outcome.state, outcome.values)
        )
    if outcome.retry:
        return _with_retries(database_url, lambda s: _retry_or_fail(s, claim, outcome.values))
    if outcome.preempted_by is not None:
        preemptor = outcome.preempted_by
        return _with_retries(database_url, lambda s: _hand_back_preempted(s, claim, preemptor))
    return _with_retries(
        database_url, lambda s: _hand_back(s, claim, outcome.values["error_message"])
    )


def _with_retries(database_url: str, write: Callable[[Session], str]) -> str:
    """Run `write` in a transaction, retried through a database hiccup: the outcome is
    the one write that must not be lost. Each write is a compare-and-set, so a retry of
    one that did commit finds the job changed and answers "lost", never a double write."""
    delay = 0.5
    for tries in range(8):
        try:
            with transaction(database_url) as session:
                return write(session)
        except Exception:  # noqa: BLE001
            if tries == 7:
                raise
            log.warning("could not record a job outcome, retrying in %.1fs", delay, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")


def _finish(session: Session, claim: Claim, state: JobState, values: dict[str, Any]) -> str:
    if finish_job(session, claim.job_id, claim.attempt, state, **values):
        return state.value
    log.warning("job %s attempt %s: finish rejected (no longer owner)", claim.job_id, claim.attempt)
    return LOST


def _hand_back(session: Session, claim: Claim, reason: str) -> str:
    if hand_back_job(session, claim.job_id, claim.attempt, reason):
        return REQUEUED
    # Not handed back: a cancel arrived meanwhile (or the job is no longer ours).
    return _finish(session, claim, JobState.CANCELLED, {"error_message": "cancelled by request"})


def _hand_back_preempted(session: Session, claim: Claim, preemptor: int) -> str:
    if hand_back_preempted(session, claim.job_id, claim.attempt, preemptor):
        return REQUEUED
    return _finish(session, claim, JobState.CANCELLED, {"error_message": "cancelled by request"})


def _retry_or_fail(session: Session, claim: Claim, values: dict[str, Any]) -> str:
    reason = values["error_message"]
    if requeue_after_failure(
        session, claim.job_id, claim.attempt, f"{reason}; requeued after attempt {claim.attempt}"
    ):
        return REQUEUED
    row = session.execute(
        select(Job.max_attempts, Job.cancel_requested).where(Job.id == claim.job_id)
    ).one_or_none()
    if row is not None and row.cancel_requested:
        return _finish(
            session, claim, JobState.CANCELLED, {"error_message": "cancelled by request"}
        )
    max_attempts = row.max_attempts if row is not None else claim.attempt
    final = f"{reason} (attempt {claim.attempt} of {max_attempts}; no attempts left)"
    return _finish(session, claim, JobState.FAILED, {**values, "error_message": final})


def _publish(claim: Claim, settings: Settings, celery: Celery | None) -> None:
    """Send the handed-back job's task now, so another worker picks it up at once. The
    row is already `queued`: if this fails, the reconciler enqueues it later."""
    try:
        spec = load_stored_spec(claim.spec)
        if celery is not None:
            publish_job(celery, claim.job_id, claim.kind, spec.queue, spec.max_runtime_s)
            return
        with closing(make_celery(settings)) as app:
            publish_job(app, claim.job_id, claim.kind, spec.queue, spec.max_runtime_s)
    except Exception:  # noqa: BLE001 - the database already says queued; that is what counts
        log.warning(
            "job %s requeued but not published; the reconciler will enqueue it",
            claim.job_id, exc_info=True,
        )  # fmt: skip
