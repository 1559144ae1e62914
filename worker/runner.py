"""The job runner: claim a job, run it under a lease with a metric sink, record the outcome.

This is where a job is claimed (`claim_job`), trained (`train_job` / `evaluate_job`)
and finished (`finish_job`). Celery tasks call `run_job` and nothing else.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shared
from shared.db import transaction
from shared.models import Job
from shared.settings import Settings
from shared.spec import EvaluateSpec, TrainSpec, load_stored_spec, spec_to_json
from shared.state_machine import JobState, claim_job, finish_job
from worker.lease import LeaseKeeper
from worker.metric_sink import MetricSink
from worker.training import JobCancelled, UserError, evaluate_job, pick_device, train_job
from worker.training.datasets import DataPaths

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class SourceCheckpoint:
    spec: TrainSpec
    directory: Path


def _load_source(database_url: str, job_id: int) -> SourceCheckpoint:
    with transaction(database_url) as session:
        source = session.get(Job, job_id)
        if source is None or not source.checkpoint_path:
            raise UserError(f"job {job_id} has no checkpoint")
        spec = load_stored_spec(source.spec)
        assert isinstance(spec, TrainSpec)
        return SourceCheckpoint(spec=spec, directory=Path(source.checkpoint_path))


def checkpoint_dir(settings: Settings, job_id: int, attempt: int) -> Path:
    """One directory per attempt: a zombie attempt can never overwrite a newer one's files."""
    return settings.resolved_artifacts_dir / "jobs" / str(job_id) / f"attempt-{attempt}"


def latest_checkpoint(settings: Settings, job_id: int, attempt: int) -> Path | None:
    """The newest `last.pt` an earlier attempt of this job left, to resume from."""
    for earlier in range(attempt - 1, 0, -1):
        path = checkpoint_dir(settings, job_id, earlier) / "last.pt"
        if path.is_file():
            return path
    return None


def _execute(
    spec: TrainSpec | EvaluateSpec,
    settings: Settings,
    job_id: int,
    attempt: int,
    sink: MetricSink,
    lease: LeaseKeeper,
) -> tuple[dict[str, Any], str | None]:
    """Run the job body; returns (result, checkpoint directory)."""
    device = pick_device()
    paths = DataPaths(data_dir=settings.resolved_data_dir, uploads_dir=settings.uploads_dir)
    # torch version, device name and seed are in the metrics train_job/evaluate_job return.
    base = {"trainyard_version": shared.__version__, "spec": spec_to_json(spec)}
    if isinstance(spec, TrainSpec):
        directory = checkpoint_dir(settings, job_id, attempt)
        directory.mkdir(parents=True, exist_ok=True)
        resume_from = latest_checkpoint(settings, job_id, attempt)
        if resume_from is not None:
            log.info("job %s attempt %s: resuming from %s", job_id, attempt, resume_from)
        metrics = train_job(
            spec, device, sink, directory, should_stop=lease.stop.is_set, paths=paths, resume_from=resume_from
        )
        return {**base, "metrics": metrics}, str(directory)
    source = _load_source(settings.resolved_database_url, spec.source_job_id)
    metrics = evaluate_job(spec, source.spec, source.directory, device, paths=paths)
    return {**base, "source_job_id": spec.source_job_id, "metrics": metrics}, None


def _finish(database_url: str, job_id: int, attempt: int, state: JobState, **values: Any) -> bool:
    # The final write is the one that must not be lost to a DB hiccup: retry it.
    delay = 0.5
    for tries in range(8):
        try:
            with transaction(database_url) as session:
                return finish_job(session, job_id, attempt, state, **values)
        except Exception:  # noqa: BLE001
            if tries == 7:
                raise
            log.warning("job %s: could not record %s, retrying", job_id, state, exc_info=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
    return False


def run_job(job_id: int, settings: Settings) -> str:
    """Claim and run one job. Returns what happened: a terminal state, or
    "duplicate" (not claimable: another delivery owns or finished it) or
    "lost" (this attempt lost its lease mid-run and wrote nothing final).
    """
    url = settings.resolved_database_url
    with transaction(url) as session:
        claim = claim_job(session, job_id, worker_name(), settings.lease_seconds)
    if claim is None:
        log.info(
            "job %s: not claimable (duplicate delivery, finished or cancelled); skipping", job_id
        )
        return "duplicate"
    log.info("job %s: claimed, attempt %s", job_id, claim.attempt)
    spec = load_stored_spec(claim.spec)

    lease = LeaseKeeper(
        url, job_id, claim.attempt, settings.lease_seconds, settings.heartbeat_seconds
    )
    sink = MetricSink(
        url, job_id, claim.attempt, settings.metric_flush_seconds, settings.metric_flush_points
    )
    state, values = JobState.FAILED, {}
    with lease:
        try:
            with sink:
                result, checkpoint = _execute(spec, settings, job_id, claim.attempt, sink, lease)
            state, values = JobState.SUCCEEDED, {"result": result, "checkpoint_path": checkpoint}
        except JobCancelled:
            state, values = JobState.CANCELLED, {"error_message": "cancelled by request"}
        except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded state
            log.exception("job %s failed", job_id)
            state = JobState.FAILED
            values = {"error_type": type(exc).__name__, "error_message": str(exc)[:MAX_ERROR_CHARS]}
    if lease.lost or sink.lost:
        log.warning(
            "job %s attempt %s: lost the lease; leaving the outcome to the new owner",
            job_id,
            claim.attempt,
        )
        return "lost"
    if not _finish(url, job_id, claim.attempt, state, **values):
        log.warning("job %s attempt %s: finish rejected (no longer owner)", job_id, claim.attempt)
        return "lost"
    log.info("job %s: %s", job_id, state.value)
    return state.value
