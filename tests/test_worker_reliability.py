"""The worker's side of docs/architecture.md "Reliability", on each database with a real Redis:
heartbeat failures, failure classes (the job's own errors, out of memory included, vs
infrastructure),
the soft time limit, graceful shutdown with a real `celery worker`, duplicate
deliveries and fencing."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy.exc
import torch
from celery.exceptions import Reject
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from shared.celery_app import TRAIN_TASK, make_celery, task_id_for
from shared.db import transaction, utcnow
from shared.orm import Job, MetricPoint
from shared.settings import Settings
from shared.spec import CPU_QUEUE
from shared.state_machine import (
    claim_job,
    finish_job,
    hand_back_job,
    requeue_after_failure,
    update_progress,
)
from tests.conftest import SQLITE_ONLY, wait_for_state
from tests.helpers import train_spec
from worker import runner, shutdown
from worker.failures import CUDA_OOM, HOST_OOM, INFRASTRUCTURE, classify
from worker.lease import LeaseKeeper, StopReason
from worker.metric_sink import LostJob, MetricSink
from worker.runner import run_job
from worker.tasks import register_tasks
from worker.training import UserError

TINY_MLP = {"name": "mlp", "params": {"hidden": 32, "layers": 1}}
# About 0.3 s an epoch on one CPU core: long enough to interrupt, short enough to finish.
LONG = train_spec(model=TINY_MLP, epochs=400)


@pytest.fixture(autouse=True)
def _no_shutdown_left_over() -> Iterator[None]:
    shutdown.reset_for_tests()
    yield
    shutdown.reset_for_tests()


def submit(client, spec: dict[str, Any]) -> int:  # type: ignore[no-untyped-def]
    resp = client.post("/api/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["id"]


def job_row(url: str, job_id: int) -> Job:
    with transaction(url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `condition`; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def in_thread(job_id: int, settings: Settings) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_job(job_id, settings)))
    thread.start()
    return thread, outcome


def training_progress(url: str, job_id: int) -> int:
    return (job_row(url, job_id).progress or {}).get("step", 0)


def queued_task_ids(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(m)["headers"]["id"] for m in client.lrange(CPU_QUEUE, 0, -1)]
    finally:
        client.close()


def dead_url(db_url: str) -> str:
    """A URL of the same kind whose database cannot be reached: a simulated outage."""
    if db_url.startswith("sqlite"):
        return "sqlite:////nonexistent-trainyard-dir/trainyard.db"
    return make_url(db_url).set(port=1).render_as_string(hide_password=False)


# -- heartbeat failures ------------------------------------------------------------------


def test_keeper_stops_the_job_once_failed_heartbeats_outlast_the_lease(db_url: str) -> None:
    start = time.monotonic()
    keeper = LeaseKeeper(dead_url(db_url), 1, 1, lease_seconds=1.5, interval=0.1)
    assert keeper.beats_per_lease == 15
    with keeper:
        time.sleep(0.8)
        # Beats fail, but the lease the claim set has not run out: keep training.
        assert not keeper.should_stop() and keeper.failed_beats >= 3
        wait_until(keeper.stop.is_set, 5, "the keeper to stop the job")
    assert 1.5 <= time.monotonic() - start < 3
    assert keeper.stop_reason is StopReason.LOST and keeper.lost
    assert keeper.failed_beats >= 10


@SQLITE_ONLY
def test_a_job_whose_heartbeats_fail_stops_itself_and_writes_nothing_final(
    client, settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import worker.lease

    outage = threading.Event()
    real_heartbeat, real_train_job = worker.lease.renew_lease, runner.train_job

    def heartbeat(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        if outage.is_set():
            raise sqlalchemy.exc.OperationalError("UPDATE jobs", {}, Exception("server closed"))
        return real_heartbeat(*args, **kwargs)

    def train_job(spec, device, sink, directory: Path, should_stop, **kw):  # type: ignore[no-untyped-def]
        if directory.name != "attempt-1":
            return real_train_job(spec, device, sink, directory, should_stop, **kw)
        steps = 0

        def step_then_check() -> bool:
            # The outage starts at step 100; 5 ms a step keeps attempt 1 from finishing
            # before its lease runs out, however fast this machine is.
            nonlocal steps
            steps += 1
            if steps == 100:
                outage.set()
            time.sleep(0.005)
            return should_stop()

        return real_train_job(spec, device, sink, directory, step_then_check, **kw)

    monkeypatch.setattr(worker.lease, "renew_lease", heartbeat)
    monkeypatch.setattr(runner, "train_job", train_job)
    fast = settings.model_copy(update={"lease_seconds": 1.0, "heartbeat_seconds": 0.1})
    job_id = submit(client, train_spec(model=TINY_MLP, epochs=8))
    thread, outcome = in_thread(job_id, fast)
    wait_until(outage.is_set, 60, "the outage to begin")
    cut = time.monotonic()
    thread.join(30)
    assert outcome == ["lost"]
    assert 0.7 < time.monotonic() - cut < 3
    job = job_row(db_url, job_id)
    # Nothing final: the row is as the last beat left it, for the reconciler to requeue.
    assert (job.state, job.attempt, job.finished_at, job.result) == ("running", 1, None, None)
    assert (runner.checkpoint_dir(fast, job_id, 1) / "last.pt").is_file()

    outage.clear()  # the database is back; once the lease has run out the job is reclaimed
    wait_until(
        lambda: job_row(db_url, job_id).lease_expires_at < utcnow(), 10, "attempt 1's lease to end"
    )
    # Attempt 2 runs under an ordinary lease: a 1 s lease is lost to one slow SQLite write
    # on a busy machine, and only attempt 1 needed it short.
    assert run_job(job_id, settings) == "succeeded"
    job = job_row(db_url, job_id)
    assert job.attempt == 2 and job.result["metrics"]["resumed_from_step"] > 100


# -- failure classes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "retriable", "error_type"),
    [
        (UserError("training loss became non-finite"), False, "UserError"),
        (ValueError("bad value"), False, "ValueError"),
        (TypeError("bad type"), False, "TypeError"),
        (KeyError("label"), False, "KeyError"),
        (IndexError("index 10 is out of bounds"), False, "IndexError"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x64 and 32x10)"), False, "RuntimeError"),
        (FileNotFoundError(errno.ENOENT, "no such file"), False, "FileNotFoundError"),
        # Out of memory is the job's own: its slot's limit does not grow on a retry.
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False, CUDA_OOM),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), False, CUDA_OOM),
        (MemoryError(), False, HOST_OOM),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), False, HOST_OOM),
        (sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("gone")), True, INFRASTRUCTURE),
        (sqlalchemy.exc.InterfaceError("SELECT 1", {}, Exception("closed")), True, INFRASTRUCTURE),
        (sqlalchemy.exc.DisconnectionError("dropped"), True, INFRASTRUCTURE),
        (redis.exceptions.ConnectionError("refused"), True, INFRASTRUCTURE),
        (OSError(errno.ENOSPC, "No space left on device"), True, INFRASTRUCTURE),
        (OSError(errno.EIO, "Input/output error"), True, INFRASTRUCTURE),
    ],
)  # fmt: skip
def test_failure_classes(exc: BaseException, retriable: bool, error_type: str) -> None:
    failure = classify(exc, "cuda:0 (NVIDIA H200)")
    assert (failure.retriable, failure.error_type) == (retriable, error_type)
    if error_type == CUDA_OOM:
        assert failure.reason.startswith("CUDA out of memory on cuda:0 (NVIDIA H200): Tried")


def test_a_user_error_fails_at_once_without_a_retry(
    client, settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    def broken(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x64 and 32x10)")

    monkeypatch.setattr(runner, "train_job", broken)
    job_id = submit(client, train_spec(model=TINY_MLP))
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)
    assert run_job(job_id, settings) == "failed"
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.error_type) == ("failed", 1, "RuntimeError")
    assert "shapes cannot be multiplied" in job.error_message
    assert queued_task_ids(settings.require_redis_url()) == []  # not sent again


def disk_error_on_first_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempt 1 hits an I/O error (the infrastructure's fault) right after its first
    checkpoint."""
    real_train_job = runner.train_job

    def train_job(spec, device, sink, directory: Path, should_stop, **kw):  # type: ignore[no-untyped-def]
        if directory.name != "attempt-1":
            return real_train_job(spec, device, sink, directory, should_stop, **kw)

        def stop_or_oom() -> bool:
            if (directory / "last.pt").is_file():
                raise OSError(errno.EIO, "Input/output error")
            return should_stop()

        return real_train_job(spec, device, sink, directory, stop_or_oom, **kw)

    monkeypatch.setattr(runner, "train_job", train_job)


