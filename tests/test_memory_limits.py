"""A job runs under its worker slot's memory limit (worker/memory_limit.py): past it, the
job fails once as OutOfMemory, and the worker lives on to run the next job; a job whose
pool child is killed by SIGKILL ends failed as KilledBySignal (worker/child_death.py;
the real-worker scenario is in tests/faults/test_worker_loss.py). docs/architecture.md,
"Reliability" R10."""

from __future__ import annotations

import resource
from datetime import timedelta
from typing import Any

import pytest
import torch

from shared.db import transaction, utcnow
from shared.job_events import job_events
from shared.orm import Job
from shared.settings import Settings
from shared.state_machine import KILLED, fail_killed_attempt
from tests.conftest import SQLITE_ONLY, as_user, wait_for_state
from tests.helpers import train_spec
from worker import shutdown
from worker.child_death import kill_reason, killed_by_sigkill, record_killed_child
from worker.failures import CUDA_OOM, HOST_OOM, classify
from worker.memory_limit import MemoryBudget, data_bytes, job_memory_limit, slot_budget

GIB = 1 << 30
# About 200 M parameters: 0.8 GB of weights, 3.2 GB with gradients and Adam's state.
HUGE_MLP = {"name": "mlp", "params": {"hidden": 8192, "layers": 4}}
SMALL_MLP = {"name": "mlp", "params": {"hidden": 16, "layers": 1}}
SLOT_LIMIT = int(1.5 * GIB)


def test_the_limit_fails_an_allocation_inside_the_job_and_is_restored_after() -> None:
    before = resource.getrlimit(resource.RLIMIT_DATA)
    budget = MemoryBudget(data_bytes() + 256 * (1 << 20), "test")
    with job_memory_limit(budget, torch.device("cpu")) as applied:
        assert applied.limit_bytes == budget.limit_bytes
        assert resource.getrlimit(resource.RLIMIT_DATA)[0] == budget.limit_bytes
        with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as err:
            torch.empty(GIB, dtype=torch.uint8)
        assert classify(err.value).error_type == HOST_OOM
        with pytest.raises(MemoryError):
            bytearray(GIB)
        torch.ones(16 << 20, dtype=torch.uint8)  # within the limit: fine
    # The pool child runs the next job with its old limit.
    assert resource.getrlimit(resource.RLIMIT_DATA) == before
    torch.empty(GIB, dtype=torch.uint8)


def test_the_limit_is_restored_when_the_job_raises() -> None:
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with (
        pytest.raises(ValueError),
        job_memory_limit(MemoryBudget(64 * GIB, "t"), torch.device("cpu")),
    ):
        raise ValueError("the job's own error")
    assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_no_data_limit_on_cuda_devices_nor_when_off() -> None:
    before = resource.getrlimit(resource.RLIMIT_DATA)
    with job_memory_limit(MemoryBudget(GIB, "t"), torch.device("cuda", 0)) as applied:
        assert applied.limit_bytes is None and "CUDA" in applied.describe()
        assert resource.getrlimit(resource.RLIMIT_DATA) == before
    with job_memory_limit(MemoryBudget(None, "off"), torch.device("cpu")) as applied:
        assert applied.limit_bytes is None
        assert resource.getrlimit(resource.RLIMIT_DATA) == before


def test_slot_budget_is_a_share_of_the_host_or_the_setting(tmp_path: Any) -> None:
    host = slot_budget(Settings(home=tmp_path, slot_memory_fraction=0.5), 1).limit_bytes
    assert host is not None and host > 0
    quarter = slot_budget(Settings(home=tmp_path, slot_memory_fraction=0.5), 2).limit_bytes
    assert quarter is not None and abs(quarter - host // 2) <= 1
    assert slot_budget(Settings(home=tmp_path, slot_memory_bytes=GIB), 4).limit_bytes == GIB
    off = slot_budget(Settings(home=tmp_path, enforce_memory_limit=False), 1)
    assert off.limit_bytes is None


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes."),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)  # fmt: skip
def test_running_out_of_memory_is_the_jobs_own_error(exc: BaseException) -> None:
    failure = classify(exc, "cuda:0 (NVIDIA H200)")
    assert not failure.retriable
    assert failure.error_type in (HOST_OOM, CUDA_OOM)
    assert "enforce fail" not in failure.reason


@pytest.fixture
def limited_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"slot_memory_bytes": SLOT_LIMIT})