def test_an_infrastructure_failure_is_requeued_and_resumes_from_the_checkpoint(
    client, settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    disk_error_on_first_attempt(monkeypatch)
    job_id = submit(client, train_spec(model=TINY_MLP, epochs=3))
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)

    assert run_job(job_id, settings) == "requeued"
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.worker, job.lease_expires_at) == ("queued", 1, None, None)
    assert job.error_message.startswith("I/O error: OSError: [Errno 5] Input/output error")
    assert job.error_message.endswith("; requeued after attempt 1")
    assert queued_task_ids(settings.require_redis_url()) == [task_id_for(job_id)]

    # Checkpoints are written off the training thread, so on a busy machine attempt 1 may
    # get past epoch 1 before it sees last.pt: resume from what it actually left.
    left = torch.load(
        runner.checkpoint_dir(settings, job_id, 1) / "last.pt",
        map_location="cpu",
        weights_only=True,
    )
    assert 1 <= left["epoch"] < 3
    assert run_job(job_id, settings) == "succeeded"  # what the next delivery does
    job = job_row(db_url, job_id)
    metrics = job.result["metrics"]
    assert (job.state, job.attempt, metrics["resumed_from_epoch"], metrics["epochs_run"]) == (
        "succeeded", 2, left["epoch"], 3,
    )  # fmt: skip


def test_cuda_oom_fails_at_once_without_a_retry(
    client, settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    def out_of_memory(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(runner, "train_job", out_of_memory)
    job_id = submit(client, train_spec(model=TINY_MLP))
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)
    assert run_job(job_id, settings) == "failed"
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.error_type) == ("failed", 1, "CudaOutOfMemory")
    assert job.error_message == "CUDA out of memory on cpu: Tried to allocate 80.00 GiB"
    assert queued_task_ids(settings.require_redis_url()) == []  # not sent again


def test_an_infrastructure_failure_on_the_last_attempt_fails_with_the_reason(
    client, settings: Settings, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    def disk_gone(*_a: Any, **_k: Any) -> dict[str, Any]:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(runner, "train_job", disk_gone)
    job_id = submit(client, train_spec(model=TINY_MLP))
    with transaction(db_url) as s:
        s.get(Job, job_id).max_attempts = 2
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)

    assert run_job(job_id, settings) == "requeued"
    assert run_job(job_id, settings) == "failed"
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.error_type) == ("failed", 2, INFRASTRUCTURE)
    assert job.error_message == (
        "I/O error: OSError: [Errno 5] Input/output error (attempt 2 of 2; no attempts left)"
    )
    assert queued_task_ids(settings.require_redis_url()) == [task_id_for(job_id)]  # once, not twice
    assert run_job(job_id, settings) == "duplicate"


# -- time limit --------------------------------------------------------------------------------