@pytest.mark.integration
@SQLITE_ONLY
def test_a_job_past_its_memory_limit_fails_once_and_the_worker_runs_the_next(
    app, users, limited_settings: Settings, tmp_path: Any
) -> None:  # type: ignore[no-untyped-def]
    """Before: the job grew until the host's OOM killer took the worker's child, and was
    retried max_attempts times. Now the allocation past the slot's limit fails inside
    the job, which ends failed as OutOfMemory on its first attempt."""
    from tests.conftest import WorkerProcess

    worker = WorkerProcess(limited_settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # An admin: a member's submission limits would refuse a model this size.
        client = as_user(app, users.admin)

        def get(path: str) -> dict[str, Any]:
            return client.get(path).get_json()

        resp = client.post("/api/v1/jobs", json=train_spec(model=HUGE_MLP, epochs=1))
        assert resp.status_code == 201, resp.get_json()
        huge = resp.get_json()["id"]
        job = wait_for_state(get, huge, {"succeeded", "failed", "cancelled"}, timeout=180)
        assert job["state"] == "failed", job
        assert job["attempt"] == 1, job
        error = job["error"]
        assert error["type"] == HOST_OOM, error
        assert "memory limit of 1.5 GiB" in error["message"], error

        resp = client.post("/api/v1/jobs", json=train_spec(model=SMALL_MLP, epochs=1))
        small = resp.get_json()["id"]
        assert wait_for_state(get, small, {"succeeded", "failed"})["state"] == "succeeded"
        with transaction(limited_settings.resolved_database_url) as s:
            huge_row, small_row = s.get(Job, huge), s.get(Job, small)
            # The same pool child ran both: nothing was killed.
            assert huge_row.worker == small_row.worker
            assert (huge_row.state, huge_row.attempt) == ("failed", 1)
        assert worker.proc.poll() is None
        assert "memory limit per job=1.5 GiB" in worker.log_tail(200_000)
    finally:
        worker.stop()


# -- a pool child killed by SIGKILL (worker/child_death.py) ------------------------------


@pytest.mark.parametrize(
    ("message", "sigkill"),
    [
        ("Worker exited prematurely: signal 9 (SIGKILL) Job: 0.", True),
        ("Worker exited prematurely: signal 11 (SIGSEGV) Job: 3.", False),
        ("Worker exited prematurely: signal 15 (SIGTERM) Job: 1.", False),
        ("Worker exited prematurely: exitcode 1 Job: 0.", False),
    ],
)
def test_only_a_sigkill_counts_as_killed(message: str, sigkill: bool) -> None:
    assert killed_by_sigkill(message) is sigkill


def running_job(url: str, worker: str, **values: Any) -> int:
    with transaction(url) as s:
        job = Job(
            kind="train", queue="cpu", spec=train_spec(), state="running", attempt=2,
            max_attempts=3, worker=worker, lease_expires_at=utcnow() + timedelta(minutes=1),
            **values,
        )  # fmt: skip
        s.add(job)
        s.flush()
        return job.id


def test_the_killed_childs_attempt_fails_and_no_other(db_url: str) -> None:
    killed = running_job(db_url, "host:101")
    elsewhere = running_job(db_url, "host:202")
    cancelling = running_job(db_url, "host:303", cancel_requested=True)
    with transaction(db_url) as s:
        assert fail_killed_attempt(s, elsewhere, "host:101", kill_reason()) is None
        settled = fail_killed_attempt(s, killed, "host:101", kill_reason())
        assert settled is not None and settled.action == "failed"
        assert fail_killed_attempt(s, killed, "host:101", kill_reason()) is None  # once
        cancelled = fail_killed_attempt(s, cancelling, "host:303", kill_reason())
        assert cancelled is not None and cancelled.action == "cancelled"
    with transaction(db_url) as s:
        job = s.get(Job, killed)
        assert (job.state, job.attempt, job.error_type) == ("failed", 2, KILLED)
        assert job.error_message.startswith("the job's process was killed by signal 9")
        assert job.finished_at is not None and job.lease_expires_at is None
        [event] = job_events(s, killed)
        assert (event.kind, event.attempt, event.worker) == ("failed", 2, "host:101")
        assert s.get(Job, elsewhere).state == "running"
        assert s.get(Job, cancelling).state == "cancelled"


def test_a_worker_shutting_down_or_an_unknown_pid_records_nothing(settings: Settings) -> None:
    message = "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."
    assert not record_killed_child(settings, [1], None, message)
    assert not record_killed_child(settings, ["x"], 123, message)
    shutdown.request_shutdown()
    try:
        assert not record_killed_child(settings, [1], 123, message)
    finally:
        shutdown.reset_for_tests()