def test_max_runtime_fails_the_job_with_a_time_limit(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, {**LONG, "max_runtime_s": 2})
    started = time.monotonic()
    assert run_job(job_id, settings) == "failed"
    took = time.monotonic() - started
    assert 2 <= took < 4.5
    job = job_row(db_url, job_id)
    assert (job.error_type, job.error_message) == (
        "TimeLimitExceeded",
        "time limit of 2 s exceeded",
    )
    assert job.attempt == 1 and Path(job.checkpoint_path, "last.pt").is_file()


# -- graceful shutdown -------------------------------------------------------------------------


def test_shutdown_hands_the_running_job_back(client, settings: Settings, db_url: str) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, LONG)
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)
    thread, outcome = in_thread(job_id, settings)
    wait_until(lambda: training_progress(db_url, job_id) > 20, 30, "training to start")
    shutdown.request_shutdown()
    took = wait_until(lambda: not thread.is_alive(), 10, "the job to stop")
    assert outcome == ["requeued"] and took < 3
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.error_message) == (
        "queued", 1, "worker shutting down; requeued",
    )  # fmt: skip
    assert (runner.checkpoint_dir(settings, job_id, 1) / "last.pt").is_file()
    assert queued_task_ids(settings.require_redis_url()) == [task_id_for(job_id)]


def test_a_sigterm_to_the_process_running_a_job_hands_it_back(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    """What a pool child does when a process-group kill reaches it: the task body runs
    here in the main thread, as it does in a child, and this process gets the SIGTERM."""
    app = make_celery(settings)
    register_tasks(app, settings)
    job_id = submit(client, LONG)
    redis.Redis.from_url(settings.require_redis_url()).delete(CPU_QUEUE)
    before = signal.getsignal(signal.SIGTERM)

    def terminate_once_training() -> None:
        wait_until(lambda: training_progress(db_url, job_id) > 0, 30, "training to start")
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_training)
    killer.start()
    assert app.tasks[TRAIN_TASK].apply(args=[job_id]).get() == "requeued"
    killer.join()
    assert signal.getsignal(signal.SIGTERM) is before  # restored once the job ended
    job = job_row(db_url, job_id)
    assert (job.state, job.attempt, job.error_message) == (
        "queued", 1, "worker shutting down; requeued",
    )  # fmt: skip
    assert queued_task_ids(settings.require_redis_url()) == [task_id_for(job_id)]

    # This process is going away now: a task it still gets goes back to the broker as is.
    result = app.tasks[TRAIN_TASK].apply(args=[job_id])
    assert isinstance(result.result, Reject) and result.result.requeue
    assert job_row(db_url, job_id).state == "queued"


@pytest.mark.integration
# SQLite (local mode's database); tests/faults runs the SIGTERM scenario on PostgreSQL.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sigterm_checkpoints_and_requeues_then_another_worker_resumes(
    client, settings: Settings, db_url: str, start_worker
) -> None:  # type: ignore[no-untyped-def]
    # Long enough that it cannot finish before the SIGTERM lands, even on a loaded machine.
    spec = train_spec(model=TINY_MLP, epochs=60)
    first = start_worker()
    job_id = submit(client, spec)
    # Progress is first reported a second into training: well before its end.
    wait_until(lambda: training_progress(db_url, job_id) > 0, 60, "training to start")

    os.kill(first.proc.pid, signal.SIGTERM)  # the main process only, as docker stop does
    try:
        took = wait_until(lambda: job_row(db_url, job_id).state == "queued", 10, "the hand-back")
    except AssertionError:
        row = job_row(db_url, job_id)
        raise AssertionError(f"job {row.state} {row.progress}\n{first.log_tail()}") from None
    assert took < 3, first.log_tail()
    job = job_row(db_url, job_id)
    assert (job.attempt, job.error_message) == (1, "worker shutting down; requeued")
    assert (runner.checkpoint_dir(settings, job_id, 1) / "last.pt").is_file()

    second = start_worker()
    assert first.proc.wait(15) == 0, first.log_tail()  # a warm shutdown, done by now

    def get_json(path: str) -> dict[str, Any]:
        return client.get(path).get_json()

    # Generous: a deadline, not a timing assertion; a loaded CI machine trains slowly.
    done = wait_for_state(get_json, job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["state"] == "succeeded", second.log_tail()
    metrics = done["result"]["metrics"]
    assert done["attempt"] == 2 and metrics["resumed_from_step"] > 0

    reference_id = submit(client, spec)  # the same spec and seed, never interrupted
    reference = wait_for_state(get_json, reference_id, {"succeeded", "failed"}, timeout=240)
    expected = reference["result"]["metrics"]
    assert expected["resumed_from_step"] is None
    for key in ("train_loss", "val_loss", "val_accuracy", "val_f1", "epochs_run", "steps"):
        assert metrics[key] == expected[key], key


# -- duplicate deliveries and fencing ------------------------------------------------------------


def test_a_redelivery_while_another_worker_holds_the_lease_does_nothing(
    client, settings: Settings, db_url: str
) -> None:  # type: ignore[no-untyped-def]
    job_id = submit(client, LONG)
    thread, outcome = in_thread(job_id, settings)
    wait_until(lambda: training_progress(db_url, job_id) > 0, 30, "training to start")
    before = job_row(db_url, job_id)

    assert run_job(job_id, settings) == "duplicate"  # the visibility timeout's redelivery
    after = job_row(db_url, job_id)
    assert (after.state, after.attempt, after.worker) == ("running", 1, before.worker)
    assert not runner.checkpoint_dir(settings, job_id, 2).exists()

    client.post(f"/api/v1/jobs/{job_id}/cancel")
    thread.join(30)
    assert outcome == ["cancelled"]


def test_every_write_of_a_superseded_attempt_is_refused(settings: Settings, db_url: str) -> None:
    with transaction(db_url) as s:
        job = Job(kind="train", queue="cpu", spec=train_spec(), max_attempts=3)
        s.add(job)
        s.flush()
        job_id = job.id
        assert claim_job(s, job_id, "old", lease_seconds=-1)  # claimed, lease already expired
    sink = MetricSink(db_url, job_id, attempt=1)
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "new", lease_seconds=30).attempt == 2

    sink.log("train_loss", 1.0, step=1)
    with pytest.raises(LostJob):
        sink.flush()
    with transaction(db_url) as s:
        assert not update_progress(s, job_id, 1, {"epoch": 1})
        assert not hand_back_job(s, job_id, 1, "zombie")
        assert not requeue_after_failure(s, job_id, 1, "zombie")
        assert not finish_job(s, job_id, 1, runner.JobState.SUCCEEDED, result={})
        assert s.scalar(select(func.count()).select_from(MetricPoint)) == 0
        assert (s.get(Job, job_id).state, s.get(Job, job_id).worker) == ("running", "new")


def test_a_hand_back_on_the_last_attempt_does_not_strand_the_job(db_url: str) -> None:
    with transaction(db_url) as s:
        job = Job(kind="train", queue="cpu", spec=train_spec(), max_attempts=1)
        s.add(job)
        s.flush()
        job_id = job.id
        assert claim_job(s, job_id, "w", lease_seconds=30).attempt == 1
        assert not requeue_after_failure(
            s, job_id, 1, "out of memory"
        )  # no attempts left to retry with
        assert hand_back_job(s, job_id, 1, "worker shutting down")  # but a shutdown is free
    with transaction(db_url) as s:
        assert claim_job(s, job_id, "w2", lease_seconds=30).attempt == 2
        # A cancel that lands while the job is handed back: the worker finishes it instead.
        s.get(Job, job_id).cancel_requested = True
    with transaction(db_url) as s:
        assert not hand_back_job(s, job_id, 2, "worker shutting down")
